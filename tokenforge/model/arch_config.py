"""ArchConfig: a decoder's shapes and constants, built from a Hugging Face-style config dict."""

from dataclasses import dataclass
from typing import Any

from tokenforge.errors import ModelFileError


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
    rope_scaling: dict[str, Any] | None = None  # Llama 3.1 "llama3" frequency scaling
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
            return cls(
                architecture=arch,
                vocab_size=config["vocab_size"],
                hidden_size=hidden_size,
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=config.get("num_key_value_heads") or num_heads,
                head_dim=config.get("head_dim") or hidden_size // num_heads,
                max_position_embeddings=config.get("max_position_embeddings", 2048),
                rope_theta=float(config.get("rope_theta", 10000.0)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", arch == "qwen2")),
                rope_scaling=config.get("rope_scaling"),
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
