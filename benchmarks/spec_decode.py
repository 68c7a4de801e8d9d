"""Speculative decoding: single-stream decode tokens/s with and without speculation (n-gram
lookup, a draft model, and the draft forced on: k drafts every step, what the adaptive policy
could keep), on the same prompts, interleaved in one run, plus a high-batch run that checks the
switch-off. Greedy; the target as `tokenforge serve` loads it (--quantization auto: w8a8-block
on the CPU for a quantized GGUF), the draft with --draft-quantization (auto: w8a8-block too): the
outputs must be identical. Writes JSON to benchmarks/results/.
"""

import argparse
import dataclasses
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_cpp import default_cache_dir, ensure_llama_cpp
from spec_llama_cpp import bench_llama_cpp
from throughput import git_info, machine_info, write_result
from tokenforge.config import CacheConfig, EngineConfig, ModelConfig, SpeculativeConfig
from tokenforge.config import default_cache_dir as tokenforge_cache_dir
from tokenforge.engine.engine_core import EngineCore
from tokenforge.engine.factory import load, load_draft
from tokenforge.engine.llm import LLM
from tokenforge.model.pull import resolve_model
from tokenforge.sampling_params import SamplingParams

MERGE = '''def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    result.extend(a[i:])
    result.extend(b[j:])
    return result'''
STATS = '''def summarize(values):
    total = 0
    count = 0
    for value in values:
        total += value
        count += 1
    mean = total / count
    spread = 0
    for value in values:
        spread += (value - mean) ** 2
    return {"mean": mean, "variance": spread / count, "count": count}'''
PROMPTS = {
    "code": [
        f"Add type hints to this function and return the whole function:\n```python\n{MERGE}\n```",
        f"Rename the variable `count` to `num_values` in this code and return the whole code:\n```python\n{STATS}\n```",
        "Write a Python function `is_prime(n)` that returns whether n is a prime number.",
    ],
    "chat": [
        "Explain in a few sentences why the sky is blue.",
        "Give me a short recipe for pancakes.",
        "What are the main differences between TCP and UDP?",
    ],
}
KV_CACHE_BYTES = 1 << 30
# with a draft model, adaptive and forced on (k drafts every step: what the adaptive policy keeps of it)
DRAFT_METHODS = ("draft", "draft_forced", "hybrid", "hybrid_forced")


@dataclass
class StreamRun:
    method: str
    category: str
    prompt: int
    num_output_tokens: int
    ttft_s: float
    decode_s: float  # from the first token to the last
    decode_tokens_per_s: float  # tokens after the first / decode_s
    num_draft_tokens: int
    num_accepted_tokens: int


def make_engine(loaded, speculative: SpeculativeConfig, draft=None) -> EngineCore:
    config = EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=KV_CACHE_BYTES), speculative=speculative)
    return EngineCore(config, *loaded, draft=draft)


