"""A concurrency sweep: warm the target up, then for each level send that level's requests under a
LoadMonitor and summarize them. A level disturbed by other processes (more than
`max_other_cpu_cores` busy) is run again, with fresh prompts, up to `max_attempts` times; the least
disturbed attempt is kept and the others are recorded as discarded.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from tokenforge.bench.client import SendFn, run_load
from tokenforge.bench.monitor import LoadMonitor
from tokenforge.bench.prompts import make_prompt_set
from tokenforge.bench.report import summarize

MIN_REQUESTS_PER_LEVEL = 8
QUIET_PROBE_S = 1.0


@dataclass(frozen=True)
class SweepConfig:
    prompts: str = "short"  # a PROMPT_SETS name
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    num_requests: int | None = None  # per level; None: max(8, requests_per_stream x concurrency)
    requests_per_stream: int = 2  # with num_requests None: each stream sends this many, one after the other
    max_tokens: int = 128
    request_rate: float | None = None  # Poisson arrivals (requests/s); None: all at once
    num_warmup_requests: int = 2
    seed: int = 0
    max_other_cpu_cores: float | None = None  # a level with other processes busier than this is disturbed
    max_attempts: int = 1  # runs of a disturbed level
    quiet_wait_s: float = 0.0  # before each level, wait up to this long for other processes to calm down

    def num_requests_for(self, concurrency: int) -> int:
        if self.num_requests is not None:
            return self.num_requests
        return max(MIN_REQUESTS_PER_LEVEL, self.requests_per_stream * concurrency)


def is_disturbed(level: dict, max_other_cpu_cores: float | None) -> bool:
    monitor = level.get("monitor")
    return max_other_cpu_cores is not None and monitor is not None and \
        monitor["other_cpu_cores"] > max_other_cpu_cores


async def wait_for_quiet(max_other_cpu_cores: float, timeout_s: float, server_pid: int | None) -> float:
    """Probes the other processes' CPU use each second until it is at most `max_other_cpu_cores`
    or `timeout_s` has passed; returns the last probe (cores)."""
    waited_s = 0.0
    while True:
        with LoadMonitor(server_pid) as monitor:
            await asyncio.sleep(QUIET_PROBE_S)
        other = monitor.output.other_cpu_cores
        waited_s += monitor.output.wall_s
        if other <= max_other_cpu_cores or waited_s >= timeout_s:
            return other


async def run_level(send: SendFn, config: SweepConfig, concurrency: int, server_pid: int | None,
                    attempt: int = 0) -> dict:
    # Fresh prompts per level and attempt: no level is served from another's prefix cache.
    conversations = make_prompt_set(config.prompts, config.num_requests_for(concurrency),
                                    seed=f"{config.seed}-c{concurrency}-a{attempt}")
    with LoadMonitor(server_pid) as monitor:
        result = await run_load(send, conversations, concurrency, config.request_rate, config.seed)
    return summarize(result, monitor.output)


async def warm_up(send: SendFn, config: SweepConfig) -> None:
    if config.num_warmup_requests > 0:
        conversations = make_prompt_set(config.prompts, config.num_warmup_requests, seed=f"{config.seed}-warmup")
        await run_load(send, conversations, config.num_warmup_requests)


async def run_sweep(send: SendFn, config: SweepConfig, server_pid: int | None = None,
                    log: Callable[[str], None] = print) -> list[dict]:
    """One summary per concurrency level, with `disturbed` and the discarded attempts added."""
    await warm_up(send, config)
    levels = []
    for concurrency in config.concurrency:
        attempts = []
        for attempt in range(max(config.max_attempts, 1)):
            if config.max_other_cpu_cores is not None and config.quiet_wait_s > 0:
                await wait_for_quiet(config.max_other_cpu_cores, config.quiet_wait_s, server_pid)
            level = await run_level(send, config, concurrency, server_pid, attempt)
            attempts.append(level)
            disturbed = is_disturbed(level, config.max_other_cpu_cores)
            other = level["monitor"]["other_cpu_cores"]
            log(f"  concurrency {concurrency:>3}: {level['output_tokens_per_s']:8.1f} out tok/s, "
                f"TTFT p50 {level['ttft_ms']['p50'] or 0:8.1f} ms, other processes {other:.2f} cores"
                + (" (disturbed)" if disturbed else ""))
            if not disturbed:
                break
        kept = min(attempts, key=lambda a: a["monitor"]["other_cpu_cores"])
        kept["disturbed"] = is_disturbed(kept, config.max_other_cpu_cores)
        kept["discarded_attempts"] = [
            {"output_tokens_per_s": a["output_tokens_per_s"], "other_cpu_cores": a["monitor"]["other_cpu_cores"]}
            for a in attempts if a is not kept]
        levels.append(kept)
    return levels
