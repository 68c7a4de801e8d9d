"""Quantization on the CPU: quality and speed of tokenforge's --quantization none / int8 / w8a8-block /
w8a8 / int4, with Hugging Face transformers (fp32, the same GGUF weights) as the peer in the same invocation.

For each: perplexity on the fixed text (tokenforge/bench/perplexity.txt, 512-token windows), then
greedy decode of exactly --max-tokens per request, offline (LLM.generate / model.generate), for
batches of 1 (single-stream decode), 16 and 64 chat prompts. Writes JSON to benchmarks/results/.
"""

import argparse
import gc
import math
import os
import time

import torch

from throughput import build_prompts, git_info, hf_generate_batch, machine_info, write_result
from tokenforge.bench.perplexity import fixed_text, perplexity
from tokenforge.engine.llm import LLM
from tokenforge.model.pull import resolve_model
from tokenforge.sampling_params import SamplingParams


def tokenforge_run(args, quantization: str, prompts_text: list[list[dict]]) -> tuple[dict, list[list[int]], object]:
    """The result, the prompts as token ids and the tokenizer."""
    llm = LLM(args.model, dtype="float32", quantization=quantization, kv_cache_memory_bytes=args.kv_cache_memory)
    text_ids = llm.tokenizer.encode(fixed_text())
    started = time.perf_counter()
    ppl = perplexity(llm.engine.runner.model, text_ids)
    result = {"engine": f"tokenforge {quantization}", "perplexity": ppl,
              "perplexity_s": time.perf_counter() - started, "decode": {}}
    # What the KV cache's precision costs: windows in 16-token chunks, each reading the earlier
    # tokens' K/V back from the cache, first fp32, then fp16 (the CPU default).
    model = llm.engine.runner.model
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        chunked = perplexity(model, text_ids, cache_dtype=dtype, chunk_size=16)
        result[f"perplexity_chunks16_{name}_kv"] = chunked
        print(f"{result['engine']:<22} perplexity, 16-token chunks over an {name} KV cache: {chunked:.4f}", flush=True)
    prompts = [llm.apply_chat_template(c) for c in prompts_text]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    for batch in args.batches:
        started = time.perf_counter()
        outputs = llm.generate(prompts[:batch], params)
        wall_s = time.perf_counter() - started
        assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outputs)
        result["decode"][batch] = {"wall_s": wall_s, "output_tokens_per_s": batch * args.max_tokens / wall_s,
                                   "load_average_1m": os.getloadavg()[0]}
        print(f"{result['engine']:<22} batch {batch:>3}: {batch * args.max_tokens / wall_s:7.1f} out tok/s", flush=True)
    print(f"{result['engine']:<22} perplexity {ppl:.3f}", flush=True)
    return result, prompts, llm.tokenizer


@torch.inference_mode()
def hf_perplexity(model, token_ids: list[int], window: int = 512) -> float:
    """The same windows as tokenforge.bench.perplexity, through transformers."""
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = model(input_ids=torch.tensor([chunk])).logits[0]
        total += torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(chunk[1:]),
                                                   reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def transformers_run(args, prompts: list[list[int]], tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ppl = hf_perplexity(model, tokenizer.encode(fixed_text()))
    result = {"engine": "transformers fp32", "perplexity": ppl, "decode": {}}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf_generate_batch(model, prompts[:2], 4, pad_id)  # warm-up
    for batch in args.batches:
        started = time.perf_counter()
        hf_generate_batch(model, prompts[:batch], args.max_tokens, pad_id)  # one static batch
        wall_s = time.perf_counter() - started
        result["decode"][batch] = {"wall_s": wall_s, "output_tokens_per_s": batch * args.max_tokens / wall_s,
                                   "load_average_1m": os.getloadavg()[0]}
        print(f"{result['engine']:<22} batch {batch:>3}: {batch * args.max_tokens / wall_s:7.1f} out tok/s", flush=True)
    print(f"{result['engine']:<22} perplexity {ppl:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantizations", nargs="+", default=["none", "int8", "w8a8-block", "w8a8", "int4"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    info = {"machine": machine_info(), "git": git_info()}
    conversations = build_prompts(max(args.batches))
    results = []
    for quantization in args.quantizations:
        result, prompts, tokenizer = tokenforge_run(args, quantization, conversations)
        results.append(result)
        gc.collect()  # this engine (and its KV cache) goes before the next loads
    if not args.skip_transformers:
        results.append(transformers_run(args, prompts, tokenizer))
    base = results[0]
    print(f"\n{'engine':<22}{'perplexity':>11}{'vs first':>10}" + "".join(f"{f'b{b} tok/s':>12}" for b in args.batches))
    for r in results:
        print(f"{r['engine']:<22}{r['perplexity']:>11.3f}{r['perplexity'] / base['perplexity'] - 1:>+10.2%}"
              + "".join(f"{r['decode'][b]['output_tokens_per_s']:>12.1f}" for b in args.batches))
    peer = next((r for r in results if r["engine"].startswith("transformers")), None)
    if peer is not None:
        for r in results:
            if r is not peer:
                r["ratio_to_transformers"] = {b: r["decode"][b]["output_tokens_per_s"]
                                              / peer["decode"][b]["output_tokens_per_s"] for b in args.batches}
                print(f"{r['engine']} / transformers: "
                      + ", ".join(f"batch {b} {v:.2f}x" for b, v in r["ratio_to_transformers"].items()))
    info["config"] = {"model": args.model, "max_tokens": args.max_tokens, "batches": args.batches,
                      "decode": "offline, greedy, ignore_eos; transformers: one static left-padded batch",
                      "perplexity": "tokenforge/bench/perplexity.txt, 512-token windows (chunked: 16-token "
                                    "prefill chunks reading earlier K/V from an fp32 or fp16 cache)"}
    info["results"] = results
    info["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('quantization', info)}")


if __name__ == "__main__":
    main()
