"""ArchConfig: a decoder's shapes and constants, built from a Hugging Face-style config dict."""

from dataclasses import dataclass
from typing import Any

from tokenforge.errors import ModelFileError

# Rope frequency scalings the rotary layer implements ("freq_factors": llama.cpp's rope_freqs divisors).
ROPE_TYPES = ("default", "llama3", "freq_factors")


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # registry key: "llama", "qwen2", "mistral", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: dict[str, Any] | None = None  # of ROPE_TYPES: Llama 3.1's "llama3", GGUF "freq_factors"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], architecture: str | None = None) -> "ArchConfig":
        """Reads the keys of a Hugging Face config.json (the GGUF loader builds the same dict)."""
        try:
            arch = architecture or config["model_type"]
            num_heads = config["num_attention_heads"]
            hidden_size = config["hidden_size"]
            eos = config.get("eos_token_id")
            rope_theta, rope_scaling = _read_rope(config)
            return cls(
                architecture=arch,
                vocab_size=config["vocab_size"],
                hidden_size=hidden_size,
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=config.get("num_key_value_heads") or num_heads,
                head_dim=config.get("head_dim") or hidden_size // num_heads,
                max_position_embeddings=_context_length(config),
                rope_theta=rope_theta,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", arch == "qwen2")),
                rope_scaling=rope_scaling,
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
            )
        except KeyError as exc:
            raise ModelFileError(f"model config lacks the key {exc.args[0]!r}") from None

    @property
    def num_params(self) -> int:
        """Parameter count from the shapes (the lm_head counted once when tied)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        if self.attention_bias:
            attn += self.num_heads * self.head_dim + 2 * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size


def _read_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from transformers 4 keys or the "rope_parameters" transformers 5 writes."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ModelFileError(f"rope scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return float(config.get("rope_theta") or params.get("rope_theta", 10000.0)), scaling


def _context_length(config: dict[str, Any]) -> int:
    """max_position_embeddings, cut to the sliding window if one is on: we attend to the whole
    context, which equals windowed attention only while the context fits in the window."""
    max_positions = config.get("max_position_embeddings", 2048)
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < max_positions:
        return window
    return max_positions
