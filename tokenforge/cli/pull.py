"""`tokenforge pull NAME`: download a catalog model (or a HF repo) into the cache."""

import argparse
from pathlib import Path

from tokenforge.config import default_cache_dir
from tokenforge.model.pull import resolve_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pull", help="download a model into the cache", description=__doc__
    )
    parser.add_argument("name", help="catalog name (see `tokenforge models`) or HF repo id")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="default: $TOKENFORGE_CACHE_DIR or ~/.cache/tokenforge",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    print(resolve_model(args.name, cache_dir=cache_dir, download=True))
    return 0
