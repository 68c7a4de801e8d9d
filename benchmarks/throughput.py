"""Offline throughput: tokenforge's LLM.generate (continuous batching) against Hugging Face
transformers' batched model.generate, on the same GGUF weights and the same prompt token ids,
greedy, fp32, every request generating exactly --max-tokens. Writes JSON to benchmarks/results/.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from tokenforge.engine.llm import LLM
from tokenforge.model.pull import resolve_model
from tokenforge.sampling_params import SamplingParams

RESULTS_DIR = Path(__file__).parent / "results"
NUM_WARMUP_PROMPTS = 2
NUM_WARMUP_TOKENS = 4
SENTENCES = [
    "The river wound slowly through the valley, past farms and quiet villages.",
    "Explain how a hash table handles collisions, with a short example.",
    "In 1969 the first humans walked on the Moon, watched by millions on television.",
    "A good cup of tea needs fresh water, the right temperature and patience.",
    "Write a haiku about autumn leaves falling on a mountain path.",
    "Compilers translate source code into machine instructions in several passes.",
    "The market opened early, and the smell of bread filled the narrow streets.",
    "List three reasons why regular exercise improves sleep quality.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "She packed her bag, locked the door and walked to the station in the rain.",
    "What is the difference between a process and a thread in an operating system?",
    "Old maps often marked unknown regions with sea monsters and blank spaces.",
]


@dataclass
class EngineResult:
    engine: str
    wall_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    load_s: float
    load_average_1m_after: float  # of the whole machine, read right after the timed run


def build_prompts(num_prompts: int) -> list[list[dict]]:
    """Chat conversations of 1-12 sentences each (about 20-200 tokens with the template)."""
    conversations = []
    for i in range(num_prompts):
        num_sentences = 1 + (i * 5) % len(SENTENCES)
        text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(num_sentences))
        conversations.append([{"role": "user", "content": text}])
    return conversations


def make_result(engine: str, wall_s: float, prompts: list[list[int]], num_output_tokens: int,
                load_s: float) -> EngineResult:
    num_prompt_tokens = sum(len(p) for p in prompts)
    return EngineResult(engine, wall_s, num_prompt_tokens, num_output_tokens, num_output_tokens / wall_s,
                        (num_prompt_tokens + num_output_tokens) / wall_s, load_s, os.getloadavg()[0])


def run_tokenforge(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall_s = time.perf_counter() - started
    token_ids = [out.outputs[0].token_ids for out in outputs]
    assert all(len(ids) == max_tokens for ids in token_ids), "tokenforge stopped early"
    return wall_s, token_ids


def bench_tokenforge(args, conversations: list[list[dict]]):
    """Returns the result, the prompts as token ids, the outputs, and the tokenizer."""
    started = time.perf_counter()
    llm = LLM(args.model, dtype="float32", block_size=args.block_size)
    load_s = time.perf_counter() - started
    prompts = [llm.apply_chat_template(c) for c in conversations]
    run_tokenforge(llm, prompts[:NUM_WARMUP_PROMPTS], NUM_WARMUP_TOKENS)
    wall_s, token_ids = run_tokenforge(llm, prompts, args.max_tokens)
    result = make_result("tokenforge", wall_s, prompts, args.max_tokens * len(prompts), load_s)
    return result, prompts, token_ids, llm.tokenizer


def hf_generate_batch(model, batch: list[list[int]], max_tokens: int, pad_id: int) -> list[list[int]]:
    """Left-pads one batch and generates exactly max_tokens per row (EOS held off by min_new_tokens)."""
    width = max(len(p) for p in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # [batch, width]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])  # [batch, width]
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad_id,
                             temperature=None, top_p=None, top_k=None)
    assert out.shape[1] == width + max_tokens, "transformers stopped early"
    return out[:, width:].tolist()


def run_hf(model, prompts: list[list[int]], max_tokens: int, batch_size: int, pad_id: int):
    started = time.perf_counter()
    token_ids = []
    for start in range(0, len(prompts), batch_size):
        token_ids += hf_generate_batch(model, prompts[start:start + batch_size], max_tokens, pad_id)
    return time.perf_counter() - started, token_ids


def bench_hf(args, gguf_path: Path, prompts: list[list[int]], pad_id: int) -> tuple[EngineResult, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    run_hf(model, prompts[:NUM_WARMUP_PROMPTS], NUM_WARMUP_TOKENS, NUM_WARMUP_PROMPTS, pad_id)
    wall_s, token_ids = run_hf(model, prompts, args.max_tokens, args.hf_batch_size, pad_id)
    return make_result("transformers", wall_s, prompts, args.max_tokens * len(prompts), load_s), token_ids


def divergences(tf_ids: list[list[int]], hf_ids: list[list[int]], eos_id: int) -> list[dict]:
    """Where greedy outputs first differ. transformers' min_new_tokens masks EOS while
    ignore_eos lets the engine emit it, so a divergence at an engine EOS is expected."""
    found = []
    for i, (a, b) in enumerate(zip(tf_ids, hf_ids)):
        pos = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if pos is not None:
            found.append({"prompt": i, "position": pos, "tokenforge_token": a[pos], "transformers_token": b[pos],
                          "tokenforge_token_is_eos": a[pos] == eos_id})
    return found


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.split(":", 1)[0].strip() == name), "")

    cpu_model = field("model name") or platform.processor()
    # "AMD EPYC" names several generations: family/model tell them apart (25/1: Zen 3), and the
    # vector extensions decide which kernels are fast (torch._int_mm ran 175 vs 2 G MAC/s on two).
    simd = sorted(flag for flag in field("flags").split() if flag.startswith(("avx", "amx")) or "vnni" in flag)
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    import transformers
    return {"cpu_model": cpu_model, "cpu_family_model": f"{field('cpu family')}/{field('model')}", "cpu_simd": simd,
            "num_cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
            "torch_version": torch.__version__, "torch_num_threads": torch.get_num_threads(),
            "transformers_version": transformers.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def write_result(kind: str, info: dict) -> Path:
    """Writes one run's JSON to benchmarks/results/<kind>-<UTC time>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def git_info() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def print_table(results: list[EngineResult], ratio: float, num_matching: int, num_prompts: int) -> None:
    header = ("engine", "wall s", "prompt tok", "output tok", "out tok/s", "total tok/s", "load s")
    print("\n{:<14}{:>9}{:>12}{:>12}{:>11}{:>13}{:>9}".format(*header))
    for r in results:
        print(f"{r.engine:<14}{r.wall_s:>9.2f}{r.num_prompt_tokens:>12}{r.num_output_tokens:>12}"
              f"{r.output_tokens_per_s:>11.1f}{r.total_tokens_per_s:>13.1f}{r.load_s:>9.1f}")
    loads = ", ".join(f"{r.engine} {r.load_average_1m_after:.2f}" for r in results)
    print(f"load average (1 min) right after each run: {loads}")
    print(f"\nratio tokenforge / transformers (output tok/s): {ratio:.2f}x")
    print(f"greedy outputs identical: {num_matching}/{num_prompts}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: --num-prompts")
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    args.hf_batch_size = args.hf_batch_size or args.num_prompts
    return args


