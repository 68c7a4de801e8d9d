"""Serving peers on the same GGUF, on 127.0.0.1, one after the other in one invocation, under the same
`tokenforge bench` load (streamed chat requests, a concurrency sweep): tokenforge (`tokenforge serve
--no-control-plane`, defaults) and llama.cpp's own C++ server (`llama-server`, continuous batching
over --parallel slots) on the GGUF as pulled (Q4_1) and requantized to Q4_0 and Q8_0, its fast CPU
paths; the best of them is compared. Offline rows: tokenforge's engine in process and Hugging Face
transformers' batched generate. Each server's RSS is polled; a level during which other processes
were busy is run again, and marked disturbed if it stays so. Writes JSON and a PNG to
benchmarks/results/ and prints the ratios. llama.cpp is built on first use (see llama_cpp.py).
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from http_overhead import free_port, served
from llama_cpp import LlamaCpp, default_cache_dir, ensure_llama_cpp, quantized_model, server_command
from throughput import git_info, hf_generate_batch, machine_info, write_result
from tokenforge.bench.client import HttpClient
from tokenforge.bench.monitor import LoadMonitor
from tokenforge.bench.prompts import make_prompt_set
from tokenforge.bench.report import format_table, write_plot
from tokenforge.bench.sweep import SweepConfig, is_disturbed, run_sweep
from tokenforge.model.pull import resolve_model

CTX_PER_SLOT = {"short": 512, "long": 2048, "shared": 2048}  # a prompt of the set + 128 tokens fit a slot
LLAMA_QUANTS = ("Q4_1", "Q4_0", "Q8_0")


@dataclass
class ServerRun:
    label: str
    command: list[str]
    levels: list[dict]
    start_s: float  # process start until /health answered 200
    vm_hwm_bytes: int | None  # the kernel's peak RSS of the process, read before it stops


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sweep_config(args: argparse.Namespace, concurrency: tuple[int, ...]) -> SweepConfig:
    return SweepConfig(prompts=args.prompts, concurrency=concurrency, num_requests=args.num_requests,
                       requests_per_stream=args.requests_per_stream, max_tokens=args.max_tokens, seed=args.seed,
                       max_other_cpu_cores=args.max_other_cpu, max_attempts=args.max_attempts,
                       quiet_wait_s=args.quiet_wait_s)


def vm_hwm_bytes(pid: int) -> int | None:
    try:
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


async def sweep_server(base_url: str, args: argparse.Namespace, config: SweepConfig, pid: int) -> list[dict]:
    async with HttpClient(f"{base_url}/v1", args.model, config.max_tokens,
                          max_connections=max(config.concurrency)) as client:
        await client.check()
        return await run_sweep(client.send, config, server_pid=pid, log=log)


def run_server(label: str, command: list[str], port: int, args, concurrency: tuple[int, ...],
               log_dir: Path) -> ServerRun:
    """Starts the server, sweeps it, stops it; its output goes to a log shown if anything fails."""
    log(f"{label}: {' '.join(command)}")
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{label.replace(' ', '_')}.log"
    started = time.perf_counter()
    with served(command, base_url, log_path, log) as process:
        start_s = time.perf_counter() - started
        levels = asyncio.run(sweep_server(base_url, args, sweep_config(args, concurrency), process.pid))
        hwm = vm_hwm_bytes(process.pid)
    return ServerRun(label, command, levels, start_s, hwm)


def tokenforge_command(args, port: int, quantization: str = "auto") -> list[str]:
    return [sys.executable, "-m", "tokenforge.cli.main", "serve", "--no-control-plane", "--port", str(port),
            "--log-level", "warning", "--model", args.model, "--quantization", quantization]


def run_llama(llama: LlamaCpp, gguf: Path, args, log_dir: Path) -> dict[str, list[ServerRun]]:
    """Per quantization: one server with --parallel max(16, c) for each group of levels c."""
    runs = {}
    for qtype in args.quants:
        model = quantized_model(llama, gguf, qtype, args.cache_dir)
        groups: dict[int, list[int]] = {}
        for concurrency in args.concurrency:
            groups.setdefault(max(args.llama_parallel, concurrency), []).append(concurrency)
        runs[qtype] = []
        for parallel, levels in groups.items():
            port = free_port()
            command = server_command(llama, model, port, parallel=parallel, ctx_per_slot=CTX_PER_SLOT[args.prompts],
                                     threads=args.threads, alias=args.model)
            runs[qtype].append(run_server(f"llama.cpp {qtype} np{parallel}", command, port, args, tuple(levels),
                                          log_dir))
    return runs


def run_tokenforge_offline(args, tmp_dir: Path) -> list[dict]:
    """`tokenforge bench --offline` in a subprocess (its own process: its RSS, its CPU)."""
    out = tmp_dir / "offline.json"
    command = [sys.executable, "-m", "tokenforge.cli.main", "bench", "--offline", "--model", args.model,
               "--prompts", args.prompts, "--concurrency", ",".join(map(str, args.offline_concurrency)),
               "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--json", str(out),
               "--max-attempts", str(args.max_attempts)]
    command += ["--num-requests", str(args.num_requests)] if args.num_requests else \
        ["--requests-per-stream", str(args.requests_per_stream)]
    if args.max_other_cpu is not None:
        command += ["--max-other-cpu", str(args.max_other_cpu)]
    log("tokenforge offline: " + " ".join(command))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["levels"]


def run_transformers(gguf: Path, args) -> list[dict]:
    """transformers' batched generate (static batch, left-padded), one batch per level, greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenforge.config import default_cache_dir as tokenforge_cache_dir
    from tokenforge.model.gguf_file import load_tokenizer

    tokenizer = load_tokenizer(gguf, tokenforge_cache_dir())
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(conversation: list[dict]) -> list[int]:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    hf_generate_batch(model, [encode(c) for c in make_prompt_set(args.prompts, 2, seed="warmup")], 4, pad_id)
    levels = []
    for batch_size in args.offline_concurrency:
        prompts = [encode(c) for c in make_prompt_set(args.prompts, batch_size, seed=f"{args.seed}-hf")]
        with LoadMonitor(os.getpid()) as monitor:
            hf_generate_batch(model, prompts, args.max_tokens, pad_id)
        wall_s = monitor.output.wall_s
        level = {"concurrency": batch_size, "num_requests": batch_size, "wall_s": wall_s,
                 "num_output_tokens": batch_size * args.max_tokens,
                 "output_tokens_per_s": batch_size * args.max_tokens / wall_s, "load_s": load_s,
                 "monitor": asdict(monitor.output)}
        level["disturbed"] = is_disturbed(level, args.max_other_cpu)
        log(f"  transformers batch {batch_size}: {level['output_tokens_per_s']:.1f} out tok/s, other processes "
            f"{monitor.output.other_cpu_cores:.2f} cores")
        levels.append(level)
    return levels


