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
    # QUANTIZATIONS (model.layers.quantize; CPU only). auto: on the CPU for a checkpoint that is quantized
    # already (a Q4/Q5/Q8/K-quant GGUF), w8a8-block where the native kernels run, else int8; else none.
    quantization: str = "auto"
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
    # auto | float32 | float16 | bfloat16. auto: fp16 under an fp32 model on the CPU where the native
    # kernels run (half the memory and the bytes attention reads; llama.cpp's default too), else the
    # model's dtype.
    cache_dtype: str = "auto"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # running requests at once
    # Token budget of one step (chunked prefill). Smaller chunks give a burst of prompts their first
    # tokens one after another instead of all at the end of one long step: on the CPU, 16 prompts
    # at once had their p50 time to first token 0.6x of a 2048 budget's, throughput unchanged.
    max_num_batched_tokens: int = 512
    max_num_waiting: int = 1024  # queue bound; past it add_request raises QueueFullError


SPECULATIVE_METHODS = ("ngram", "draft", "hybrid")
DRAFT_MODEL_METHODS = ("draft", "hybrid")  # the methods that load a draft model
QUANTIZATIONS = ("auto", "none", "int8", "w8a8", "w8a8-block", "int4")
CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SpeculativeConfig:
    # None: off | "ngram" (prompt lookup) | "draft" (a draft model) | "hybrid" (the lookup where it
    # finds a match of at least hybrid_min_match tokens, else the draft model)
    method: str | None = None
    num_speculative_tokens: int = 4  # most tokens drafted per request and step (k)
    draft_model: str | None = None  # with method "draft" or "hybrid": catalog name, file or directory
    # The draft's linear layers (QUANTIZATIONS). "auto": on the CPU w8a8-block where the native kernels
    # run, else w8a8 (engine.factory.pick_draft_quantization); a draft's precision moves only its
    # acceptance rate, never the output.
    draft_quantization: str = "auto"
    # The draft's output head over the first this-many ids only (0: all): a step reads fewer bytes
    # (Qwen2.5's 152k x 896 head is 28% of the 0.5B draft); ids are merge-ordered, so the first ones
    # are the frequent ones. It moves only the acceptance rate: the target verifies every token.
    draft_head_ids: int = 0
    ngram_min: int = 1  # shortest suffix n-gram looked up
    ngram_max: int = 4  # longest suffix n-gram looked up (tried first)
    # With method "hybrid": the shortest match the lookup's draft is preferred to the model's for
    # (shorter matches recur by chance in prose and code; a copied passage repeats long ones).
    hybrid_min_match: int = 3
    # Above this many running requests a step is compute-bound: speculation switches off.
    max_num_seqs: int = 4
    # Pick k per request from its acceptance rate (and switch off when drafting loses).
    adaptive: bool = True

    @property
    def enabled(self) -> bool:
        return self.method is not None and self.num_speculative_tokens > 0

    @property
    def uses_draft_model(self) -> bool:
        return self.method in DRAFT_MODEL_METHODS


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()


def default_data_dir() -> Path:
    """Where the control plane keeps its SQLite store: $TOKENFORGE_DATA_DIR, else ~/.local/share/tokenforge."""
    env = os.environ.get("TOKENFORGE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "tokenforge"


@dataclass(frozen=True)
class ControlConfig:
    """The control plane: where it stores, where rate-limit counters live, its prices and limits."""

    # SQLAlchemy URL; None: a SQLite file (WAL) in the data directory. PostgreSQL: postgresql://...
    database_url: str | None = None
    # Redis URL for rate-limit counters shared by several server processes; None: in the store.
    redis_url: str | None = None
    # A TOML file with [pricing] and [tiers] over the embedded defaults; None: the defaults only.
    pricing_path: Path | None = None
    # A reservation not settled by then is released (a crashed server never holds budget).
    reservation_ttl_s: float = 900.0
    data_dir: Path | None = None  # None: default_data_dir()

    @classmethod
    def from_env(cls, **overrides) -> "ControlConfig":
        """$TOKENFORGE_DATABASE_URL, $TOKENFORGE_REDIS_URL and $TOKENFORGE_RESERVATION_TTL_S, then the
        explicit overrides that are not None."""
        values = {"database_url": os.environ.get("TOKENFORGE_DATABASE_URL") or None,
                  "redis_url": os.environ.get("TOKENFORGE_REDIS_URL") or None}
        if os.environ.get("TOKENFORGE_RESERVATION_TTL_S"):
            values["reservation_ttl_s"] = float(os.environ["TOKENFORGE_RESERVATION_TTL_S"])
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir or default_data_dir()) / 'tokenforge.db'}"
