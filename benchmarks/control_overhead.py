"""The overhead of the control plane per request (key check, per-minute limits, reservation, usage
record): the same load of short non-streaming chat requests against `tokenforge serve` subprocesses
on 127.0.0.1 with --no-control-plane, with the control plane on a SQLite store, and on PostgreSQL
(a database created and dropped here, if the server is reachable). Runs interleave the servers
(order rotated per repetition). Writes JSON to benchmarks/results/.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict

from http_overhead import free_port, wait_healthy
from throughput import SENTENCES, git_info, machine_info, write_result
from tokenforge.control.keys import KEY_PATTERN

MODEL = "smollm2-135m-instruct"
NUM_WARMUP_REQUESTS = 16
BUSY_PROCESS_PERCENT = 10.0  # another process above this much of one core counts as heavy
# One tier with limits no run comes near: the limiter and the reservation still do all their work.
PRICING_TOML = """
[[tiers]]
name = "bench"
min_paid = 0
monthly_limit = 1_000_000
requests_per_minute = 10_000_000
tokens_per_minute = 10_000_000_000
"""


@dataclass
class Server:
    config: str  # "no-control-plane" | "sqlite" | "postgresql"
    process: subprocess.Popen
    base_url: str
    database_url: str | None
    key: str | None = None  # the inference key of the benchmark's organisation


@dataclass
class RunResult:
    config: str
    max_tokens: int
    repetition: int
    wall_s: float
    requests_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    load_average_1m_after: float


# -- the servers --

def start_server(config: str, args, database_url: str | None, tmp_dir: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "tokenforge.cli.main", "serve", "--port", str(port), "--host", "127.0.0.1",
               "--log-level", "warning", "--device", "cpu", "--dtype", "float32",
               "--kv-cache-memory", args.kv_cache_memory]
    if database_url is None:
        command.append("--no-control-plane")
    else:
        pricing = tmp_dir / "pricing.toml"
        pricing.write_text(PRICING_TOML)
        command += ["--auth", "on", "--database-url", database_url, "--pricing", str(pricing)]
    log = (tmp_dir / f"{config}.log").open("w")
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Server(config, process, f"http://127.0.0.1:{port}", database_url)


def bootstrap_key(log_text: str) -> str:
    """The operator key `tokenforge serve` prints once on stderr."""
    for word in log_text.split():
        if KEY_PATTERN.match(word):
            return word
    raise RuntimeError(f"no bootstrap admin key in the server's output:\n{log_text[-2000:]}")


def make_org_key(server: Server, tmp_dir: Path) -> str:
    admin_key = bootstrap_key((tmp_dir / f"{server.config}.log").read_text())
    with httpx.Client(base_url=server.base_url, timeout=30, headers={"authorization": f"Bearer {admin_key}"}) as admin:
        org = admin.post("/v1/organizations", json={"name": "bench"}).raise_for_status().json()
        key = admin.post("/v1/keys", json={"organization": org["id"], "scopes": ["inference"]}).raise_for_status()
        return key.json()["key"]


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


def count_usage_records(database_url: str) -> int:
    from sqlalchemy import func, select

    from tokenforge.control.store.db import open_store
    from tokenforge.control.store.models import UsageRecord

    store = open_store(database_url)
    try:
        with store.transaction() as db:
            return db.scalar(select(func.count()).select_from(UsageRecord))
    finally:
        store.close()


def create_pg_database(dsn: str) -> tuple[str, str] | None:
    """(database name, SQLAlchemy URL) of a fresh PostgreSQL database, or None if none is reachable."""
    name = f"tf_bench_{os.getpid()}_{int(time.time())}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        print(f"PostgreSQL not reachable ({exc}): skipping that configuration", file=sys.stderr)
        return None
    parts = conninfo_to_dict(dsn)
    password = f":{parts['password']}" if parts.get("password") else ""
    url = f"postgresql://{parts.get('user', 'postgres')}{password}@{parts.get('host', '127.0.0.1')}:" \
          f"{parts.get('port', 5432)}/{name}"
    return name, url


def drop_pg_database(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the load --

def busy_processes(interval_s: float = 1.0) -> dict:
    """CPU use of every other process over `interval_s`: the heavy ones, and the total in cores."""
    own = {os.getpid()}
    processes = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in own]
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval_s)
    heavy, total = [], 0.0
    for process in processes:
        try:
            percent = process.cpu_percent(None)
        except psutil.Error:
            continue
        total += percent
        if percent >= BUSY_PROCESS_PERCENT:
            heavy.append({"pid": process.pid, "cpu_percent": percent,
                          "command": " ".join(process.info["cmdline"] or [process.info["name"]])[:160]})
    return {"other_processes_cpu_percent_total": round(total, 1), "heavy_processes": heavy,
            "load_average": os.getloadavg()}


def chat_body(i: int, max_tokens: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": SENTENCES[i % len(SENTENCES)]}],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


async def run_load(server: Server, num_requests: int, concurrency: int, max_tokens: int) -> tuple[float, list[float]]:
    """`num_requests` chat completions, `concurrency` at a time: the wall time and each one's latency (s)."""
    headers = {"authorization": f"Bearer {server.key}"} if server.key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=120, limits=limits) as client:
        async def one(i: int) -> float:
            async with semaphore:
                started = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=chat_body(i, max_tokens))
                response.raise_for_status()
                assert response.json()["usage"]["completion_tokens"] == max_tokens
                return time.perf_counter() - started

        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(num_requests)))
        return time.perf_counter() - started, list(latencies)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# -- the control plane alone, in this process --

