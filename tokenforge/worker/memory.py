"""Sizes the KV cache from a memory budget (an explicit byte count or a share of free memory) and
picks its element type."""

import contextlib
import ctypes
import functools
import logging

import psutil
import torch

from tokenforge.config import CACHE_DTYPES, CacheConfig
from tokenforge.errors import ConfigError
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.layers.attention import native_attention_fits
from tokenforge.model.layers.native import layer_ops

logger = logging.getLogger(__name__)

CPU_DEFAULT_SHARE = 0.2  # of available RAM
CPU_DEFAULT_CAP_BYTES = 4 << 30
GPU_DEFAULT_SHARE = 0.85  # of free device memory after the weights are loaded
_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(free_bytes * GPU_DEFAULT_SHARE)
    return int(min(psutil.virtual_memory().available * CPU_DEFAULT_SHARE, CPU_DEFAULT_CAP_BYTES))


def pick_cache_dtype(name: str, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's element type (CacheConfig.cache_dtype) under a model of `dtype`; auto: fp16
    where the native attention reads it (elsewhere every step would convert the cache it reads)."""
    if name == "auto":
        native = (device.type == "cpu" and dtype == torch.float32 and layer_ops() is not None
                  and native_attention_fits(arch.num_heads, arch.num_kv_heads, arch.head_dim))
        return torch.float16 if native else dtype
    if name not in _CACHE_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {name!r} (choose from {', '.join(CACHE_DTYPES)})")
    return _CACHE_DTYPES[name]


def num_kv_blocks(config: CacheConfig, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> int:
    if config.num_blocks_override is not None:
        return config.num_blocks_override
    budget = config.kv_cache_memory_bytes or default_kv_cache_bytes(device)
    dtype_size = dtype.itemsize
    block_bytes = arch.kv_bytes_per_token(dtype_size) * config.block_size
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(f"a KV cache budget of {budget} bytes is under one block ({block_bytes} bytes)")
    return num_blocks


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
LOADING_MMAP_THRESHOLD = 256 << 10
SERVING_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold
SERVING_TRIM_THRESHOLD = 2 * SERVING_MMAP_THRESHOLD  # what glibc pairs with it (fixing one fixes both)


@contextlib.contextmanager
def loading_memory():
    """Around loading a model: glibc maps allocations above its mmap threshold and unmaps them on
    free, but raises that threshold after each large free (up to 32 MB), so the tensors of loading
    (one dequantized weight at a time) land on a heap that keeps what they free: measured +200 MB
    of peak and resident memory for SmolLM2. The threshold stays low while loading; afterwards it
    is fixed at 32 MB, with the heap trimmed only above 64 MB free, where glibc would have taken
    both anyway (a step's activations are then reused from the heap rather than mapped and faulted
    in afresh each time), and the heap's free memory goes back to the system. Does nothing where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc
