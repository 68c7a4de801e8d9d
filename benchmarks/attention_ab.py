"""The native paged attention (layer_ops.c) of two commits on the same batches, in one process,
alternating call batches so that machine noise falls on both: median time per call, the speed ratio,
and whether the outputs are the same bits (they must be: a query's bits never depend on its batch
or on how the kernel is written).

    python benchmarks/attention_ab.py --base HEAD~1
    python benchmarks/attention_ab.py --base HEAD~1 --heads 12/2/128 prefill:4x300 decode:8x600

A batch is prefill:SEQSxLEN (SEQS prompts of LEN tokens, every token a query that sees the tokens
before it and itself) or decode:SEQSxLEN (one query per sequence, seeing LEN positions); --heads is
query heads / KV heads / head size (default SmolLM2-135M's); the cache is fp16, as served.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.kernel_ab import library_function, source_at
from tokenforge.model.layers import native

DEFAULT_BATCHES = ("prefill:5x115", "prefill:1x512", "decode:16x170", "decode:64x170", "decode:1x300")
BLOCK_SIZE = 16


def attention_kernel(source: str, build_dir: Path):
    return library_function(source, build_dir, "paged_attention", native._LAYER_SIGNATURES["paged_attention"])


def make_batch(text: str, heads: tuple[int, int, int]) -> dict:
    kind, size = text.split(":")
    num_seqs, length = (int(part) for part in size.split("x"))
    hq, hkv, d = heads
    blocks_per_seq = -(-length // BLOCK_SIZE)
    cache = (torch.randn(num_seqs * blocks_per_seq, 2, hkv, BLOCK_SIZE, d) * 0.5).half()
    tables = torch.randperm(num_seqs * blocks_per_seq).view(num_seqs, blocks_per_seq)  # scattered blocks
    if kind == "prefill":
        seq = torch.arange(num_seqs).repeat_interleave(length)
        lens = torch.arange(1, length + 1).repeat(num_seqs)
    elif kind == "decode":
        seq, lens = torch.arange(num_seqs), torch.full((num_seqs,), length)
    else:
        raise SystemExit(f"unknown batch kind {kind!r}: prefill or decode")
    q = torch.randn(len(seq), hq * d)
    return {"q": q, "cache": cache, "tables": tables, "seq": seq, "lens": lens, "heads": heads, "length": length}


def call(kernel, batch: dict, out: torch.Tensor, scores: torch.Tensor) -> None:
    hq, hkv, d = batch["heads"]
    q, tables = batch["q"], batch["tables"]
    kernel(q.data_ptr(), q.shape[1], q.shape[0], hq, hkv, d, batch["cache"].data_ptr(), 1, BLOCK_SIZE,
           tables.data_ptr(), tables.shape[1], batch["seq"].data_ptr(), batch["lens"].data_ptr(), d**-0.5,
           out.data_ptr(), scores.data_ptr(), batch["length"], torch.get_num_threads())


def measure(kernels: dict, batch: dict, rounds: int) -> tuple[dict[str, float], bool]:
    hq, _, d = batch["heads"]
    num_queries = batch["q"].shape[0]
    outs = {name: torch.empty(num_queries, hq * d) for name in kernels}
    scores = torch.empty(torch.get_num_threads() * hq * batch["length"])
    work = int(batch["lens"].sum()) * hq * d
    calls = max(1, int(2e8 / work))
    seconds = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, kernel in kernels.items():
            started = time.perf_counter()
            for _ in range(calls):
                call(kernel, batch, outs[name], scores)
            seconds[name].append((time.perf_counter() - started) / calls)
    same = all(torch.equal(outs["base"].view(torch.int32), out.view(torch.int32)) for out in outs.values())
    return {name: statistics.median(values) for name, values in seconds.items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batches", nargs="*", default=DEFAULT_BATCHES)
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--heads", default="9/3/64", help="query heads / KV heads / head size")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    heads = tuple(int(part) for part in args.heads.split("/"))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as build_dir:
        kernels = {"base": attention_kernel(source_at(args.base), Path(build_dir)),
                   "new": attention_kernel(source_at(None), Path(build_dir))}
        for text in args.batches:
            times, same = measure(kernels, make_batch(text, heads), args.rounds)
            print(f"{text:>16} heads {args.heads}: base {1e3 * times['base']:7.3f} ms, "
                  f"new {1e3 * times['new']:7.3f} ms, {times['base'] / times['new']:.2f}x faster, "
                  f"same bits: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
