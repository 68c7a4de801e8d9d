"""Price book: prices per million tokens by parameter count (dense and MoE buckets), input/cached/output
apart, per-model overrides. Also owns reading the control TOML (the shipped defaults.toml merged with a
user file) and the dollar and parameter-count parsers that the tier ladder shares.
"""

import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path

from tokenforge.errors import ConfigError

MICROS_PER_DOLLAR = 1_000_000
NUM_TOKENS_PER_PRICE = 1_000_000  # a Price is per million tokens
DEFAULT_CACHED_INPUT_DISCOUNT_PERCENT = 50
_PARAM_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_PRICE_KEYS = frozenset({"input", "input_micros", "cached_input", "cached_input_micros", "output", "output_micros"})
_PRICING_KEYS = frozenset({"cached_input_discount_percent", "dense", "moe", "models"})


@dataclass(frozen=True)
class Price:
    """Micro-dollars per million tokens."""

    input_micros: int
    cached_input_micros: int
    output_micros: int

    def __post_init__(self):
        for name in ("input_micros", "cached_input_micros", "output_micros"):
            _check_count(name, getattr(self, name))
        if self.cached_input_micros > self.input_micros:
            # worst_case_micros relies on this: a cached token never costs more than an uncached one.
            raise ValueError(f"cached_input_micros ({self.cached_input_micros}) is above "
                             f"input_micros ({self.input_micros})")

    def cost_micros(self, num_prompt_tokens: int, num_cached_tokens: int, num_completion_tokens: int) -> int:
        """The request's cost, rounded up to a whole micro-dollar once over the whole request."""
        _check_count("num_prompt_tokens", num_prompt_tokens)
        _check_count("num_cached_tokens", num_cached_tokens)
        _check_count("num_completion_tokens", num_completion_tokens)
        if num_cached_tokens > num_prompt_tokens:
            raise ValueError(f"num_cached_tokens ({num_cached_tokens}) is above "
                             f"num_prompt_tokens ({num_prompt_tokens})")
        # Micro-dollars times a million: exact in integers; one ceiling, not one per kind of token.
        total = ((num_prompt_tokens - num_cached_tokens) * self.input_micros
                 + num_cached_tokens * self.cached_input_micros
                 + num_completion_tokens * self.output_micros)
        return -(-total // NUM_TOKENS_PER_PRICE)

    def worst_case_micros(self, num_prompt_tokens: int, num_completion_tokens: int) -> int:
        """Never below the real cost of a request with at most that many completion tokens.

        The cost grows with each count and cached_input <= input, so no cached token is the dearest case.
        """
        return self.cost_micros(num_prompt_tokens, 0, num_completion_tokens)


@dataclass(frozen=True)
class ModelFacts:
    name: str  # served model name, used for per-model overrides
    num_params: int  # total parameters, from the loaded weights
    is_moe: bool = False  # MoE models are bucketed by TOTAL parameters in the moe buckets

    def __post_init__(self):
        _check_count("num_params", self.num_params)


@dataclass(frozen=True)
class Bucket:
    max_params: int | None  # upper bound inclusive; None = no bound (last bucket)
    price: Price


@dataclass(frozen=True)
class PriceBook:
    dense: tuple[Bucket, ...]  # sorted by max_params; the last one, and only it, has no bound
    moe: tuple[Bucket, ...]  # same, by total parameters
    overrides: dict[str, Price] = field(default_factory=dict)  # served model name -> its own price

    def __post_init__(self):
        object.__setattr__(self, "dense", _sorted_buckets(self.dense, "pricing.dense"))
        object.__setattr__(self, "moe", _sorted_buckets(self.moe, "pricing.moe"))
        object.__setattr__(self, "overrides", dict(self.overrides))

    def price_for(self, model: ModelFacts) -> Price:
        """The model's override by name, else the first bucket its parameter count fits in."""
        override = self.overrides.get(model.name)
        if override is not None:
            return override
        buckets = self.moe if model.is_moe else self.dense
        for bucket in buckets[:-1]:
            if model.num_params <= bucket.max_params:
                return bucket.price
        return buckets[-1].price

    @classmethod
    def default(cls) -> "PriceBook":
        """The shipped defaults.toml."""
        return cls.from_dict(read_control_document())

    @classmethod
    def from_toml(cls, path: str | Path) -> "PriceBook":
        """defaults.toml with the sections of the user file at `path` in place of the defaults' sections."""
        return cls.from_dict(read_control_document(path))

    @classmethod
    def from_dict(cls, data: dict) -> "PriceBook":
        """A whole control document ({"pricing": {...}}), taken as it is: no defaults filled in."""
        pricing = read_table(data, "pricing", "pricing")
        check_keys(pricing, _PRICING_KEYS, "pricing")
        discount = pricing.get("cached_input_discount_percent", DEFAULT_CACHED_INPUT_DISCOUNT_PERCENT)
        if not _is_int(discount) or not 0 <= discount <= 100:
            raise ConfigError(f"pricing.cached_input_discount_percent must be a whole number from 0 to 100, "
                              f"got {discount!r}")
        models = read_table(pricing, "models", "pricing.models", required=False)
        overrides = {name: _parse_price(read_table(models, name, f'pricing.models."{name}"'),
                                        f'pricing.models."{name}"', discount, _PRICE_KEYS)
                     for name in models}
        return cls(dense=_parse_buckets(pricing, "dense", discount), moe=_parse_buckets(pricing, "moe", discount),
                   overrides=overrides)


def _sorted_buckets(buckets, where: str) -> tuple[Bucket, ...]:
    """Sorted by max_params with the unbounded bucket last; ConfigError if there is not exactly one."""
    buckets = tuple(buckets)
    num_unbounded = sum(bucket.max_params is None for bucket in buckets)
    if num_unbounded != 1:
        raise ConfigError(f"{where} needs exactly one bucket without max_params (for every larger model), "
                          f"got {num_unbounded}")
    bounds = [bucket.max_params for bucket in buckets if bucket.max_params is not None]
    if len(set(bounds)) != len(bounds):
        raise ConfigError(f"{where}: two buckets have the same max_params")
    return tuple(sorted(buckets, key=lambda bucket: (bucket.max_params is None, bucket.max_params or 0)))


def _parse_buckets(pricing: dict, kind: str, discount: int) -> tuple[Bucket, ...]:
    where = f"pricing.{kind}"
    buckets = []
    for i, table in enumerate(read_tables(pricing, kind, where)):
        bucket_where = f"{where}[{i}]"
        max_params = table.get("max_params")
        if max_params is not None:
            max_params = parse_num_params(max_params, f"{bucket_where}.max_params")
        price = _parse_price(table, bucket_where, discount, _PRICE_KEYS | {"max_params"})
        buckets.append(Bucket(max_params=max_params, price=price))
    return tuple(buckets)  # PriceBook sorts and checks them


def _parse_price(table: dict, where: str, discount: int, known: frozenset[str]) -> Price:
    """input (required), output (default: input), cached_input (default: input less the discount)."""
    check_keys(table, known, where)
    input_micros = read_micros(table, "input", where)
    if input_micros is None:
        raise ConfigError(f"{where}.input is missing (dollars per million input tokens, e.g. input = 0.10)")
    output_micros = read_micros(table, "output", where)
    cached_input_micros = read_micros(table, "cached_input", where)
    if cached_input_micros is None:
        cached_input_micros = input_micros * (100 - discount) // 100  # round down: the discount never shrinks
    if cached_input_micros > input_micros:
        raise ConfigError(f"{where}.cached_input ({cached_input_micros} micros) is above "
                          f"{where}.input ({input_micros} micros)")
    return Price(input_micros=input_micros, cached_input_micros=cached_input_micros,
                 output_micros=input_micros if output_micros is None else output_micros)


def read_micros(table: dict, name: str, where: str) -> int | None:
    """`name` in dollars (0.10, 50) or `name_micros` as an integer; None when neither is given."""
    dollars, micros = table.get(name), table.get(f"{name}_micros")
    if dollars is not None and micros is not None:
        raise ConfigError(f"{where}: give {name} or {name}_micros, not both")
    if micros is not None:
        if not _is_int(micros) or micros < 0:
            raise ConfigError(f"{where}.{name}_micros must be a whole number >= 0, got {micros!r}")
        return micros
    return None if dollars is None else dollars_to_micros(dollars, f"{where}.{name}")


def dollars_to_micros(value, key: str) -> int:
    """0.10 -> 100_000 exactly (through the decimal text of the value, never float maths)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number of dollars, e.g. 0.10, got {value!r}")
    micros = Decimal(str(value)) * MICROS_PER_DOLLAR
    if not micros.is_finite() or micros < 0:
        raise ConfigError(f"{key} must be a finite number of dollars >= 0, got {value!r}")
    if micros != micros.to_integral_value():
        raise ConfigError(f"{key} = {value!r} is not a whole number of micro-dollars ($0.000001)")
    return int(micros)


def parse_num_params(value, key: str) -> int:
    """A parameter count: an integer, or a string such as "500M", "4B", "1.5B", "1T"."""
    if _is_int(value):
        num_params = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBtT]?)\s*", value)
        if match is None:
            raise ConfigError(f'{key} must be an integer or a count such as "500M" or "4B", got {value!r}')
        exact = Decimal(match.group(1)) * _PARAM_UNITS[match.group(2).upper()]  # the regex admits only digits
        if exact != exact.to_integral_value():
            raise ConfigError(f"{key} = {value!r} is not a whole number of parameters")
        num_params = int(exact)
    else:
        raise ConfigError(f'{key} must be an integer or a count such as "500M" or "4B", got {value!r}')
    if num_params <= 0:
        raise ConfigError(f"{key} must be above 0, got {value!r}")
    return num_params


def read_positive_int(table: dict, key: str, where: str) -> int:
    value = table.get(key)
    if value is None:
        raise ConfigError(f"{where}.{key} is missing")
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a whole number above 0, got {value!r}")
    return value


def read_table(data: dict, key: str, where: str, required: bool = True) -> dict:
    """data[key], which must be a table; {} when absent and not required."""
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is missing or not a table" if value is None
                          else f"{where} must be a table, got {value!r}")
    return value


def read_tables(data: dict, key: str, where: str) -> list[dict]:
    """data[key], which must be one or more tables ([[key]] in TOML)."""
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{where} must be one or more [[{where}]] tables, got {value!r}")
    return value


def check_keys(table: dict, known: frozenset[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")


def read_control_document(path: str | Path | None = None) -> dict:
    """defaults.toml; with `path`, the user file's sections replace the defaults' sections.

    A section is a top-level key, or one key of [pricing] (cached_input_discount_percent, dense, moe),
    or one model of [pricing.models]: a user file that gives [[pricing.dense]] replaces every dense
    bucket and keeps the default moe buckets; [[tiers]] replaces the whole ladder.
    """
    defaults = tomllib.loads(resources.files("tokenforge.control").joinpath("defaults.toml").read_text("utf-8"))
    if path is None:
        return defaults
    return merge_control_documents(defaults, read_toml_file(path))


def merge_control_documents(defaults: dict, user: dict) -> dict:
    merged = dict(defaults)
    for key, value in user.items():
        base = defaults.get(key)
        if isinstance(base, dict) and isinstance(value, dict):
            merged[key] = {**base, **value}
            if key == "pricing" and isinstance(base.get("models"), dict) and isinstance(value.get("models"), dict):
                merged[key]["models"] = {**base["models"], **value["models"]}
        else:
            merged[key] = value
    return merged


def read_toml_file(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