def cost_per_request(database_url: str, tmp_dir: Path, num_requests: int) -> dict:
    """Wall and CPU ms per request of each control-plane step (key check, admission, usage record),
    one request after another on an otherwise idle store: what a request pays when nothing queues."""
    import uuid

    from tokenforge.config import ControlConfig
    from tokenforge.control import audit, keys, organizations
    from tokenforge.control.metering import Usage
    from tokenforge.control.plane import ControlPlane
    from tokenforge.control.pricing import ModelFacts

    pricing = tmp_dir / "pricing.toml"
    pricing.write_text(PRICING_TOML)
    plane, _ = ControlPlane.open(ControlConfig(database_url=database_url, pricing_path=pricing, data_dir=tmp_dir))
    try:
        with plane.store.transaction() as db:
            org = organizations.create_org(db, f"cost-{uuid.uuid4().hex[:8]}", audit.CLI, plane.ladder)
            plaintext = keys.create_key(db, org.id, audit.CLI)[1]
        model = ModelFacts(MODEL, 135_000_000)
        steps = {
            "authenticate": lambda i, state: state.update(principal=plane.authenticate(plaintext, "inference")),
            "admit": lambda i, state: state.update(admission=plane.admit(
                state["principal"], f"cost-{i}-{uuid.uuid4().hex}", model, "chat", 30, 8).result()),
            "settle": lambda i, state: plane.settle(state["admission"].metered, Usage(30, 0, 8), "ok").result(),
        }
        wall = dict.fromkeys(steps, 0.0)
        cpu = dict.fromkeys(steps, 0.0)
        for i in range(num_requests + NUM_WARMUP_REQUESTS):
            state = {}
            for name, step in steps.items():
                started_wall, started_cpu = time.perf_counter(), time.process_time()
                step(i, state)
                if i >= NUM_WARMUP_REQUESTS:
                    wall[name] += time.perf_counter() - started_wall
                    cpu[name] += time.process_time() - started_cpu
    finally:
        plane.close()
    result = {f"{name}_ms": round(wall[name] / num_requests * 1e3, 3) for name in steps}
    result |= {f"{name}_cpu_ms": round(cpu[name] / num_requests * 1e3, 3) for name in steps}
    result["total_ms"] = round(sum(wall.values()) / num_requests * 1e3, 3)
    result["total_cpu_ms"] = round(sum(cpu.values()) / num_requests * 1e3, 3)
    return result


