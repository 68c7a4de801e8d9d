"""Frozen *Config dataclasses; the one place that reads environment variables."""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Where pulled models live: $TOKENFORGE_CACHE_DIR, else ~/.cache/tokenforge."""
    env = os.environ.get("TOKENFORGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenforge"


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL  # catalog name, GGUF file, HF directory or HF repo id
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPU)
    load_format: str = "auto"  # auto | dummy (random weights of the model's shapes)
    max_model_len: int | None = None  # None: the model's own context length
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: Path | None = None  # None: default_cache_dir()
    seed: int = 0  # for dummy weights


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV cache block
    # Bytes for the KV cache; None: a share of free memory (see worker.memory).
    kv_cache_memory_bytes: int | None = None
    # Tests and tools only: an exact block count overrides the memory budget.
    num_blocks_override: int | None = None
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # running requests at once
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    max_num_waiting: int = 1024  # queue bound; past it add_request raises QueueFullError


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