def decode_tokens_per_s(level: dict) -> float | None:
    tpot = level["tpot_ms"]["p50"]
    return None if not tpot else 1e3 / tpot


def compare(tokenforge: list[dict], llama: dict[str, list[dict]]) -> dict:
    """Per level: tokenforge / best llama.cpp quantization (throughput: the highest; TTFT: the
    lowest), decode speed (1 / TPOT p50) against Q4_1 (the same file) and the best, peak RSS."""
    comparison = {}
    for tf in tokenforge:
        c = tf["concurrency"]
        peers = {q: next(lv for lv in levels if lv["concurrency"] == c) for q, levels in llama.items()}
        best = max(peers, key=lambda q: peers[q]["output_tokens_per_s"])
        fastest = min(peers, key=lambda q: peers[q]["ttft_ms"]["p50"])
        decode = {q: decode_tokens_per_s(lv) for q, lv in peers.items()}
        best_decode = max(decode, key=lambda q: decode[q] or 0)
        tf_decode = decode_tokens_per_s(tf)
        comparison[str(c)] = {
            "tokenforge_output_tokens_per_s": tf["output_tokens_per_s"],
            "llama_output_tokens_per_s": {q: lv["output_tokens_per_s"] for q, lv in peers.items()},
            "best_llama_quant": best,
            "ratio_output_tokens_per_s": tf["output_tokens_per_s"] / peers[best]["output_tokens_per_s"],
            "tokenforge_ttft_p50_ms": tf["ttft_ms"]["p50"],
            "llama_ttft_p50_ms": {q: lv["ttft_ms"]["p50"] for q, lv in peers.items()},
            "ratio_ttft_p50_to_fastest": tf["ttft_ms"]["p50"] / peers[fastest]["ttft_ms"]["p50"],
            "tokenforge_decode_tokens_per_s": tf_decode,
            "llama_decode_tokens_per_s": decode,
            "ratio_decode_to_q4_1": tf_decode / decode["Q4_1"] if "Q4_1" in decode and tf_decode else None,
            "ratio_decode_to_best": tf_decode / decode[best_decode] if tf_decode and decode[best_decode] else None,
            "tokenforge_peak_rss_mib": _mib(tf["monitor"]["server_peak_rss_bytes"]),
            "llama_peak_rss_mib": {q: _mib(lv["monitor"]["server_peak_rss_bytes"]) for q, lv in peers.items()},
            "disturbed": tf["disturbed"] or any(lv["disturbed"] for lv in peers.values()),
        }
    return comparison