def main() -> None:
    args = parse_args()
    info = {"machine": machine_info(), "git": git_info()}
    gguf_path = resolve_model(args.model)
    conversations = build_prompts(args.num_prompts)
    tf_result, prompts, tf_ids, tokenizer = bench_tokenforge(args, conversations)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.collect()  # the tokenforge engine (and its KV cache) goes before transformers loads
    hf_result, hf_ids = bench_hf(args, gguf_path, prompts, pad_id)
    ratio = tf_result.output_tokens_per_s / hf_result.output_tokens_per_s
    diverged = divergences(tf_ids, hf_ids, tokenizer.eos_token_id)
    num_matching = len(prompts) - len(diverged)
    print_table([tf_result, hf_result], ratio, num_matching, len(prompts))
    num_at_eos = sum(d["tokenforge_token_is_eos"] for d in diverged)
    print(f"of the {len(diverged)} that differ, {num_at_eos} first differ where tokenforge emitted EOS")
    lengths = [len(p) for p in prompts]
    info["config"] = {"model": args.model, "gguf_file": gguf_path.name, "num_prompts": args.num_prompts,
                      "max_tokens": args.max_tokens, "dtype": "float32", "hf_batch_size": args.hf_batch_size,
                      "block_size": args.block_size, "prompt_tokens_min_max": [min(lengths), max(lengths)],
                      "num_warmup_prompts": NUM_WARMUP_PROMPTS, "num_warmup_tokens": NUM_WARMUP_TOKENS}
    info["results"] = [asdict(tf_result), asdict(hf_result)]
    info["ratio_output_tokens_per_s"] = ratio
    info["num_greedy_outputs_identical"] = num_matching
    info["greedy_divergences"] = diverged
    info["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('throughput', info)}")


if __name__ == "__main__":
    main()
