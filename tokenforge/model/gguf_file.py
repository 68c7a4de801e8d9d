"""GGUF files: metadata -> a Hugging Face-style config, dequantized tensors, the tokenizer."""

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tokenforge.errors import ModelFileError
from tokenforge.model.pull import check_gguf_file

logger = logging.getLogger(__name__)

DEQUANTIZE_ROWS = 4096  # rows of a tensor dequantized at a time (see _dequantize_in_slices)
_ARCH_NAMES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def open_gguf(path: Path):
    from gguf import GGUFReader

    check_gguf_file(path)
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


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's raw data sits in the file, as GGUFReader lays it out."""

    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # bytes from the start of the file
    dtype: str  # numpy dtype of the raw data (uint8 for quantized blocks)
    shape: list[int]  # shape of the raw data


def is_quantized(entries: list[TensorEntry]) -> bool:
    """Whether any tensor is stored in quantized blocks (anything but F32, F16 and BF16)."""
    from gguf import GGMLQuantizationType as Type

    return any(entry.tensor_type not in (Type.F32, Type.F16, Type.BF16) for entry in entries)


def tensor_entries(reader) -> list[TensorEntry]:
    return [TensorEntry(t.name, int(t.tensor_type), int(t.data_offset), t.data.dtype.str, list(t.data.shape))
            for t in reader.tensors]


def read_index(path: Path, cache_dir: Path | None) -> tuple[dict, list[TensorEntry]]:
    """(config, tensor entries) of a GGUF file. Parsing the metadata with the gguf package takes
    seconds (one Python object per vocabulary entry), so the result is cached per file version."""
    cached = cache_dir / "gguf-index" / f"{file_key(path)}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        data = json.loads(cached.read_text())
        return data["config"], [TensorEntry(**entry) for entry in data["tensors"]]
    reader = open_gguf(path)
    config, entries = read_config(reader), tensor_entries(reader)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        partial.write_text(json.dumps({"config": config, "tensors": [asdict(e) for e in entries]}))
        partial.replace(cached)
    return config, entries


def iter_tensors(reader, path: Path):
    """Yields (name, float32 tensor) one at a time, dequantizing as it goes."""
    return iter_entries(tensor_entries(reader), path)


def iter_entries(entries: list[TensorEntry], path: Path):
    """Yields (name, float32 tensor) for each entry, read from the mapped file and dequantized."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from rich.console import Console
    from rich.progress import track

    data = np.memmap(path, dtype=np.uint8, mode="r")
    console = Console(stderr=True)
    for entry in track(entries, description=f"loading {path.name}", console=console,
                       disable=not console.is_terminal, transient=True):
        qtype = GGMLQuantizationType(entry.tensor_type)
        dtype = np.dtype(entry.dtype)
        count = math.prod(entry.shape)
        try:
            raw = np.frombuffer(data, dtype=dtype, count=count, offset=entry.offset).reshape(entry.shape)
            array = _dequantize_in_slices(raw, qtype, dequantize)
        except (NotImplementedError, ValueError) as exc:
            raise ModelFileError(f"{path}: cannot read tensor {entry.name} ({qtype.name}): {exc}") from None
        # F32 tensors come back as read-only views of the file: np.require copies only those.
        yield entry.name, torch.from_numpy(np.require(array, np.float32, ["C", "W"]))


def _dequantize_in_slices(raw: np.ndarray, qtype, dequantize) -> np.ndarray:
    """dequantize(raw, qtype), DEQUANTIZE_ROWS rows at a time into one float32 array: the gguf
    package's temporaries (several times the output for block formats) stay slice-sized, which
    keeps a large embedding from doubling the loading peak."""
    if raw.ndim < 2 or raw.shape[0] <= DEQUANTIZE_ROWS:
        return dequantize(raw, qtype)
    first = dequantize(raw[:DEQUANTIZE_ROWS], qtype)
    out = np.empty((raw.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:DEQUANTIZE_ROWS] = first
    for start in range(DEQUANTIZE_ROWS, raw.shape[0], DEQUANTIZE_ROWS):
        out[start:start + DEQUANTIZE_ROWS] = dequantize(raw[start:start + DEQUANTIZE_ROWS], qtype)
    return out


def file_key(path: Path) -> str:
    """Names one version of a file: its resolved path, size and modification time."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_tokenizer(path: Path, cache_dir: Path | None):
    """The tokenizer and chat template inside the GGUF; converted once, then read from a cache."""
    from transformers import AutoTokenizer

    cached = cache_dir / "tokenizers" / file_key(path) if cache_dir else None
    if cached is not None and (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    logger.info("building the tokenizer from %s (once)", path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if cached is not None:
        tokenizer.save_pretrained(str(cached))
    return tokenizer
