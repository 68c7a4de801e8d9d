"""The overhead of the HTTP layer: the same chat prompts streamed through AsyncEngine.generate
directly and through a real `tokenforge` server on 127.0.0.1 (in this process over the same engine,
and as a `tokenforge serve` subprocess), all requests concurrent, greedy, ignore_eos so every
request streams exactly --max-tokens tokens. Runs interleave the paths (order rotated); each figure is the median
over --num-runs. Writes JSON to benchmarks/results/.
"""

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import uvicorn

from throughput import build_prompts, git_info, machine_info, write_result
from tokenforge.cli.engine_args import add_engine_args, engine_config_from_args
from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.engine.engine_core import EngineCore
from tokenforge.engine.factory import load
from tokenforge.engine.llm import LLM
from tokenforge.sampling_params import SamplingParams
from tokenforge.server.app import create_app

SERVED_NAME = "bench"
NUM_WARMUP_TOKENS = 4
SERVER_START_TIMEOUT_S = 300
PATHS = ("direct", "server-thread", "server-subprocess")


@dataclass
class StreamTiming:
    """One request, seen by its caller. Times from the moment the request was issued."""
    ttft_s: float
    decode_s: float  # first to last text-bearing delta
    num_output_tokens: int


@dataclass
class RunResult:
    path: str
    run: int
    wall_s: float
    num_output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_max_ms: float
    itl_mean_ms: float  # per request (last - first delta) / (tokens - 1), averaged over requests
    load_average_1m_after: float


def summarize(path: str, run: int, wall_s: float, timings: list[StreamTiming]) -> RunResult:
    num_tokens = sum(t.num_output_tokens for t in timings)
    ttfts = [t.ttft_s * 1e3 for t in timings]
    itls = [t.decode_s * 1e3 / (t.num_output_tokens - 1) for t in timings if t.num_output_tokens > 1]
    return RunResult(path, run, wall_s, num_tokens, num_tokens / wall_s, statistics.median(ttfts), max(ttfts),
                     statistics.fmean(itls), os.getloadavg()[0])


# -- the two kinds of client --

async def stream_direct(engine: AsyncEngine, request_id: str, prompt: list[int],
                        params: SamplingParams) -> StreamTiming:
    started = time.perf_counter()
    first = last = None
    num_tokens = 0
    async for out in engine.generate(request_id, prompt, params):
        num_tokens += len(out.new_token_ids)
        if out.new_text:
            last = time.perf_counter()
            first = first or last
    return StreamTiming(first - started, last - first, num_tokens)


async def stream_http(client: httpx.AsyncClient, body: dict) -> StreamTiming:
    """One streamed chat completion, SSE parsed by hand (the server's cost, not an SDK's)."""
    started = time.perf_counter()
    first = last = None
    num_tokens = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk["choices"]):
                last = time.perf_counter()
                first = first or last
    return StreamTiming(first - started, last - first, num_tokens)


