"""`tokenforge bench`: a serving benchmark against any OpenAI-compatible endpoint (tokenforge,
llama.cpp's llama-server, vLLM ...), or with --offline against the engine in this process. A sweep
over concurrency levels of streamed chat requests from a fixed prompt set: output tokens/s,
requests/s, time to first token and inter-token latency (p50/p90/p99), as a table, JSON and a plot.
"""

import argparse
import asyncio
import os
import sys
from dataclasses import asdict
from pathlib import Path

from tokenforge.bench.prompts import PROMPT_SETS
from tokenforge.cli.engine_args import add_engine_args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    """'1,4,16,64' -> (1, 4, 16, 64)."""
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="serving benchmark of an OpenAI-compatible endpoint or the engine",
                                   description=__doc__)
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the endpoint, ending in /v1 "
                        "(default: %(default)s); --model is the name sent as `model`")
    target.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY, else none)")
    target.add_argument("--offline", action="store_true",
                        help="no HTTP: load --model with the engine options below into this process")
    target.add_argument("--server-pid", type=int, default=None,
                        help="the server's process, when it runs on this machine: its CPU use and peak RSS "
                             "are recorded, and the CPU of other processes is told apart from it")
    load = parser.add_argument_group("load")
    load.add_argument("--prompts", default="short", choices=PROMPT_SETS,
                      help="; ".join(f"{name}: {text}" for name, text in PROMPT_SETS.items()))
    load.add_argument("--concurrency", type=_int_list, default=(1, 4, 16, 64),
                      help="streams in flight, one level after another (default: 1,4,16,64)")
    load.add_argument("--num-requests", type=_positive_int, default=None,
                      help="requests per level (default: max(8, --requests-per-stream x concurrency))")
    load.add_argument("--requests-per-stream", type=_positive_int, default=2,
                      help="without --num-requests: requests each stream sends, one after the other (default 2)")
    load.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals at this many requests/s, capped by --concurrency (default: all at once)")
    load.add_argument("--max-tokens", type=_positive_int, default=128)
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                      help="let requests stop at EOS (default: ignore_eos, so every request makes --max-tokens)")
    load.add_argument("--num-warmup-requests", type=int, default=2)
    load.add_argument("--seed", type=int, default=0, help="of the prompt set and the arrival times")
    load.add_argument("--max-other-cpu", type=float, default=None, metavar="CORES",
                      help="a level during which other processes used more CPU than this is disturbed "
                           "(with --server-pid or --offline)")
    load.add_argument("--max-attempts", type=_positive_int, default=1, help="runs of a disturbed level")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the report as JSON")
    out.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="draw the sweep")
    out.add_argument("--label", default=None, help="the target's name in the table and plot")
    add_engine_args(parser)
    return parser


def sweep_config_from_args(args: argparse.Namespace):
    from tokenforge.bench.sweep import SweepConfig

    return SweepConfig(prompts=args.prompts, concurrency=args.concurrency, num_requests=args.num_requests,
                       requests_per_stream=args.requests_per_stream, max_tokens=args.max_tokens,
                       request_rate=args.request_rate, num_warmup_requests=args.num_warmup_requests, seed=args.seed,
                       max_other_cpu_cores=args.max_other_cpu, max_attempts=args.max_attempts)


async def _run_http(args: argparse.Namespace, config) -> list[dict]:
    from tokenforge.bench.client import HttpClient
    from tokenforge.bench.sweep import run_sweep

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    async with HttpClient(args.url, args.model, config.max_tokens, api_key=api_key, ignore_eos=args.ignore_eos,
                          max_connections=max(config.concurrency)) as client:
        await client.check()
        return await run_sweep(client.send, config, server_pid=args.server_pid, log=_log)


async def _run_offline(args: argparse.Namespace, config) -> list[dict]:
    from tokenforge.bench.offline import OfflineClient
    from tokenforge.bench.sweep import run_sweep
    from tokenforge.cli.engine_args import engine_config_from_args
    from tokenforge.engine.async_engine import AsyncEngine
    from tokenforge.engine.factory import build_engine_core

    engine_config = engine_config_from_args(args)
    engine = AsyncEngine.build(lambda: build_engine_core(engine_config))
    try:
        client = OfflineClient(engine, config.max_tokens, ignore_eos=args.ignore_eos)
        # The engine runs in this process: its CPU is the client's, not another process's.
        return await run_sweep(client.send, config, server_pid=os.getpid(), log=_log)
    finally:
        engine.shutdown()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from tokenforge.bench.monitor import environment
    from tokenforge.bench.report import format_table, make_report, write_plot

    config = sweep_config_from_args(args)
    target = f"offline {args.model}" if args.offline else args.url
    _log(f"tokenforge bench: {target}, prompts {config.prompts}, concurrency {','.join(map(str, config.concurrency))}")
    levels = asyncio.run(_run_offline(args, config) if args.offline else _run_http(args, config))
    label = args.label or ("tokenforge offline" if args.offline else args.model)
    series = {label: levels}
    print(format_table(series))
    run_config = {**asdict(config), "target": target, "model": args.model, "offline": args.offline,
                  "ignore_eos": args.ignore_eos, "label": label}
    report = make_report(run_config, levels, environment())
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(series, args.plot, title=f"{label}: {config.prompts} prompts, {config.max_tokens} tokens")
        _log(f"wrote {args.plot}")
    num_errors = sum(level["num_errors"] for level in levels)
    if num_errors:
        first = next(e for level in levels for e in level["errors"])
        _log(f"{num_errors} requests failed; the first: {first}")
        return 1
    return 0
