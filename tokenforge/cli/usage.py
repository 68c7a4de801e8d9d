"""`tokenforge usage`: daily usage per organisation and model over a date range (UTC days, both
included; default: this month so far), as a table or CSV on stdout."""

import argparse
import sys
from datetime import UTC, datetime

from tokenforge.cli.control_common import add_control_args, control_transaction, find_org, org_names


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_control_args(subparsers.add_parser("usage", help="show usage and cost by day and model",
                                                    description=__doc__))
    parser.add_argument("--org", default=None, metavar="NAME", help="one organisation (default: all)")
    parser.add_argument("--start", default=None, metavar="YYYY-MM-DD",
                        help="first day (default: the first day of the end's month)")
    parser.add_argument("--end", default=None, metavar="YYYY-MM-DD", help="last day (default: today, UTC)")
    parser.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")
    return parser


def run(args: argparse.Namespace) -> int:
    from tokenforge.control import usage

    start, end = usage.parse_date_range(args.start, args.end, datetime.now(UTC).date())
    with control_transaction(args) as db:
        org_id = find_org(db, args.org).id if args.org else None
        rows, names = usage.daily_usage(db, org_id, start, end), org_names(db)
    if args.csv:
        sys.stdout.write(usage.to_csv(rows))
        return 0
    _print_table(rows, usage.usage_totals(rows), names, f"Usage {start} to {end} (UTC)")
    return 0


def _print_table(rows, totals: dict, names: dict[str, str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from tokenforge.control.usage import format_dollars

    table = Table(title=title, title_justify="left", show_footer=bool(rows))
    counts = ("num_requests", "num_prompt_tokens", "num_cached_tokens", "num_completion_tokens")
    table.add_column("day", footer="total")
    table.add_column("organization", overflow="fold")
    table.add_column("model", overflow="fold")
    for name, header in zip(counts, ("requests", "prompt tokens", "cached tokens", "completion tokens")):
        table.add_column(header, justify="right", footer=f"{totals[name]:,}")
    table.add_column("cost", justify="right", footer=format_dollars(totals["cost_micros"]))
    for row in rows:
        table.add_row(row.day.isoformat(), names.get(row.org_id, row.org_id), row.model,
                      *(f"{getattr(row, name):,}" for name in counts), format_dollars(row.cost_micros))
    console = Console()
    if rows:
        console.print(table)
    else:
        console.print(f"{title}: no usage.")