def _mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else round(num_bytes / 2**20, 1)


def targets(comparison: dict) -> dict:
    """Issue 5's targets, where the sweep has the level they name."""
    found = {}
    for c in ("16", "64"):
        if c in comparison:
            found[f"output_tokens_per_s_at_{c} >= 2x llama.cpp"] = comparison[c]["ratio_output_tokens_per_s"] >= 2
    if "16" in comparison:
        found["ttft_p50_at_16 <= 0.5x llama.cpp"] = comparison["16"]["ratio_ttft_p50_to_fastest"] <= 0.5
    if "1" in comparison and comparison["1"]["ratio_decode_to_q4_1"] is not None:
        found["single_stream_decode >= 0.8x llama.cpp Q4_1"] = comparison["1"]["ratio_decode_to_q4_1"] >= 0.8
    return found


def print_comparison(comparison: dict) -> None:
    print("\ntokenforge / llama.cpp (best quantization per level)")
    print(f"{'conc':>5}{'out tok/s x':>13}{'best':>7}{'TTFT p50 x':>12}{'decode x Q4_1':>15}{'decode x best':>15}"
          f"{'RSS MiB tf':>12}{'RSS MiB llama':>15}{'disturbed':>11}")
    for c, v in comparison.items():
        rss = v["llama_peak_rss_mib"][v["best_llama_quant"]]
        print(f"{c:>5}{v['ratio_output_tokens_per_s']:>13.2f}{v['best_llama_quant']:>7}"
              f"{v['ratio_ttft_p50_to_fastest']:>12.2f}{_x(v['ratio_decode_to_q4_1']):>15}"
              f"{_x(v['ratio_decode_to_best']):>15}{v['tokenforge_peak_rss_mib']:>12}{rss:>15}"
              f"{str(v['disturbed']):>11}")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalog name or a .gguf file")
    parser.add_argument("--prompts", default="short", choices=sorted(CTX_PER_SLOT))
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda t: tuple(int(x) for x in t.split(",")))
    parser.add_argument("--num-requests", type=int, default=None,
                        help="per level (default: max(8, --requests-per-stream x concurrency))")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quants", default=",".join(LLAMA_QUANTS), type=lambda t: tuple(t.split(",")))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's -t and -tb")
    parser.add_argument("--llama-parallel", type=int, default=16, help="fewest slots (--parallel) of llama-server")
    parser.add_argument("--offline-concurrency", default="16", type=lambda t: tuple(int(x) for x in t.split(",")))
    parser.add_argument("--skip", default="", type=lambda t: set(filter(None, t.split(","))),
                        help="any of tokenforge,llama,offline,transformers")
    parser.add_argument("--max-other-cpu", type=float, default=0.3, metavar="CORES",
                        help="a level during which other processes used more CPU than this is disturbed")
    parser.add_argument("--max-attempts", type=int, default=2, help="runs of a disturbed level")
    parser.add_argument("--quiet-wait-s", type=float, default=30.0, help="wait up to this long for a quiet machine")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="llama.cpp build and models")
    parser.add_argument("--tokenforge-also", default="", type=lambda t: tuple(filter(None, t.split(","))),
                        help="also serve tokenforge with these --quantization values (e.g. int4), as extra series")
    parser.add_argument("--notes", default="")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server being measured
    info = {"machine": machine_info(), "git": git_info(), "notes": args.notes}
    gguf = resolve_model(args.model)
    llama = None if "llama" in args.skip else ensure_llama_cpp(args.cache_dir)
    series, servers, offline = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="tf-peers-") as tmp:
        tmp_dir = Path(tmp)
        if "tokenforge" not in args.skip:
            port = free_port()
            run = run_server("tokenforge", tokenforge_command(args, port), port, args, args.concurrency, tmp_dir)
            servers.append(run)
            series["tokenforge"] = run.levels
            for quantization in args.tokenforge_also:  # other quantizations, beside the default's series
                port = free_port()
                run = run_server(f"tokenforge {quantization}", tokenforge_command(args, port, quantization), port,
                                 args, args.concurrency, tmp_dir)
                servers.append(run)
                series[f"tokenforge {quantization}"] = run.levels
        llama_runs = {} if llama is None else run_llama(llama, gguf, args, tmp_dir)
        for qtype, runs in llama_runs.items():
            servers.extend(runs)
            levels = (lv for run in runs for lv in run.levels)
            series[f"llama.cpp {qtype}"] = sorted(levels, key=lambda lv: lv["concurrency"])
        if "offline" not in args.skip:
            offline["tokenforge"] = run_tokenforge_offline(args, tmp_dir)
    if "transformers" not in args.skip:
        offline["transformers"] = run_transformers(gguf, args)
    print(format_table(series))
    for name, levels in offline.items():
        for lv in levels:
            print(f"offline {name:<13} batch {lv['concurrency']:>3}: {lv['output_tokens_per_s']:8.1f} out tok/s "
                  f"(other processes {lv['monitor']['other_cpu_cores']:.2f} cores)")
    llama_series = {k.removeprefix("llama.cpp "): v for k, v in series.items() if k.startswith("llama.cpp")}
    comparison = compare(series["tokenforge"], llama_series) if "tokenforge" in series and llama_series else {}
    if comparison:
        print_comparison(comparison)
        for target, met in targets(comparison).items():
            print(f"target {target}: {'met' if met else 'NOT met'}")
    info["config"] = {**asdict(sweep_config(args, args.concurrency)), "model": args.model, "gguf_file": gguf.name,
                      "quants": args.quants, "llama_threads": args.threads, "llama_min_parallel": args.llama_parallel,
                      "llama_ctx_per_slot": CTX_PER_SLOT[args.prompts], "offline_concurrency": args.offline_concurrency,
                      "client": "tokenforge.bench: httpx.AsyncClient streaming in this process, SSE parsed by hand"}
    info["llama_cpp"] = None if llama is None else {"llama_cpp_python_sdist": llama.llama_cpp_python_version,
                                                    "version": llama.version()}
    info["servers"] = [{**asdict(run), "command": [Path(part).name if "/" in part else part for part in run.command]}
                       for run in servers]
    info["offline"] = offline
    info["comparison"] = comparison
    info["targets"] = targets(comparison) if comparison else {}
    info["num_disturbed_levels"] = sum(lv["disturbed"] for levels in [*series.values(), *offline.values()]
                                       for lv in levels)
    path = write_result("peers", info)
    plot = write_plot(series, path.with_suffix(".png"), title=f"{args.model}, {args.prompts} prompts, "
                      f"{args.max_tokens} tokens, {info['machine']['num_cores']} cores, commit {info['git']['commit']}")
    print(f"wrote {path} and {plot}")


if __name__ == "__main__":
    main()
