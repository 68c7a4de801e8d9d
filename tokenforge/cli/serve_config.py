"""What `tokenforge serve` serves: the address and the models (served name + EngineConfig), from
repeated --model / --served-model-name or from a TOML config file with a [[models]] table per model.

Each value comes from, in rising precedence: the built-in default, the command line, the file's
top level (server keys, and engine options for every model), the model's own [[models]] table.
"""

import argparse
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tokenforge.cli.engine_args import (ENGINE_OPTIONS, engine_config_from_options, engine_options_from_args,
                                        parse_bytes)
from tokenforge.config import CACHE_DTYPES, DEFAULT_MODEL, QUANTIZATIONS, SPECULATIVE_METHODS, EngineConfig
from tokenforge.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
SERVER_KEYS = ("host", "port", "log_level")
# What a key of the file may hold (TOML gives typed values; bool is no int here).
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,), "port": (int,), "log_level": (str,), "served_name": (str,), "model": (str,),
    "dtype": (str,), "quantization": (str,), "device": (str,), "load_format": (str,), "max_model_len": (int,),
    "kv_cache_memory": (int, str), "kv_cache_dtype": (str,), "block_size": (int,), "no_prefix_caching": (bool,),
    "max_num_seqs": (int,), "max_num_batched_tokens": (int,), "max_num_waiting": (int,), "cache_dir": (str,),
    "speculative_method": (str,), "num_speculative_tokens": (int,), "draft_model": (str,),
    "draft_quantization": (str,), "draft_head_ids": (int,), "speculative_max_num_seqs": (int,),
}
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false"}
_CHOICES = {"log_level": LOG_LEVELS, "load_format": ("auto", "dummy"), "speculative_method": SPECULATIVE_METHODS,
            "quantization": QUANTIZATIONS, "draft_quantization": QUANTIZATIONS, "kv_cache_dtype": CACHE_DTYPES}
# `model` and `served_name` name one model: only in a [[models]] table.
TOP_LEVEL_KEYS = frozenset({*SERVER_KEYS, "models", *ENGINE_OPTIONS} - {"model"})
MODEL_KEYS = frozenset({"served_name", *ENGINE_OPTIONS})


@dataclass(frozen=True)
class ServedModelConfig:
    served_name: str  # what clients send as `model`
    engine: EngineConfig


@dataclass(frozen=True)
class ServeConfig:
    host: str
    port: int
    log_level: str
    models: tuple[ServedModelConfig, ...]


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The parsed `serve` options (and --config file, if given) -> ServeConfig; ConfigError if they cannot work."""
    server = {key: getattr(args, key) for key in SERVER_KEYS}
    defaults = engine_options_from_args(args)
    defaults.pop("model")  # a list of --model values here, not an engine option
    file = read_config_file(args.config) if args.config is not None else {}
    tables = file.pop("models", None)
    server.update({key: file.pop(key) for key in SERVER_KEYS if key in file})
    defaults.update(file)  # what is left of the top level: engine options for every model
    if tables is not None:
        if args.model or args.served_model_name:
            raise ConfigError(f"{args.config} lists its models: give them there or with --model, not both")
        entries = [{**defaults, **table} for table in tables]
    else:
        entries = _entries_from_flags(defaults, args.model, args.served_model_name)
    models = []
    for entry in entries:
        served_name = entry.pop("served_name", None) or entry["model"]
        if any(model.served_name == served_name for model in models):
            raise ConfigError(f"two models are served as {served_name!r}: give each its own served name")
        models.append(ServedModelConfig(served_name, engine_config_from_options(entry)))
    return ServeConfig(host=server["host"], port=server["port"], log_level=server["log_level"], models=tuple(models))


def _entries_from_flags(defaults: dict, model_names: list[str] | None, served_names: list[str] | None) -> list[dict]:
    """--model and --served-model-name, paired in order; no --model: the default model."""
    model_names = model_names or [DEFAULT_MODEL]
    if served_names and len(served_names) != len(model_names):
        raise ConfigError(f"--served-model-name was given {len(served_names)} times for {len(model_names)} "
                          "model(s): give one per --model, in the same order, or none")
    return [{**defaults, "model": model, "served_name": served_names[i] if served_names else model}
            for i, model in enumerate(model_names)]


def read_config_file(path: Path) -> dict:
    """The file's top-level table, its keys and [[models]] tables checked (unknown keys, types)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    _check_table(data, TOP_LEVEL_KEYS, str(path))
    tables = data.get("models")
    if tables is None:
        return data
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: 'models' must be one or more [[models]] tables")
    for i, table in enumerate(tables):
        where = f"{path}: models[{i}]"
        _check_table(table, MODEL_KEYS, where)
        if "model" not in table:
            raise ConfigError(f"{where} has no 'model' key (a catalog name, .gguf file, HF directory or repo id)")
    return data


def _check_table(table: dict, known: frozenset[str], where: str) -> None:
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
        if key == "models":
            continue
        types = _KEY_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ConfigError(f"{where}: {key} must be {kinds}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key == "kv_cache_memory" and isinstance(value, str):
            try:
                parse_bytes(value)
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{where}: kv_cache_memory is {exc}") from None
