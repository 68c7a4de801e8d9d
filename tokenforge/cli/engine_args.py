"""Engine options shared by every command that loads a model (serve, generate, chat, bench)."""

import argparse
import re
from pathlib import Path

from tokenforge.config import (CACHE_DTYPES, DEFAULT_MODEL, DRAFT_MODEL_METHODS, QUANTIZATIONS, SPECULATIVE_METHODS,
                               CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig)
from tokenforge.errors import ConfigError
from tokenforge.sampling_params import MAX_SPECULATIVE_TOKENS

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# The engine options, by their argparse names; `tokenforge serve`'s config file uses the same keys.
ENGINE_OPTIONS = ("model", "dtype", "quantization", "device", "load_format", "max_model_len", "kv_cache_memory",
                  "kv_cache_dtype", "block_size", "no_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                  "max_num_waiting", "cache_dir", "speculative_method", "num_speculative_tokens", "draft_model",
                  "draft_quantization", "draft_head_ids", "speculative_max_num_seqs")


def add_engine_args(parser: argparse.ArgumentParser, *, repeat_model: bool = False) -> None:
    """`repeat_model`: --model may be given several times (a list, None when never given)."""
    group = parser.add_argument_group("engine")
    model_help = f"catalog name, .gguf file, HF model directory or repo id (default {DEFAULT_MODEL})"
    if repeat_model:
        group.add_argument("--model", action="append", default=None, help=model_help + "; repeat to serve several")
    else:
        group.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    group.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    group.add_argument("--quantization", default=ModelConfig.quantization, choices=QUANTIZATIONS,
                       help="linear layers on the CPU: int8 (int8 weights; perplexity within 1%% of fp32), w8a8 "
                            "(also int8 activations: faster, less exact), int4 (4-bit weights in groups of 32, "
                            "int8 head: fewest bytes, least exact) or none. auto (default): int8 on the "
                            "CPU for an already quantized GGUF (Q4/Q5/Q8/K-quants), else none")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights of the model's shapes (speed tests)")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    group.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                       help="KV cache budget, e.g. 2GiB (default: a share of free memory)")
    group.add_argument("--kv-cache-dtype", default=CacheConfig.cache_dtype,
                       choices=CACHE_DTYPES,
                       help="KV cache elements; auto (default): float16 under a float32 model on the CPU where the "
                            "native kernels run (half the memory), else the model's dtype")
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
    spec = parser.add_argument_group("speculative decoding (exact: never changes what the model would produce)")
    spec.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                      help="ngram: continue n-grams seen in the prompt and output; draft: a smaller model "
                           "with the same tokenizer (--draft-model); hybrid: the n-gram lookup where it finds a "
                           "match of 3+ tokens, else the draft model. Default: off")
    spec.add_argument("--num-speculative-tokens", type=int, default=SpeculativeConfig.num_speculative_tokens,
                      help="most tokens drafted per request and step (adapted to the acceptance rate)")
    spec.add_argument("--draft-model", default=None, help="the draft model: catalog name, .gguf file or directory")
    spec.add_argument("--draft-quantization", default=SpeculativeConfig.draft_quantization, choices=QUANTIZATIONS,
                      help="the draft model's linear layers; auto: w8a8-block on the CPU where the native kernels "
                           "run, else w8a8 (changes only the acceptance rate, never the output); none off the CPU")
    spec.add_argument("--draft-head-ids", type=int, default=SpeculativeConfig.draft_head_ids,
                      help="compute the draft's output head over the first N token ids only (0: all; e.g. "
                           "65536 for Qwen2.5: a cheaper draft step, never a different output)")
    spec.add_argument("--speculative-max-num-seqs", type=int, default=SpeculativeConfig.max_num_seqs,
                      help="speculation switches off while more requests than this run")


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
        model=ModelConfig(model=options["model"], dtype=options["dtype"],
                          quantization=options.get("quantization", ModelConfig.quantization), device=options["device"],
                          load_format=options["load_format"], max_model_len=options["max_model_len"],
                          cache_dir=cache_dir),
        cache=CacheConfig(block_size=options["block_size"], kv_cache_memory_bytes=kv_cache_memory,
                          enable_prefix_caching=not options["no_prefix_caching"],
                          cache_dtype=options.get("kv_cache_dtype", CacheConfig.cache_dtype)),
        scheduler=SchedulerConfig(max_num_seqs=options["max_num_seqs"],
                                  max_num_batched_tokens=options["max_num_batched_tokens"],
                                  max_num_waiting=options["max_num_waiting"]),
        speculative=speculative_config_from_options(options),
    )


def speculative_config_from_options(options: dict) -> SpeculativeConfig:
    """The speculative_* options -> SpeculativeConfig; ConfigError for a combination that cannot work."""
    method, draft_model = options.get("speculative_method"), options.get("draft_model")
    num_tokens = options.get("num_speculative_tokens", SpeculativeConfig.num_speculative_tokens)
    if method is not None and method not in SPECULATIVE_METHODS:
        raise ConfigError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}")
    uses_draft_model = method in DRAFT_MODEL_METHODS
    if uses_draft_model and draft_model is None:
        raise ConfigError(f"--speculative-method {method} needs --draft-model")
    if draft_model is not None and not uses_draft_model:
        raise ConfigError("--draft-model is only used with --speculative-method draft or hybrid")
    if not 0 <= num_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {num_tokens}")
    draft_quantization = options.get("draft_quantization", SpeculativeConfig.draft_quantization)
    if draft_quantization not in QUANTIZATIONS:
        raise ConfigError(f"draft_quantization must be one of {', '.join(QUANTIZATIONS)}, got {draft_quantization!r}")
    draft_head_ids = options.get("draft_head_ids", SpeculativeConfig.draft_head_ids)
    if not isinstance(draft_head_ids, int) or draft_head_ids < 0:
        raise ConfigError(f"draft_head_ids must be a whole number >= 0 (0: all ids), got {draft_head_ids!r}")
    max_num_seqs = options.get("speculative_max_num_seqs", SpeculativeConfig.max_num_seqs)
    return SpeculativeConfig(method=method, num_speculative_tokens=num_tokens, draft_model=draft_model,
                             draft_quantization=draft_quantization, draft_head_ids=draft_head_ids,
                             max_num_seqs=max_num_seqs)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return engine_config_from_options(engine_options_from_args(args))
