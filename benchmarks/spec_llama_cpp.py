"""llama.cpp's speculative decoding on the same GGUF pair, for benchmarks/spec_decode.py: its C++
`llama-server` (built by llama_cpp.py, cached outside the repository) with one slot, once plain
and once with the draft model (-md, --spec-type draft-simple, --spec-draft-n-max k), the same chat
prompts one at a time, greedy.
Decode tokens/s and draft counts are the server's own `timings` (generation only, no prompt, no
HTTP), the same span spec_decode.py times for tokenforge.
"""

import time
from pathlib import Path

import httpx

from http_overhead import free_port, served
from llama_cpp import LlamaCpp

CONTEXT = 4096


def server_command(llama: LlamaCpp, target: Path, draft: Path | None, port: int, k: int, threads: int) -> list[str]:
    command = [str(llama.server), "-m", str(target), "--host", "127.0.0.1", "--port", str(port), "--parallel", "1",
               "-c", str(CONTEXT), "-t", str(threads), "-tb", str(threads)]
    if draft is not None:
        command += ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(k),
                    "-td", str(threads)]
    return command


def complete(client: httpx.Client, base_url: str, text: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0.0,
            "stream": False}
    reply = client.post(f"{base_url}/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    data = reply.json()
    timings = data.get("timings", {})
    return {"text": data["choices"][0]["message"]["content"], "num_output_tokens": data["usage"]["completion_tokens"],
            "decode_tokens_per_s": timings.get("predicted_per_second"),
            "num_draft_tokens": timings.get("draft_n", 0), "num_accepted_tokens": timings.get("draft_n_accepted", 0)}


def run_server(command: list[str], port: int, prompts: dict[str, list[str]], max_tokens: int, log_path: Path,
               log) -> list[dict]:
    """Starts the server, sends each prompt alone (after a warm-up request), stops the server."""
    base_url = f"http://127.0.0.1:{port}"
    runs = []
    with served(command, base_url, log_path, log), httpx.Client() as client:
        complete(client, base_url, prompts["chat"][0], 4)
        for category, texts in prompts.items():
            for index, text in enumerate(texts):
                run = {"category": category, "prompt": index, **complete(client, base_url, text, max_tokens)}
                runs.append(run)
                log(f"llama.cpp {category} #{index} {run['num_output_tokens']:>4} tokens, decode "
                    f"{run['decode_tokens_per_s']:6.2f} tok/s, accepted {run['num_accepted_tokens']}/"
                    f"{run['num_draft_tokens']}")
    return runs


def summarize(runs: list[dict]) -> dict:
    """Per category: decode tok/s over all its prompts (tokens / summed generation time), acceptance."""
    summary = {}
    for category in sorted({r["category"] for r in runs}):
        mine = [r for r in runs if r["category"] == category]
        decoded = sum(r["num_output_tokens"] for r in mine)
        seconds = sum(r["num_output_tokens"] / r["decode_tokens_per_s"] for r in mine)
        drafted, accepted = sum(r["num_draft_tokens"] for r in mine), sum(r["num_accepted_tokens"] for r in mine)
        summary[category] = {"decode_tokens_per_s": decoded / seconds,
                             "acceptance_rate": accepted / drafted if drafted else None,
                             "num_draft_tokens": drafted, "num_accepted_tokens": accepted}
    return summary


def bench_llama_cpp(llama: LlamaCpp, target: Path, draft: Path, prompts: dict[str, list[str]], max_tokens: int,
                    k: int, threads: int, log_dir: Path, log) -> dict:
    """Plain and speculating llama-server on the same prompts; speed-up per category."""
    result = {"version": llama.version(), "k": k}
    for method, draft_path in (("plain", None), ("draft", draft)):
        port = free_port()
        command = server_command(llama, target, draft_path, port, k, threads)
        log(f"llama.cpp {method}: {' '.join(command)}")
        started = time.perf_counter()
        runs = run_server(command, port, prompts, max_tokens, log_dir / f"llama_{method}.log", log)
        result[method] = {"runs": runs, "summary": summarize(runs), "wall_s": time.perf_counter() - started}
    for category, row in result["draft"]["summary"].items():
        row["speedup"] = row["decode_tokens_per_s"] / result["plain"]["summary"][category]["decode_tokens_per_s"]
    return result
