"""Engine options shared by every command that loads a model (serve, generate, chat, bench)."""

import argparse
import re
from pathlib import Path

from tokenforge.config import DEFAULT_MODEL, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# The engine options, by their argparse names; `tokenforge serve`'s config file uses the same keys.
ENGINE_OPTIONS = ("model", "dtype", "device", "load_format", "max_model_len", "kv_cache_memory", "block_size",
                  "no_prefix_caching", "max_num_seqs", "max_num_batched_tokens", "max_num_waiting", "cache_dir")


def add_engine_args(parser: argparse.ArgumentParser, *, repeat_model: bool = False) -> None:
    """`repeat_model`: --model may be given several times (a list, None when never given)."""
    group = parser.add_argument_group("engine")
    model_help = f"catalog name, .gguf file, HF model directory or repo id (default {DEFAULT_MODEL})"
    if repeat_model:
        group.add_argument("--model", action="append", default=None, help=model_help + "; repeat to serve several")
    else:
        group.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    group.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights of the model's shapes (speed tests)")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    group.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                       help="KV cache budget, e.g. 2GiB (default: a share of free memory)")
    group.add_argument("--block-size", type=int, default=CacheConfig.block_size, help="tokens per KV block")
    group.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    group.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                       help="requests running at once")
    group.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
                       help="token budget of one engine step (chunked prefill)")
    group.add_argument("--max-num-waiting", type=int, default=SchedulerConfig.max_num_waiting,
                       help="queue bound; past it requests are refused (503)")
    group.add_argument("--cache-dir", type=Path, default=None,
                       help="model cache (default $TOKENFORGE_CACHE_DIR or ~/.cache/tokenforge)")


def engine_options_from_args(args: argparse.Namespace) -> dict:
    """{option: value} of every engine option on the command line (defaults included)."""
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def engine_config_from_options(options: dict) -> EngineConfig:
    """ENGINE_OPTIONS -> EngineConfig; kv_cache_memory may be a size string ('2GiB'), cache_dir a string."""
    kv_cache_memory = options["kv_cache_memory"]
    if isinstance(kv_cache_memory, str):
        kv_cache_memory = parse_bytes(kv_cache_memory)
    cache_dir = None if options["cache_dir"] is None else Path(options["cache_dir"]).expanduser()
    return EngineConfig(
        model=ModelConfig(model=options["model"], dtype=options["dtype"], device=options["device"],
                          load_format=options["load_format"], max_model_len=options["max_model_len"],
                          cache_dir=cache_dir),
        cache=CacheConfig(block_size=options["block_size"], kv_cache_memory_bytes=kv_cache_memory,
                          enable_prefix_caching=not options["no_prefix_caching"]),
        scheduler=SchedulerConfig(max_num_seqs=options["max_num_seqs"],
                                  max_num_batched_tokens=options["max_num_batched_tokens"],
                                  max_num_waiting=options["max_num_waiting"]),
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return engine_config_from_options(engine_options_from_args(args))
