"""`tokenforge models`: the pulled models and the names the catalog knows."""

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenforge.config import default_cache_dir
from tokenforge.model.catalog import CATALOG, SHAPE_CONFIGS
from tokenforge.model.pull import list_cached_models


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models", help="list pulled models and the catalog", description=__doc__
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="default: $TOKENFORGE_CACHE_DIR or ~/.cache/tokenforge",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    console = Console()
    cached = list_cached_models(cache_dir)
    if cached:
        console.print(_cached_table(cached, cache_dir))
    else:
        console.print(f"No models pulled yet in {cache_dir}")
    console.print(_catalog_table({name for name, _, _ in cached}))
    return 0


def _cached_table(cached: list[tuple[str, Path, int]], cache_dir: Path) -> Table:
    table = Table(title=f"Pulled models in {cache_dir}", title_justify="left")
    table.add_column("name")
    table.add_column("size", justify="right")
    table.add_column("path", overflow="fold")
    for name, path, size_bytes in cached:
        table.add_row(name, f"{size_bytes / 1e6:,.1f} MB", str(path))
    return table


def _catalog_table(pulled_names: set[str]) -> Table:
    table = Table(title="Catalog (tokenforge pull NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("pulled")
    table.add_column("description")
    for name, entry in CATALOG.items():
        table.add_row(name, "yes" if name in pulled_names else "no", entry.description)
    for name in SHAPE_CONFIGS:
        table.add_row(name, "-", "shape only: random weights (load_format='dummy')")
    return table
