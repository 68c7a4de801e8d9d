"""The `tokenforge` command: one subcommand per module of tokenforge.cli.

Each module in COMMAND_MODULES defines `add_parser(subparsers) -> ArgumentParser` and
`run(args) -> int | None`. Keep heavy imports (torch, fastapi) inside `run`, so that building
the parser stays fast for every command.
"""

import argparse
import importlib
import sys

from tokenforge.errors import TokenforgeError

COMMAND_MODULES = ("pull", "models", "chat", "generate", "serve", "bench", "keys", "orgs", "usage", "invoices")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenforge",
        description="Self-hostable inference engine with an OpenAI-compatible API",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"tokenforge.cli.{name}")
        module.add_parser(subparsers).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 on a tokenforge error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except TokenforgeError as exc:
        message = " ".join(str(exc).split())  # one line, even for multi-line causes
        print(f"tokenforge {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tokenforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
