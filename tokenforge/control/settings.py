"""The control plane's TOML settings: the price book and tier ladder from defaults.toml merged with a user file."""

from pathlib import Path

from tokenforge.control.pricing import PriceBook, read_control_document
from tokenforge.control.tiers import TierLadder


def load_control_toml(path: str | Path | None = None) -> tuple[PriceBook, TierLadder]:
    """defaults.toml alone, or with the sections of the user file at `path` in place of the defaults' sections."""
    document = read_control_document(path)
    return PriceBook.from_dict(document), TierLadder.from_dict(document)
