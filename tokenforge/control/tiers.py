"""Usage tiers: monthly spending limit and rate limits by paid history.

An organisation climbs the ladder as it pays: its tier is the highest one whose min_paid_micros it has
reached. The ladder comes from the [[tiers]] tables of defaults.toml or a user file.
"""

import bisect
from dataclasses import dataclass
from pathlib import Path

from tokenforge.control.pricing import check_keys, read_control_document, read_micros, read_positive_int, read_tables
from tokenforge.errors import ConfigError

_TIER_KEYS = frozenset({"name", "min_paid", "min_paid_micros", "monthly_limit", "monthly_limit_micros",
                        "requests_per_minute", "tokens_per_minute"})


@dataclass(frozen=True)
class Tier:
    index: int  # 1-based position on the ladder
    name: str  # "tier-1" ...
    min_paid_micros: int  # paid history needed to reach it
    monthly_limit_micros: int  # most an organisation may spend in a calendar month
    requests_per_minute: int  # per organisation and per key
    tokens_per_minute: int  # per organisation and per key


@dataclass(frozen=True)
class TierLadder:
    tiers: tuple[Tier, ...]  # sorted by min_paid_micros, strictly rising; the first one has 0

    def __post_init__(self):
        object.__setattr__(self, "tiers", tuple(self.tiers))
        _check_ladder(self.tiers)

    def tier_for(self, paid_micros: int) -> Tier:
        """The highest tier whose min_paid_micros <= paid_micros."""
        if not isinstance(paid_micros, int) or isinstance(paid_micros, bool) or paid_micros < 0:
            raise ValueError(f"paid_micros must be a whole number >= 0, got {paid_micros!r}")
        thresholds = [tier.min_paid_micros for tier in self.tiers]
        return self.tiers[bisect.bisect_right(thresholds, paid_micros) - 1]

    def get(self, index: int) -> Tier:
        """The tier at 1-based `index`; ConfigError when the ladder has none there (e.g. a stored index
        from a longer ladder than the one configured now)."""
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= len(self.tiers):
            raise ConfigError(f"no usage tier {index!r}: the ladder has tiers 1 to {len(self.tiers)}")
        return self.tiers[index - 1]

    @classmethod
    def default(cls) -> "TierLadder":
        """The shipped defaults.toml."""
        return cls.from_dict(read_control_document())

    @classmethod
    def from_toml(cls, path: str | Path) -> "TierLadder":
        """defaults.toml with the sections of the user file at `path` in place of the defaults' sections;
        [[tiers]] in the user file replaces the whole ladder."""
        return cls.from_dict(read_control_document(path))

    @classmethod
    def from_dict(cls, data: dict) -> "TierLadder":
        """A whole control document ({"tiers": [...]}), taken as it is: no defaults filled in."""
        return cls(tuple(_parse_tier(table, i) for i, table in enumerate(read_tables(data, "tiers", "tiers"))))


def _parse_tier(table: dict, i: int) -> Tier:
    where = f"tiers[{i}]"
    check_keys(table, _TIER_KEYS, where)
    name = table.get("name", f"tier-{i + 1}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
    min_paid_micros = read_micros(table, "min_paid", where)
    if min_paid_micros is None:
        raise ConfigError(f"{where}.min_paid is missing (dollars paid before this tier, e.g. min_paid = 50)")
    monthly_limit_micros = read_micros(table, "monthly_limit", where)
    if monthly_limit_micros is None:
        raise ConfigError(f"{where}.monthly_limit is missing (dollars a month, e.g. monthly_limit = 500)")
    return Tier(index=i + 1, name=name, min_paid_micros=min_paid_micros,
                monthly_limit_micros=monthly_limit_micros,
                requests_per_minute=read_positive_int(table, "requests_per_minute", where),
                tokens_per_minute=read_positive_int(table, "tokens_per_minute", where))


def _check_ladder(tiers: tuple[Tier, ...]) -> None:
    """ConfigError naming the key: first tier from $0, strictly rising min_paid, positive limits."""
    if not tiers:
        raise ConfigError("tiers must hold at least one tier")
    if tiers[0].min_paid_micros != 0:
        raise ConfigError(f"tiers[0].min_paid must be 0 (every organisation starts on the first tier), "
                          f"got {tiers[0].min_paid_micros} micros")
    names = set()
    for i, tier in enumerate(tiers):
        where = f"tiers[{i}]"
        if tier.index != i + 1:
            raise ConfigError(f"{where}.index must be {i + 1} (its 1-based position), got {tier.index}")
        if tier.name in names:
            raise ConfigError(f"{where}.name {tier.name!r} is used by an earlier tier")
        names.add(tier.name)
        if i > 0 and tier.min_paid_micros <= tiers[i - 1].min_paid_micros:
            raise ConfigError(f"{where}.min_paid ({tier.min_paid_micros} micros) must be above "
                              f"tiers[{i - 1}].min_paid ({tiers[i - 1].min_paid_micros} micros)")
        for key in ("monthly_limit_micros", "requests_per_minute", "tokens_per_minute"):
            value = getattr(tier, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                name = "monthly_limit" if key == "monthly_limit_micros" else key
                raise ConfigError(f"{where}.{name} must be above 0, got {value!r}")