def run_stream(engine: EngineCore, request_id: str, prompt_ids: list[int],
               max_tokens: int) -> tuple[list[int], float, float]:
    """One request alone, step by step: (output ids, time to first token, decode time)."""
    request = engine.make_request(request_id, prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    started = time.perf_counter()
    engine.add_request(request)
    first_at = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first_at is None and any(out.new_token_ids for out in outputs):
            first_at = time.perf_counter()
    return list(request.output_token_ids), first_at - started, time.perf_counter() - first_at


def spec_counts(engine: EngineCore) -> tuple[int, int]:
    stats = engine.stats()
    return stats.get("spec_num_draft_tokens", 0), stats.get("spec_num_accepted_tokens", 0)


def bench_streams(engines: dict[str, EngineCore], prompts: dict[str, list[list[int]]], max_tokens: int):
    """Every prompt through every engine, the engines' order rotated from prompt to prompt."""
    runs, mismatches = [], []
    names = list(engines)
    for category, category_prompts in prompts.items():
        for index, prompt_ids in enumerate(category_prompts):
            order = names[index % len(names):] + names[: index % len(names)]
            outputs = {}
            for name in order:
                engine = engines[name]
                drafted, accepted = spec_counts(engine)
                ids, ttft_s, decode_s = run_stream(engine, f"{category}-{index}-{name}", prompt_ids, max_tokens)
                drafted_after, accepted_after = spec_counts(engine)
                outputs[name] = ids
                runs.append(StreamRun(name, category, index, len(ids), ttft_s, decode_s,
                                      (len(ids) - 1) / decode_s, drafted_after - drafted, accepted_after - accepted))
                print(f"{category} #{index} {name:<13} {len(ids):>4} tokens, decode {runs[-1].decode_tokens_per_s:6.2f}"
                      f" tok/s, accepted {accepted_after - accepted}/{drafted_after - drafted}", flush=True)
            mismatches += [(category, index, name) for name in names if outputs[name] != outputs[names[0]]]
    return runs, mismatches


def summarize(runs: list[StreamRun]) -> dict:
    """Per category and method: decode tok/s over all its prompts, speed-up over plain, acceptance."""
    summary = {}
    for category in sorted({r.category for r in runs}):
        rows = {}
        for method in dict.fromkeys(r.method for r in runs):
            mine = [r for r in runs if r.category == category and r.method == method]
            num_decoded = sum(r.num_output_tokens - 1 for r in mine)
            drafted, accepted = sum(r.num_draft_tokens for r in mine), sum(r.num_accepted_tokens for r in mine)
            rows[method] = {"decode_tokens_per_s": num_decoded / sum(r.decode_s for r in mine),
                            "acceptance_rate": accepted / drafted if drafted else None,
                            "num_draft_tokens": drafted, "num_accepted_tokens": accepted}
        for row in rows.values():
            row["speedup"] = row["decode_tokens_per_s"] / rows["plain"]["decode_tokens_per_s"]
        summary[category] = rows
    return summary


def bench_batch(loaded, draft, prompts: list[list[int]], max_tokens: int, args) -> dict:
    """All prompts at once: plain, then each method with the switch-off and forced on (no switch-off)."""
    configs = {"plain": SpeculativeConfig()}
    for method in ("ngram", "draft", "hybrid") if draft is not None else ("ngram",):
        config = SpeculativeConfig(method=method, num_speculative_tokens=args.num_speculative_tokens)
        configs[method] = config
        configs[f"{method}_no_switch_off"] = dataclasses.replace(config, max_num_seqs=len(prompts), adaptive=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engines = {name: make_engine(loaded, config, draft if config.uses_draft_model else None)
               for name, config in configs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for round_index in range(args.batch_rounds):  # the order rotates from round to round
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            LLM(engine=engines[name]).generate(prompts, params)
            seconds[name].append(time.perf_counter() - started)
            print(f"batch {len(prompts)} {name:<20} {max_tokens * len(prompts) / seconds[name][-1]:7.2f} out tok/s",
                  flush=True)
    results = {name: {"wall_s": times, "output_tokens_per_s": max_tokens * len(prompts) * len(times) / sum(times)}
               for name, times in seconds.items()}
    for row in results.values():
        row["ratio_to_plain"] = row["output_tokens_per_s"] / results["plain"]["output_tokens_per_s"]
    return results


def run_llama_cpp(args) -> dict:
    cache_dir = default_cache_dir()
    target, draft = (resolve_model(name, tokenforge_cache_dir()) for name in (args.target, args.draft))
    with tempfile.TemporaryDirectory() as log_dir:
        result = bench_llama_cpp(ensure_llama_cpp(cache_dir), target, draft, PROMPTS, args.max_tokens,
                                 args.num_speculative_tokens, args.threads, Path(log_dir), print)
    for category, row in result["draft"]["summary"].items():
        print(f"llama.cpp {category:<5} draft {row['decode_tokens_per_s']:6.2f} tok/s  {row['speedup']:.2f}x  "
              f"acceptance {row['acceptance_rate'] or 0:.2f}")
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="'' for n-gram only")
    parser.add_argument("--draft-quantization", default=SpeculativeConfig.draft_quantization)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--draft-head-ids", type=int, default=0,
                        help="also run the draft with its head over the first N ids (draft_head, draft_head_forced)")
    parser.add_argument("--methods", default=",".join(DRAFT_METHODS),
                        help="the draft model's engines to run (plain and ngram always run)")
    parser.add_argument("--batch-size", type=int, default=16, help="high-batch run (0: skip)")
    parser.add_argument("--batch-max-tokens", type=int, default=32)
    parser.add_argument("--batch-rounds", type=int, default=2)
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama.cpp's llama-server, plain and with the draft (built once, cached)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = {"machine": machine_info(), "git": git_info(), "config": vars(args),
            "load_average_at_start": os.getloadavg(), "note": "compare within this run only"}
    model_config = ModelConfig(model=args.target, device="cpu")
    started = time.perf_counter()
    loaded = load(model_config)
    draft = None
    if args.draft:
        draft = load_draft(model_config, SpeculativeConfig(draft_model=args.draft,
                                                           draft_quantization=args.draft_quantization))
    info["load_s"] = time.perf_counter() - started
    k = args.num_speculative_tokens
    engines = {"plain": make_engine(loaded, SpeculativeConfig()),
               "ngram": make_engine(loaded, SpeculativeConfig(method="ngram", num_speculative_tokens=k))}
    for method in DRAFT_METHODS if draft is not None else ():
        config = SpeculativeConfig(method=method.removesuffix("_forced"), num_speculative_tokens=k,
                                   adaptive=not method.endswith("_forced"))  # forced: k drafts every step
        if method in args.methods.split(","):
            engines[method] = make_engine(loaded, config, draft)
    drafting = [engine for name, engine in engines.items() if name in DRAFT_METHODS]
    if drafting:
        info["draft_cost"] = drafting[0].spec.proposer.draft_cost  # measured: draft step / target step
        if args.draft_head_ids:  # the same draft with its head over the first ids only, adaptive and forced on
            limited = SpeculativeConfig(method="draft", num_speculative_tokens=k, draft_head_ids=args.draft_head_ids)
            engines["draft_head"] = make_engine(loaded, limited, draft)
            engines["draft_head_forced"] = make_engine(loaded, dataclasses.replace(limited, adaptive=False), draft)
            info["draft_head_cost"] = engines["draft_head"].spec.proposer.draft_cost
    info["verify_cost"] = engines["ngram"].spec.verify_cost  # measured: each extra verified token, in steps
    tokenizer = loaded[0].tokenizer
    plain_llm = LLM(engine=engines["plain"])
    chat_ids = lambda text: plain_llm.apply_chat_template([{"role": "user", "content": text}])  # noqa: E731
    prompts = {category: [chat_ids(text) for text in texts] for category, texts in PROMPTS.items()}
    for engine in engines.values():  # warm-up
        run_stream(engine, "warmup", prompts["chat"][0], 4)
    runs, mismatches = bench_streams(engines, prompts, args.max_tokens)
    info["single_stream"] = {"runs": [asdict(r) for r in runs], "summary": summarize(runs),
                             "outputs_differing_from_plain": mismatches}
    for category, rows in info["single_stream"]["summary"].items():
        for method, row in rows.items():
            rate = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
            print(f"{category:<5} {method:<13} decode {row['decode_tokens_per_s']:6.2f} tok/s  "
                  f"{row['speedup']:.2f}x  acceptance {rate}")
    print(f"outputs identical to plain: {not mismatches} {mismatches or ''}")
    if args.batch_size:
        texts = [t for ts in PROMPTS.values() for t in ts]
        batch = [chat_ids(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(args.batch_size)]
        info["high_batch"] = bench_batch(loaded, draft, batch, args.batch_max_tokens, args)
    del tokenizer
    if args.llama_cpp and args.draft:
        engines.clear()
        info["llama_cpp"] = run_llama_cpp(args)
    info["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('spec-decode', info)}")


if __name__ == "__main__":
    main()
