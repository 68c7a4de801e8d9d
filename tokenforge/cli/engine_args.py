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


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"catalog name, .gguf file, HF model directory or repo id (default {DEFAULT_MODEL})")
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


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                          max_model_len=args.max_model_len, cache_dir=args.cache_dir),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_waiting=args.max_num_waiting),
    )
