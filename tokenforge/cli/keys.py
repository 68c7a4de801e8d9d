"""`tokenforge keys create | list | revoke`: an organisation's API keys. A new key is printed once, on
stdout; the store keeps only its hash, so it cannot be shown again."""

import argparse
import sys
from datetime import UTC, datetime, timedelta

from tokenforge.cli.control_common import add_control_args, control_transaction, find_org, iso_day, org_names
from tokenforge.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys", description=__doc__)
    actions = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = add_control_args(actions.add_parser("create", help="create a key (printed once)"))
    create.add_argument("--org", required=True, metavar="NAME", help="the organisation that owns the key")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--scopes", nargs="+", default=["inference"], metavar="SCOPE",
                        help="inference and/or admin (default: inference)")
    create.add_argument("--expires-in-days", type=int, default=None, metavar="D",
                        help="the key stops working after D days (default: never)")
    listing = add_control_args(actions.add_parser("list", help="list keys (never their secrets)"))
    listing.add_argument("--org", default=None, metavar="NAME", help="only this organisation's keys")
    revoke = add_control_args(actions.add_parser("revoke", help="revoke a key (it stops working at once)"))
    revoke.add_argument("key_id", metavar="KEY_ID")
    return parser


def run(args: argparse.Namespace) -> int:
    return {"create": _create, "list": _list, "revoke": _revoke}[args.keys_command](args)


def _create(args: argparse.Namespace) -> int:
    from tokenforge.control import audit, keys

    expires_at = None
    if args.expires_in_days is not None:
        if args.expires_in_days <= 0:
            raise ConfigError(f"--expires-in-days must be above 0, got {args.expires_in_days}")
        expires_at = datetime.now(UTC) + timedelta(days=args.expires_in_days)
    with control_transaction(args) as db:
        org = find_org(db, args.org)
        info, plaintext = keys.create_key(db, org.id, audit.CLI, name=args.name, scopes=args.scopes,
                                          expires_at=expires_at)
        org_name = org.name
    # Committed: only now is the key worth showing. The key alone on stdout, so scripts can capture it.
    expiry = f", expires {iso_day(info.expires_at)} UTC" if info.expires_at else ""
    print(f"Created key {info.id} for {org_name} (scopes: {' '.join(info.scopes)}{expiry}).", file=sys.stderr)
    print(plaintext)
    print("Store this key now: it is not shown again (only its hash is kept).", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenforge.control import keys

    with control_transaction(args) as db:
        org_id = find_org(db, args.org).id if args.org else None
        rows, names = keys.list_keys(db, org_id), org_names(db)
    table = Table(title="API keys", title_justify="left")
    for column in ("id", "organization", "name", "prefix", "scopes", "created", "expires", "status"):
        table.add_column(column, overflow="fold")
    now = datetime.now(UTC)
    for key in rows:
        status = ("revoked" if key.revoked_at else
                  "expired" if key.expires_at and key.expires_at <= now else "active")
        table.add_row(key.id, names.get(key.org_id, key.org_id), key.name, key.prefix, " ".join(key.scopes),
                      iso_day(key.created_at), iso_day(key.expires_at), status)
    Console().print(table)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from tokenforge.control import audit, keys

    with control_transaction(args) as db:
        info = keys.revoke_key(db, args.key_id, audit.CLI)
    print(f"Revoked key {info.id} ({info.prefix}...) at {iso_day(info.revoked_at)} UTC.")
    return 0
