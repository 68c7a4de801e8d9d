"""How fast can this CPU multiply int8 codes, and how close do the int8 layers come? Register-only C loops
(no memory traffic, 12 independent accumulators, all threads) time the instruction mixes of the two
activation kinds, then the layers of SmolLM2-135M's shapes run at 16 and 64 rows:

- int8 (16-bit activations): `vpmaddwd` + `vpaddd`, 16 products a multiply;
- w8a8-block (8-bit activations): `vpsignb` + `vpmaddubsw` + `vpmaddwd` by ones + `vpaddd`, 32
  products a pair of multiplies (and the same without `vpsignb`, the bare 8-bit mix).

    python benchmarks/int8_ceiling.py

G multiply-adds/s, written to benchmarks/results/int8-ceiling-*.json with the machine and commit.
"""

import ctypes
import tempfile
import time
from pathlib import Path

import torch

from throughput import git_info, machine_info, write_result
from tokenforge.model.layers import native
from tokenforge.model.layers.quant_block import Int8BlockLinear
from tokenforge.model.layers.quant_linear import Int8Linear

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#define ADD(acc, p) __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(p))
#define STEP16(a, w, x) ADD(a, _mm256_madd_epi16(x, w))
#define STEP8(a, w, x) ADD(a, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
#define STEP8S(a, w, x) ADD(a, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_sign_epi8(x, w)), ones))
#define TILE(STEP) STEP(a0, w0, x0); STEP(a1, w0, x1); STEP(a2, w0, x2); STEP(a3, w0, x3); \
                   STEP(a4, w1, x0); STEP(a5, w1, x1); STEP(a6, w1, x2); STEP(a7, w1, x3); \
                   STEP(a8, w2, x0); STEP(a9, w2, x1); STEP(a10, w2, x2); STEP(a11, w2, x3);
/* mode 0: 16-bit products, 1: 8-bit, 2: 8-bit with the sign trick. Returns a checksum. */
int64_t ceiling(int mode, int64_t iters, int threads) {
    int64_t sink = 0;
    #pragma omp parallel num_threads(threads) reduction(+:sink)
    {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i w0 = _mm256_set1_epi8(1), w1 = _mm256_set1_epi8(2), w2 = _mm256_set1_epi8(3);
        __m256i x0 = _mm256_set1_epi8(4), x1 = _mm256_set1_epi8(5), x2 = _mm256_set1_epi8(6), x3 = _mm256_set1_epi8(7);
        __m256i a0 = ones, a1 = ones, a2 = ones, a3 = ones, a4 = ones, a5 = ones, a6 = ones, a7 = ones, a8 = ones,
                a9 = ones, a10 = ones, a11 = ones;
        for (int64_t i = 0; i < iters / threads; i++) {
            __asm__("" : "+x"(w0), "+x"(w1), "+x"(w2), "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3));
            if (mode == 0) { TILE(STEP16) } else if (mode == 1) { TILE(STEP8) } else { TILE(STEP8S) }
        }
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)),
                                     _mm256_add_epi32(_mm256_add_epi32(a4, a5), _mm256_add_epi32(a6, a7)));
        s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_add_epi32(a8, a9), _mm256_add_epi32(a10, a11)));
        sink += _mm256_extract_epi32(s, 0);
    }
    return sink;
}
"""
MIXES = {"int8 (vpmaddwd + vpaddd)": (0, 16), "8-bit (vpmaddubsw + vpmaddwd + vpaddd)": (1, 32),
         "w8a8-block (vpsignb + the 8-bit mix)": (2, 32)}
SHAPES = ((1344, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))  # SmolLM2: qkv, o, gate_up, down, head


def ceilings(threads: int, iters: int = 50_000_000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = native.build(SOURCE, "int8-ceiling", Path(tmp), native.FLAGS)
        if path is None:
            raise SystemExit("the C loops did not build (needs x86-64 with AVX2 and a C compiler)")
        function = ctypes.CDLL(str(path)).ceiling
        function.argtypes, function.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int], ctypes.c_int64
        rates = {}
        for name, (mode, products) in MIXES.items():
            function(mode, iters // 10, threads)  # warm-up
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                function(mode, iters, threads)
                best = min(best, time.perf_counter() - started)
            rates[name] = iters * 12 * products / best / 1e9
    return rates


@torch.inference_mode()
def layer_rates(rows: int, rounds: int = 3) -> dict[str, dict[str, float]]:
    """G multiply-adds/s of each SmolLM2 layer shape, int8 and w8a8-block, alternated, best of rounds."""
    rates = {}
    for outputs, inputs in SHAPES:
        weight = torch.randn(outputs, inputs) * 0.05
        layers = {"int8": Int8Linear(weight, None), "w8a8-block": Int8BlockLinear(weight, None)}
        x = torch.randn(rows, inputs)
        calls = max(1, int(2e8 / (rows * outputs * inputs)))
        best = {name: float("inf") for name in layers}
        for _ in range(rounds):
            for name, layer in layers.items():
                layer(x)
                started = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                best[name] = min(best[name], (time.perf_counter() - started) / calls)
        rates[f"{outputs}x{inputs}"] = {name: rows * outputs * inputs / s / 1e9 for name, s in best.items()}
    return rates


def main() -> None:
    threads = torch.get_num_threads()
    result = {"machine": machine_info(), "git": git_info(), "threads": threads, "ceilings": {}, "layers": {}}
    for count in sorted({1, threads}):
        result["ceilings"][count] = ceilings(count)
        for name, rate in result["ceilings"][count].items():
            print(f"ceiling, {count} thread(s), {name:<40} {rate:7.1f} G multiply-adds/s", flush=True)
    for rows in (16, 64):
        result["layers"][rows] = layer_rates(rows)
        for shape, rates in result["layers"][rows].items():
            print(f"{rows:3d} rows {shape:>10}: " + ", ".join(f"{n} {r:6.1f} G" for n, r in rates.items()), flush=True)
    print(f"wrote {write_result('int8-ceiling', result)}")


if __name__ == "__main__":
    main()
