"""What the control-plane commands (keys, orgs, usage, invoices) share: the --database-url and
--pricing options, opening the store, loading the tier ladder, finding an organisation by name.
Imports of the control plane stay inside the functions, so building the parser stays fast."""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_control_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="the control plane's store (default: $TOKENFORGE_DATABASE_URL, else tokenforge.db "
                             "in $TOKENFORGE_DATA_DIR or ~/.local/share/tokenforge)")
    parser.add_argument("--pricing", type=Path, default=None, metavar="FILE.toml",
                        help="prices and tiers over the shipped defaults (as `tokenforge serve` uses)")
    return parser


def open_control_store(args: argparse.Namespace):
    """The store that `args.database_url` (or the environment, or the data directory) names, migrated."""
    from tokenforge.config import ControlConfig
    from tokenforge.control.store.db import open_store

    return open_store(ControlConfig.from_env(database_url=args.database_url).resolved_database_url())


@contextmanager
def control_transaction(args: argparse.Namespace) -> Iterator:
    """A session of the store in one transaction (committed when the block ends without error); the
    store is closed afterwards. Print what a command changed only after the block, once committed."""
    store = open_control_store(args)
    try:
        with store.transaction() as db:
            yield db
    finally:
        store.close()


def load_ladder(args: argparse.Namespace):
    from tokenforge.control.settings import load_control_toml

    return load_control_toml(args.pricing)[1]


def find_org(db, name_or_id: str):
    """The organisation with this name (or id); NotFoundError otherwise."""
    from tokenforge.control import organizations
    from tokenforge.control.errors import NotFoundError
    from tokenforge.control.store.models import Organization

    org = organizations.find_by_name(db, name_or_id) or db.get(Organization, name_or_id)
    if org is None:
        raise NotFoundError(f"no organization named {name_or_id!r} (see `tokenforge orgs list`)",
                            param="organization")
    return org


def org_names(db) -> dict[str, str]:
    """Organisation id -> name, for tables that show names."""
    from sqlalchemy import select

    from tokenforge.control.store.models import Organization

    return dict(db.execute(select(Organization.id, Organization.name)).all())


def dollars(micros: int) -> str:
    """Exact: "$250.00" for whole cents, "$0.000205" (micro-dollars) otherwise."""
    from tokenforge.control.usage import format_dollars

    return format_dollars(micros, places=2 if micros % 10_000 == 0 else 6)


def iso_day(moment) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M")
