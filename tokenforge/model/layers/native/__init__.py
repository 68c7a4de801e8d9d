"""Native CPU kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

`int8_kernels()` gives the kernels of `int8_linear.c` (activation rows times int8 weights, bit
for bit what Int8Linear's torch path computes; AVX2, and `int8_tiles512.c` where the CPU has
AVX-512 VNNI; `int8_blocks.c` for w8a8-block layers), `layer_ops()` those of `layer_ops.c` (a
decoder layer's small fp32 operations, fused), `decode_layers_kernel()` the decode of all layers in
one call (`decode_layers.c`); the files build one library. Each is None where it cannot run: not
x86-64 or no AVX2/FMA/F16C, no C compiler, a failed build, or TOKENFORGE_NATIVE_KERNELS=0. Callers
fall back to torch then. The library is cached under the model cache (kernels/), keyed by the source
and the flags, and links libgomp, the OpenMP runtime torch has loaded already: one pool of threads.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch  # noqa: F401 - loads torch's libgomp before the kernel library needs it

from tokenforge.config import default_cache_dir

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = {"avx2", "fma", "f16c"}
# int8_tiles512.c: where the CPU has these too (TOKENFORGE_NATIVE_AVX512=0 keeps the AVX2 loops)
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni")
AVX512_CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}


def enabled() -> bool:
    return os.environ.get("TOKENFORGE_NATIVE_KERNELS", "1") != "0"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where not x86-64 or unreadable."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_supports_avx2() -> bool:
    return REQUIRED_CPU_FLAGS <= cpu_flags()


def compile_flags() -> tuple[str, ...]:
    """FLAGS, with the AVX-512 VNNI ones where the CPU has them."""
    if AVX512_CPU_FLAGS <= cpu_flags() and os.environ.get("TOKENFORGE_NATIVE_AVX512", "1") != "0":
        return FLAGS + AVX512_FLAGS
    return FLAGS


def build(source: str, name: str, cache_dir: Path, flags: tuple[str, ...] | None = None) -> Path | None:
    """The shared library of `source`, compiled once into cache_dir with flags (compile_flags() if
    None); None if it cannot be built."""
    flags = compile_flags() if flags is None else flags
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: native kernels off")
        return None
    key = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    target = cache_dir / f"{name}-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        done = subprocess.run([compiler, *flags, "-o", str(out), str(src), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            logger.warning("building native kernel %s failed, using torch: %s", name, done.stderr[-500:])
            return None
        out.replace(target)  # atomic: a concurrent build ends with the same file
    return target


_POINTER, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class _Shared:
    """A table of a loaded library's functions: a copied model shares it (ctypes cannot copy it)."""

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self


@dataclass(frozen=True)
class Int8Kernels(_Shared):
    """The ctypes functions of int8_linear.c (their C comments give the arguments)."""
    quantize_rows: Callable
    rescale: Callable
    row_linear_packed: Callable
    rows_linear: Callable
    int4_unpack: Callable
    int4_quantize: Callable


class Int8RowArgs(ctypes.Structure):
    """A layer's fixed arguments for the row kernels (struct int8_row_args): int8 codes (weight) or
    4-bit groups (packed, group_scales); row_sums for 8-bit activations."""
    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("work", ctypes.c_void_p), ("K", ctypes.c_int64), ("N", ctypes.c_int64),
                ("digits", ctypes.c_int32), ("num_threads", ctypes.c_int32),
                ("packed", ctypes.c_void_p), ("group_scales", ctypes.c_void_p), ("row_sums", ctypes.c_void_p)]


_INT8_SIGNATURES = {
    # x, M, K, mode, codes, x_scales, num_threads
    "int8_quantize_rows": [_POINTER, _I64, _I64, _INT, _POINTER, _POINTER, _INT],
    # acc, M, N, digits, x_scales, scales, row_sums, bias, out, num_threads
    "int8_rescale": [_POINTER, _I64, _I64, _INT] + [_POINTER] * 5 + [_INT],
    # x, out, struct int8_row_args *
    "int8_row_linear_packed": [_POINTER, _POINTER, _POINTER],
    # x, out, M, struct int8_row_args *, codes, x_scales
    "int8_rows_linear": [_POINTER, _POINTER, _I64, _POINTER, _POINTER, _POINTER],
    # struct int8_row_args *, out
    "int4_unpack": [_POINTER, _POINTER],
    # weight, N, K, packed, multipliers, scales, num_threads (int4_codes.c)
    "int4_quantize": [_POINTER, _I64, _I64, _POINTER, _POINTER, _POINTER, _INT],
}


@dataclass(frozen=True)
class LayerOps(_Shared):
    """The ctypes functions of layer_ops.c (their C comments give the arguments)."""
    rms_norm: Callable
    silu_mul: Callable
    rotary_write_kv: Callable
    paged_attention: Callable