async def run_direct(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[float, list]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    timings = await asyncio.gather(*(stream_direct(engine, f"{tag}-{i}", p, params) for i, p in enumerate(prompts)))
    return time.perf_counter() - started, timings


async def run_http(base_url: str, conversations: list[list[dict]], max_tokens: int) -> tuple[float, list]:
    limits = httpx.Limits(max_connections=len(conversations), max_keepalive_connections=len(conversations))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        bodies = [{"model": SERVED_NAME, "messages": c, "max_tokens": max_tokens, "temperature": 0.0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                  for c in conversations]
        started = time.perf_counter()
        timings = await asyncio.gather(*(stream_http(client, b) for b in bodies))
        return time.perf_counter() - started, timings


# -- the two kinds of server --

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, is_alive) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and is_alive():
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {base_url} did not become healthy")


@contextlib.contextmanager
def served(command: list[str], base_url: str, log_path: Path, log) -> Iterator[subprocess.Popen]:
    """Runs a server process (output to log_path) until the block ends, once /health answers; on an
    error in the block, shows the end of its log first."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_healthy(base_url, lambda: process.poll() is None)
            yield process
        except Exception:
            log(log_path.read_text()[-3000:])
            raise
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def start_thread_server(engine: AsyncEngine) -> tuple[str, uvicorn.Server, threading.Thread]:
    """uvicorn in a thread of this process, over the engine the direct path uses."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app({SERVED_NAME: engine}), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    wait_healthy(base_url, thread.is_alive)
    return base_url, server, thread


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine options of this run as `tokenforge serve` flags, so both servers match."""
    flags = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--load-format", args.load_format,
             "--block-size", str(args.block_size), "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--max-num-waiting", str(args.max_num_waiting)]
    for flag, value in (("--max-model-len", args.max_model_len), ("--kv-cache-memory", args.kv_cache_memory),
                        ("--cache-dir", args.cache_dir)):
        if value is not None:
            flags += [flag, str(value)]
    return flags + (["--no-prefix-caching"] if args.no_prefix_caching else [])


def start_subprocess_server(args: argparse.Namespace, log) -> tuple[str, subprocess.Popen, float]:
    port = free_port()
    command = [sys.executable, "-m", "tokenforge.cli.main", "serve", "--port", str(port), "--log-level", "warning",
               "--served-model-name", SERVED_NAME, *engine_flags(args)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    wait_healthy(base_url, lambda: process.poll() is None)
    return base_url, process, time.perf_counter() - started


# -- the run --

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-runs", type=int, default=3, help="timed runs of each path, interleaved")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    add_engine_args(parser)
    parser.add_argument("--prefix-caching", dest="no_prefix_caching", action="store_false",
                        help="turn the prefix cache on (off by default: every run then prefills the same work)")
    # Equal KV caches in both processes, whatever memory is free when each starts.
    parser.set_defaults(no_prefix_caching=True, kv_cache_memory=1 << 30)
    return parser.parse_args()


def median_by_path(results: list[RunResult]) -> dict[str, dict]:
    summary = {}
    for path in dict.fromkeys(r.path for r in results):
        runs = [r for r in results if r.path == path]
        summary[path] = {name: statistics.median(getattr(r, name) for r in runs)
                         for name in ("wall_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_max_ms", "itl_mean_ms")}
        summary[path]["num_output_tokens"] = runs[0].num_output_tokens
    return summary


def ratios_to_direct(summary: dict[str, dict]) -> dict[str, dict]:
    direct = summary.get("direct")
    if direct is None:
        return {}
    return {path: {name: values[name] / direct[name] for name in ("wall_s", "output_tokens_per_s", "ttft_p50_ms",
                                                                  "itl_mean_ms")}
            for path, values in summary.items() if path != "direct"}


def print_table(summary: dict[str, dict], ratios: dict[str, dict], num_runs: int) -> None:
    print(f"\nmedians over {num_runs} runs")
    print("{:<20}{:>9}{:>12}{:>11}{:>14}{:>14}".format("path", "wall s", "output tok", "out tok/s", "TTFT p50 ms",
                                                        "ITL mean ms"))
    for path, s in summary.items():
        print(f"{path:<20}{s['wall_s']:>9.3f}{s['num_output_tokens']:>12}{s['output_tokens_per_s']:>11.1f}"
              f"{s['ttft_p50_ms']:>14.1f}{s['itl_mean_ms']:>14.2f}")
    for path, r in ratios.items():
        print(f"{path} / direct: wall {r['wall_s']:.3f}x, tok/s {r['output_tokens_per_s']:.3f}x, "
              f"TTFT p50 {r['ttft_p50_ms']:.3f}x, ITL {r['itl_mean_ms']:.3f}x")


def run_all(args, engine: AsyncEngine, prompts, conversations, log) -> tuple[list[RunResult], dict]:
    """Warms every path up, then times them in turn, run after run."""
    servers = {}
    if "server-thread" in args.paths:
        servers["server-thread"] = start_thread_server(engine)
    if "server-subprocess" in args.paths:
        servers["server-subprocess"] = start_subprocess_server(args, log)
    try:
        def one(path: str, max_tokens: int, tag: str) -> tuple[float, list]:
            if path == "direct":
                return asyncio.run(run_direct(engine, prompts, max_tokens, tag))
            return asyncio.run(run_http(servers[path][0], conversations, max_tokens))

        for path in args.paths:
            one(path, NUM_WARMUP_TOKENS, f"warmup-{path}")
        results = []
        for run in range(args.num_runs):
            # Rotate the order, so no path always runs first (or right after the same one).
            shift = run % len(args.paths)
            for path in args.paths[shift:] + args.paths[:shift]:
                wall_s, timings = one(path, args.max_tokens, f"run{run}")
                assert all(t.num_output_tokens == args.max_tokens for t in timings), f"{path} stopped early"
                results.append(summarize(path, run, wall_s, timings))
                print(f"run {run} {path:<18} {wall_s:.3f} s", flush=True)
        start_s = servers["server-subprocess"][2] if "server-subprocess" in servers else None
        return results, {"subprocess_server_start_s": start_s}
    finally:
        if "server-thread" in servers:
            _, server, thread = servers["server-thread"]
            server.should_exit = True
            thread.join(15)
        if "server-subprocess" in servers:
            process = servers["server-subprocess"][1]
            process.terminate()
            process.wait(30)


def main() -> None:
    args = parse_args()
    info = {"machine": machine_info(), "git": git_info()}
    config = engine_config_from_args(args)
    started = time.perf_counter()
    loaded = load(config.model)
    load_s = time.perf_counter() - started
    engine = AsyncEngine(EngineCore(config, *loaded)).start()
    conversations = build_prompts(args.num_prompts)
    prompts = [LLM(engine=engine.core).apply_chat_template(c) for c in conversations]
    with tempfile.TemporaryFile("w+") as log:
        try:
            results, extra = run_all(args, engine, prompts, conversations, log)
        except Exception:
            log.seek(0)
            print(log.read()[-4000:], file=sys.stderr)  # the subprocess server's own account
            raise
        finally:
            engine.shutdown()
    summary = median_by_path(results)
    ratios = ratios_to_direct(summary)
    print_table(summary, ratios, args.num_runs)
    lengths = [len(p) for p in prompts]
    info["config"] = {"model": args.model, "device": str(loaded[2]), "dtype": str(loaded[1]),
                      "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "num_runs": args.num_runs,
                      "paths": args.paths, "prompt_tokens_min_max": [min(lengths), max(lengths)],
                      "num_prompt_tokens": sum(lengths), "kv_cache_memory_bytes": args.kv_cache_memory,
                      "prefix_caching": not args.no_prefix_caching, "block_size": args.block_size,
                      "max_num_seqs": args.max_num_seqs, "num_warmup_tokens": NUM_WARMUP_TOKENS,
                      "client": "httpx.AsyncClient, one connection per request, SSE parsed by hand",
                      "load_s": load_s, **extra}
    info["summary_median"] = summary
    info["ratio_server_to_direct"] = ratios
    info["runs"] = [asdict(r) for r in results]
    info["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('http-overhead', info)}")


if __name__ == "__main__":
    main()
