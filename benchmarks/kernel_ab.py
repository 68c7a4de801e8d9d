"""The int8 rows kernel (int8_rows_linear) of two commits on the same layer shapes, in one process,
alternating call batches so that machine noise falls on both: median G multiply-adds/s and the
speed ratio. For kernel changes; the served and offline figures against peers are peers.py's.

    python benchmarks/kernel_ab.py --base c235389~1 16x3072x576 64x576x1536 5x17920x1536
    python benchmarks/kernel_ab.py --base HEAD~1 --int4 64x3072x576
    python benchmarks/kernel_ab.py --base HEAD~1 --block   # w8a8-block layers (the default quantization)

A shape is ROWSxOUTPUTSxINPUTS; the default shapes are SmolLM2-135M's and Qwen2.5-1.5B's layers.
"""

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tokenforge.model.layers import native
from tokenforge.model.layers.quant_block import Int8BlockLinear
from tokenforge.model.layers.quant_int4 import Int4Linear
from tokenforge.model.layers.quant_linear import Int8Linear

ROOT = Path(__file__).resolve().parent.parent
NATIVE_DIR = "tokenforge/model/layers/native"
DEFAULT_SHAPES = ("5x3072x576", "16x3072x576", "64x3072x576", "64x576x1536", "64x49152x576", "5x17920x1536",
                  "5x1536x8960")


def source_at(rev: str | None) -> str:
    """The kernel library's source at a commit (None: the working tree)."""
    parts = []
    for name in native.SOURCES:
        if rev is None:
            parts.append((ROOT / NATIVE_DIR / name).read_text())
        else:
            parts.append(subprocess.run(["git", "show", f"{rev}:{NATIVE_DIR}/{name}"], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout)
    return "\n".join(parts)


def library_function(source: str, build_dir: Path, name: str, argtypes: list):
    """The function `name` of the kernel library built from source (a library per source)."""
    path = native.build(source, "kernel-ab", build_dir)
    if path is None:
        raise SystemExit("the kernel library did not build (needs x86-64 with AVX2 and a C compiler)")
    function = getattr(ctypes.CDLL(str(path)), name)
    function.argtypes, function.restype = argtypes, None
    return function


def rows_kernel(source: str, build_dir: Path):
    return library_function(source, build_dir, "int8_rows_linear", native._INT8_SIGNATURES["int8_rows_linear"])


def measure(kernels: dict, shape: tuple[int, int, int], layer_class, rounds: int) -> dict[str, float]:
    rows, outputs, inputs = shape
    layer = layer_class(torch.randn(outputs, inputs) * 0.05, None)
    layer._make_row_args()
    layer._row_args.args.num_threads = torch.get_num_threads()
    x, out = torch.randn(rows, inputs), torch.empty(rows, outputs)
    codes, x_scales = torch.empty(2 * rows * inputs, dtype=torch.int8), torch.empty(rows)
    calls = max(1, int(2e8 / (rows * outputs * inputs)))
    seconds = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, kernel in kernels.items():
            started = time.perf_counter()
            for _ in range(calls):
                kernel(x.data_ptr(), out.data_ptr(), rows, layer._row_args.address, codes.data_ptr(),
                       x_scales.data_ptr())
            seconds[name].append((time.perf_counter() - started) / calls)
    return {name: rows * outputs * inputs / statistics.median(values) / 1e9 for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", default=DEFAULT_SHAPES)
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--int4", action="store_true", help="4-bit layers (Int4Linear) instead of int8")
    parser.add_argument("--block", action="store_true", help="w8a8-block layers (Int8BlockLinear) instead of int8")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as build_dir:
        kernels = {"base": rows_kernel(source_at(args.base), Path(build_dir)),
                   "new": rows_kernel(source_at(None), Path(build_dir))}
        for text in args.shapes:
            shape = tuple(int(part) for part in text.split("x"))
            layer_class = Int4Linear if args.int4 else Int8BlockLinear if args.block else Int8Linear
            rates = measure(kernels, shape, layer_class, args.rounds)
            print(f"{text:>14}: base {rates['base']:6.1f}, new {rates['new']:6.1f} G multiply-adds/s, "
                  f"new / base {rates['new'] / rates['base']:.2f}x")


if __name__ == "__main__":
    main()