# -- the run --

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[8, 1],
                        help="one load per value; 1 shows the per-request overhead best")
    parser.add_argument("--num-reps", type=int, default=3, help="timed runs of each server and load, interleaved")
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--pg-dsn", default=os.environ.get("TOKENFORGE_BENCH_PG_DSN",
                                                           "host=127.0.0.1 port=5432 user=postgres dbname=postgres"),
                        help="libpq DSN of a PostgreSQL server to create the benchmark's database on")
    parser.add_argument("--no-postgresql", action="store_true")
    parser.add_argument("--num-cost-requests", type=int, default=500,
                        help="requests for the in-process cost per request of each step (0: skip)")
    parser.add_argument("--notes", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    return parser.parse_args()


def summarize(results: list[RunResult], latencies: dict) -> dict:
    """Per load and server: median requests/s over the repetitions, p50/p90 over every request;
    then each control-plane server against no-control-plane."""
    summary = {}
    for max_tokens in dict.fromkeys(r.max_tokens for r in results):
        per_config = {}
        for config in dict.fromkeys(r.config for r in results):
            runs = [r for r in results if r.config == config and r.max_tokens == max_tokens]
            pooled = latencies[(config, max_tokens)]
            per_config[config] = {"requests_per_s_median": statistics.median(r.requests_per_s for r in runs),
                                  "latency_p50_ms": percentile(pooled, 50) * 1e3,
                                  "latency_p90_ms": percentile(pooled, 90) * 1e3,
                                  "num_requests": len(pooled)}
        base = per_config["no-control-plane"]
        for config, values in per_config.items():
            if config != "no-control-plane":
                values["ratio_requests_per_s_to_none"] = values["requests_per_s_median"] / base["requests_per_s_median"]
                values["ratio_latency_p50_to_none"] = values["latency_p50_ms"] / base["latency_p50_ms"]
                values["added_latency_p50_ms"] = values["latency_p50_ms"] - base["latency_p50_ms"]
        summary[f"max_tokens={max_tokens}"] = per_config
    return summary


def print_table(summary: dict) -> None:
    print("\n{:<14}{:<19}{:>8}{:>10}{:>10}{:>10}{:>10}{:>12}".format(
        "load", "server", "req/s", "p50 ms", "p90 ms", "req/s x", "p50 x", "+p50 ms"))
    for load, per_config in summary.items():
        for config, v in per_config.items():
            extra = ("{:>10.3f}{:>10.3f}{:>12.1f}".format(v["ratio_requests_per_s_to_none"],
                                                          v["ratio_latency_p50_to_none"], v["added_latency_p50_ms"])
                     if "added_latency_p50_ms" in v else "")
            print(f"{load:<14}{config:<19}{v['requests_per_s_median']:>8.2f}{v['latency_p50_ms']:>10.1f}"
                  f"{v['latency_p90_ms']:>10.1f}{extra}")


def run_all(args, servers: list[Server]) -> tuple[list[RunResult], dict]:
    for server in servers:  # warm-up: first requests pay for lazy imports, caches, connections
        asyncio.run(run_load(server, NUM_WARMUP_REQUESTS, args.concurrency, max(args.max_tokens)))
    results, latencies = [], {}
    for repetition in range(args.num_reps):
        shift = repetition % len(servers)
        for max_tokens in args.max_tokens:
            for server in servers[shift:] + servers[:shift]:
                wall_s, times = asyncio.run(run_load(server, args.num_requests, args.concurrency, max_tokens))
                latencies.setdefault((server.config, max_tokens), []).extend(times)
                results.append(RunResult(server.config, max_tokens, repetition, wall_s, args.num_requests / wall_s,
                                         percentile(times, 50) * 1e3, percentile(times, 90) * 1e3,
                                         os.getloadavg()[0]))
                print(f"rep {repetition} max_tokens {max_tokens} {server.config:<17} {wall_s:6.2f} s "
                      f"{args.num_requests / wall_s:6.2f} req/s", flush=True)
    return results, latencies


def main() -> None:
    args = parse_args()
    before = busy_processes()
    if before["heavy_processes"]:
        print(f"warning: other processes are busy: {before['heavy_processes']}", file=sys.stderr)
    info = {"machine": machine_info(), "git": git_info(), "before": before}
    pg = None if args.no_postgresql else create_pg_database(args.pg_dsn)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tf-control-bench-") as tmp:
        tmp_dir = Path(tmp)
        try:
            configs = [("no-control-plane", None), ("sqlite", f"sqlite:///{tmp_dir / 'control.db'}")]
            if pg is not None:
                configs.append(("postgresql", pg[1]))
            servers = [start_server(config, args, url, tmp_dir) for config, url in configs]
            for server in servers:
                wait_healthy(server.base_url, lambda p=server.process: p.poll() is None)
                if server.database_url is not None:
                    server.key = make_org_key(server, tmp_dir)
            results, latencies = run_all(args, servers)
            expected = (NUM_WARMUP_REQUESTS + args.num_reps * len(args.max_tokens) * args.num_requests)
            num_records = {s.config: count_usage_records(s.database_url) for s in servers if s.database_url}
            costs = {}
            if args.num_cost_requests:
                for server in servers:
                    if server.database_url is not None:
                        costs[server.config] = cost_per_request(server.database_url, tmp_dir, args.num_cost_requests)
        except Exception:
            for server in servers:
                print(f"--- {server.config} ---\n{(tmp_dir / f'{server.config}.log').read_text()[-2000:]}",
                      file=sys.stderr)
            raise
        finally:
            for server in servers:
                stop_server(server)
            if pg is not None:
                drop_pg_database(args.pg_dsn, pg[0])
    summary = summarize(results, latencies)
    print_table(summary)
    for config, cost in costs.items():
        print(f"{config}: per request, alone in this process: " + ", ".join(
            f"{name} {cost[f'{name}_ms']:.2f} ms ({cost[f'{name}_cpu_ms']:.2f} CPU)"
            for name in ("authenticate", "admit", "settle", "total")))
    info["config"] = {"model": MODEL, "device": "cpu", "dtype": "float32", "num_requests": args.num_requests,
                      "concurrency": args.concurrency, "max_tokens": args.max_tokens, "num_reps": args.num_reps,
                      "kv_cache_memory": args.kv_cache_memory, "num_warmup_requests": NUM_WARMUP_REQUESTS,
                      "configs": [s.config for s in servers], "request": "non-streaming chat, one sentence, "
                      "greedy, ignore_eos", "client": "httpx.AsyncClient in this process, keep-alive",
                      "pricing_toml": PRICING_TOML}
    info["usage_records"] = {"expected_per_store": expected, "found": num_records}
    info["summary"] = summary
    info["cost_per_request_in_process"] = costs
    info["runs"] = [asdict(r) for r in results]
    info["after"] = busy_processes()
    info["notes"] = args.notes
    print(f"usage records per store: {num_records} (expected {expected})")
    print(f"wrote {write_result('control-overhead', info)}")


if __name__ == "__main__":
    main()