_LAYER_SIGNATURES = {
    # x, delta, M, H, weight, eps, out, num_threads
    "rms_norm": [_POINTER, _POINTER, _I64, _I64, _POINTER, _FLOAT, _POINTER, _INT],
    # gate_up, M, I, out, num_threads
    "silu_mul": [_POINTER, _I64, _I64, _POINTER, _INT],
    # qkv, M, Hq, Hkv, D, cos, sin, kv_cache, kv_half, block_size, slots, num_threads
    "rotary_write_kv": [_POINTER, _I64, _I64, _I64, _I64, _POINTER, _POINTER, _POINTER, _INT, _I64, _POINTER, _INT],
    # q, q_stride, T, Hq, Hkv, D, kv_cache, kv_half, block_size, tables, table_width, seq, lens, scale, out,
    # scores, max_len, num_threads
    "paged_attention": [_POINTER, _I64, _I64, _I64, _I64, _I64, _POINTER, _INT, _I64, _POINTER, _I64, _POINTER,
                        _POINTER, _FLOAT, _POINTER, _POINTER, _I64, _INT],
}


# one library, in this order
SOURCES = ("int4_codes.c", "int8_linear.c", "int8_blocks.c", "int8_tiles512.c", "layer_ops.c", "decode_layers.c")


@functools.cache
def _library(flags: tuple[str, ...] | None) -> ctypes.CDLL | None:
    """The library of SOURCES, built on first use with flags (None: compile_flags()), or None (see
    the module docstring)."""
    if not cpu_supports_avx2():
        return None
    source = "\n".join(resources.files(__package__).joinpath(name).read_text() for name in SOURCES)
    path = build(source, "native", default_cache_dir() / "kernels", flags)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        logger.warning("loading native kernel %s failed, using torch: %s", path, exc)
        return None


def load(signatures: dict[str, list], flags: tuple[str, ...] | None = None) -> list[Callable] | None:
    """The library's functions of `signatures`, typed, or None where the library cannot run
    (TOKENFORGE_NATIVE_KERNELS is read on each call, the built library is kept)."""
    library = _library(flags) if enabled() else None
    if library is None:
        return None
    functions = []
    for function_name, argtypes in signatures.items():
        function = getattr(library, function_name)
        function.argtypes, function.restype = argtypes, None
        functions.append(function)
    return functions


@functools.cache
def int8_kernels(flags: tuple[str, ...] | None = None) -> Int8Kernels | None:
    """The int8 kernels of the library built with flags (None: compile_flags(); tests also build the
    AVX2-only one, FLAGS, on a CPU with AVX-512 VNNI)."""
    functions = load(_INT8_SIGNATURES, flags)
    return None if functions is None else Int8Kernels(*functions)


@functools.cache
def layer_ops() -> LayerOps | None:
    functions = load(_LAYER_SIGNATURES)
    return None if functions is None else LayerOps(*functions)


class DecodeLayer(ctypes.Structure):
    """struct decode_layer of decode_layers.c."""
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", ctypes.c_void_p),
                ("o", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p)]


class DecodeModel(ctypes.Structure):
    """struct decode_model of decode_layers.c."""
    _fields_ = [("layers", ctypes.c_void_p), ("num_layers", ctypes.c_int64), ("H", ctypes.c_int64),
                ("Hq", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64), ("I", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("h", ctypes.c_void_p), ("qkv_out", ctypes.c_void_p), ("attn_out", ctypes.c_void_p),
                ("o_out", ctypes.c_void_p), ("gate_up_out", ctypes.c_void_p), ("act", ctypes.c_void_p),
                ("codes", ctypes.c_void_p), ("x_scales", ctypes.c_void_p), ("max_rows", ctypes.c_int64)]


class DecodeStep(ctypes.Structure):
    """struct decode_step of decode_layers.c."""
    _fields_ = [("kv_caches", ctypes.c_void_p), ("layer_stride", ctypes.c_int64), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("slots", ctypes.c_void_p), ("tables", ctypes.c_void_p),
                ("seq", ctypes.c_void_p), ("lens", ctypes.c_void_p), ("table_width", ctypes.c_int64),
                ("scores", ctypes.c_void_p), ("num_threads", ctypes.c_int), ("kv_half", ctypes.c_int),
                ("num_rows", ctypes.c_int64), ("max_len", ctypes.c_int64)]


@functools.cache
def decode_layers_kernel() -> Callable | None:
    """decode_layers(model *, step *, x, delta, add_first) of decode_layers.c, or None."""
    functions = load({"decode_layers": [_POINTER, _POINTER, _POINTER, _POINTER, _INT]})
    return None if functions is None else functions[0]
