"""`tokenforge invoices close | list | show | pay`: postpaid invoices. Closing a UTC month turns each
organisation's usage records into one line per model and price; paying an invoice counts toward the
organisation's tier. Closing or paying again changes nothing."""

import argparse
import json
import sys

from tokenforge.cli.control_common import (add_control_args, control_transaction, dollars, find_org, iso_day,
                                           load_ladder, org_names)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("invoices", help="close months into invoices, show and pay them",
                                   description=__doc__)
    actions = parser.add_subparsers(dest="invoices_command", metavar="ACTION", required=True)
    close = add_control_args(actions.add_parser("close", help="make the invoices of a month that has ended"))
    close.add_argument("--month", required=True, metavar="YYYY-MM", help="the UTC calendar month")
    close.add_argument("--org", default=None, metavar="NAME",
                       help="only this organisation (default: every organisation with usage in the month)")
    close.add_argument("--include-current", action="store_true",
                       help="allow closing the current month (usage after now is then on no invoice)")
    listing = add_control_args(actions.add_parser("list", help="list invoices"))
    listing.add_argument("--org", default=None, metavar="NAME", help="only this organisation's invoices")
    show = add_control_args(actions.add_parser("show", help="print one invoice"))
    show.add_argument("invoice_id", metavar="ID")
    show.add_argument("--format", choices=("text", "csv", "json"), default="text",
                      help="a plain-text statement, CSV lines, or the JSON object (default: %(default)s)")
    pay = add_control_args(actions.add_parser("pay", help="mark an invoice paid (moves the organisation's tier)"))
    pay.add_argument("invoice_id", metavar="ID")
    return parser


def run(args: argparse.Namespace) -> int:
    actions = {"close": _close, "list": _list, "show": _show, "pay": _pay}
    return actions[args.invoices_command](args)


def _close(args: argparse.Namespace) -> int:
    from tokenforge.control import audit, invoices

    with control_transaction(args) as db:
        if args.org:
            closed = [invoices.close_month(db, find_org(db, args.org).id, args.month, audit.CLI,
                                           allow_current=args.include_current)]
        else:
            closed = invoices.close_all(db, args.month, audit.CLI, allow_current=args.include_current)
        names = org_names(db)
    if not closed:
        print(f"No organization has usage in {args.month}: no invoice made.")
        return 0
    _print_table(closed, names, f"Invoices for {args.month}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from tokenforge.control import invoices

    with control_transaction(args) as db:
        org_id = find_org(db, args.org).id if args.org else None
        rows, names = invoices.list_invoices(db, org_id), org_names(db)
    if not rows:
        print("No invoices.")
        return 0
    _print_table(rows, names, "Invoices")
    return 0


def _show(args: argparse.Namespace) -> int:
    from tokenforge.control import invoices

    with control_transaction(args) as db:
        invoice = invoices.get_invoice(db, args.invoice_id)
        org_name = org_names(db).get(invoice.org_id, invoice.org_id)
    if args.format == "json":
        sys.stdout.write(json.dumps(invoice.to_dict(), indent=2) + "\n")
    elif args.format == "csv":
        sys.stdout.write(invoices.render_csv(invoice))
    else:
        sys.stdout.write(invoices.render_text(invoice, org_name))
    return 0


def _pay(args: argparse.Namespace) -> int:
    from tokenforge.control import audit, invoices, organizations

    ladder = load_ladder(args)
    with control_transaction(args) as db:
        invoice = invoices.mark_paid(db, args.invoice_id, audit.CLI, ladder)
        org = organizations.info(organizations.get_org(db, invoice.org_id), ladder)
    print(f"Invoice {invoice.id} ({org.name}, {invoice.month}, {dollars(invoice.total_micros)}) is paid "
          f"({iso_day(invoice.paid_at)} UTC). {org.name} is on tier {org.tier_index}, paid "
          f"{dollars(org.paid_micros)} so far.")
    return 0


def _print_table(rows, names: dict[str, str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column, justify in (("id", "left"), ("organization", "left"), ("month", "left"), ("lines", "right"),
                            ("total", "right"), ("status", "left"), ("paid", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for invoice in rows:
        table.add_row(invoice.id, names.get(invoice.org_id, invoice.org_id), invoice.month, str(len(invoice.lines)),
                      dollars(invoice.total_micros), invoice.status, iso_day(invoice.paid_at))
    Console().print(table)
