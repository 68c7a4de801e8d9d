"""`tokenforge orgs create | list | set-limit | delete-data`: organisations, their tier and monthly
spending limit, and deleting the data an organisation left (invoices and the audit log stay)."""

import argparse

from tokenforge.cli.control_common import add_control_args, control_transaction, dollars, find_org
from tokenforge.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("orgs", help="manage organisations", description=__doc__)
    actions = parser.add_subparsers(dest="orgs_command", metavar="ACTION", required=True)
    create = add_control_args(actions.add_parser("create", help="create an organisation (on the first tier)"))
    create.add_argument("name", metavar="NAME")
    add_control_args(actions.add_parser("list", help="list organisations with their tier and limit"))
    set_limit = add_control_args(actions.add_parser("set-limit", help="set or clear a custom monthly limit"))
    set_limit.add_argument("name", metavar="NAME")
    choice = set_limit.add_mutually_exclusive_group(required=True)
    choice.add_argument("--monthly-limit", default=None, metavar="DOLLARS",
                        help="spending limit per calendar month in dollars, e.g. 250 or 99.50")
    choice.add_argument("--tier-default", action="store_true", help="back to the limit of the organisation's tier")
    delete = add_control_args(actions.add_parser(
        "delete-data", help="delete an organisation's keys, usage and budgets (not its invoices or audit log)"))
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="confirm: the deletion cannot be undone")
    return parser


def run(args: argparse.Namespace) -> int:
    actions = {"create": _create, "list": _list, "set-limit": _set_limit, "delete-data": _delete_data}
    return actions[args.orgs_command](args)


def _create(args: argparse.Namespace) -> int:
    from tokenforge.cli.control_common import load_ladder
    from tokenforge.control import audit, organizations

    ladder = load_ladder(args)
    with control_transaction(args) as db:
        info = organizations.info(organizations.create_org(db, args.name, audit.CLI, ladder), ladder)
    print(f"Created organization {info.name} ({info.id}), tier {info.tier_index}, "
          f"monthly limit {_limit_text(info.monthly_limit_micros)}.")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenforge.cli.control_common import load_ladder
    from tokenforge.control import organizations

    ladder = load_ladder(args)
    with control_transaction(args) as db:
        rows = [organizations.info(org, ladder) for org in organizations.list_orgs(db)]
    table = Table(title="Organizations", title_justify="left")
    for column, justify in (("id", "left"), ("name", "left"), ("tier", "right"), ("paid", "right"),
                            ("monthly limit", "right"), ("notes", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for org in rows:
        notes = ", ".join(note for flag, note in ((org.is_operator, "operator"),
                                                  (org.custom_limit_micros is not None, "custom limit"))
                          if flag)
        table.add_row(org.id, org.name, str(org.tier_index), dollars(org.paid_micros),
                      _limit_text(org.monthly_limit_micros), notes)
    Console().print(table)
    return 0


def _set_limit(args: argparse.Namespace) -> int:
    from tokenforge.cli.control_common import load_ladder
    from tokenforge.control import audit, organizations

    limit_micros = None if args.tier_default else _parse_dollars(args.monthly_limit)
    ladder = load_ladder(args)
    with control_transaction(args) as db:
        org = find_org(db, args.name)
        organizations.set_custom_limit(db, org.id, limit_micros, audit.CLI, ladder)
        info = organizations.info(org, ladder)
    source = "custom" if info.custom_limit_micros is not None else f"tier {info.tier_index}"
    print(f"{info.name}: monthly limit {_limit_text(info.monthly_limit_micros)} ({source}).")
    return 0


def _delete_data(args: argparse.Namespace) -> int:
    from tokenforge.control import audit, organizations

    if not args.yes:
        raise ConfigError(f"deleting the data of {args.name!r} cannot be undone: pass --yes to confirm")
    with control_transaction(args) as db:
        org = find_org(db, args.name)
        counts = organizations.delete_org_data(db, org.id, audit.CLI)
    print(f"Deleted the data of {args.name}: " + ", ".join(f"{num} {kind}" for kind, num in counts.items())
          + ". Invoices and the audit log are kept.")
    return 0


def _parse_dollars(text: str) -> int:
    from tokenforge.control.pricing import dollars_to_micros

    try:
        value = float(text)  # str(float) is the shortest exact text back, so 99.50 -> 99_500_000 exactly
    except ValueError:
        raise ConfigError(f"--monthly-limit must be a number of dollars, e.g. 250 or 99.50, got {text!r}") from None
    return dollars_to_micros(value, "--monthly-limit")


def _limit_text(limit_micros: int | None) -> str:
    return "unlimited" if limit_micros is None else dollars(limit_micros)
