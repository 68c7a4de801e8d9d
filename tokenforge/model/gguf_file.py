"""GGUF files: metadata -> a Hugging Face-style config, dequantized tensors, the tokenizer."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from tokenforge.errors import ModelFileError

logger = logging.getLogger(__name__)

_ARCH_NAMES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def open_gguf(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r})")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises bare ValueErrors/struct errors
        raise ModelFileError(f"{path} is a damaged GGUF file: {exc}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_config(reader) -> dict:
    """The GGUF metadata as the keys of a Hugging Face config.json."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_NAMES:
        raise ModelFileError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(_ARCH_NAMES)})")
    names = {t.name for t in reader.tensors}
    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "model_type": _ARCH_NAMES[arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // num_heads if num_heads else None),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ModelFileError(f"GGUF rope scaling {scaling_type!r} is not supported yet")
    # llama.cpp's converter stores Llama 3.1's scaling as this tensor of per-frequency divisors.
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        factors = np.asarray(rope_freqs.data, dtype=np.float32).reshape(-1)
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    return config


def iter_tensors(reader, path: Path):
    """Yields (name, float32 tensor) one at a time, dequantizing as it goes."""
    from gguf.quants import dequantize
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    tensors = track(reader.tensors, description=f"loading {path.name}", console=console,
                    disable=not console.is_terminal, transient=True)
    for tensor in tensors:
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ModelFileError(f"{path}: cannot read tensor {tensor.name} ({tensor.tensor_type.name}): {exc}") from None
        # F32 tensors come back as read-only views of the file: np.require copies only those.
        yield tensor.name, torch.from_numpy(np.require(array, np.float32, ["C", "W"]))


def _tokenizer_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_tokenizer(path: Path, cache_dir: Path | None):
    """The tokenizer and chat template inside the GGUF; converted once, then read from a cache."""
    from transformers import AutoTokenizer

    cached = cache_dir / "tokenizers" / _tokenizer_key(path) if cache_dir else None
    if cached is not None and (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    logger.info("building the tokenizer from %s (once)", path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if cached is not None:
        tokenizer.save_pretrained(str(cached))
    return tokenizer
