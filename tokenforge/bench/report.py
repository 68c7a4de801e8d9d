"""From timings to figures: percentiles, one summary per load level (output tokens/s, requests/s,
TTFT, ITL, TPOT), the text table, the JSON report and the plot (matplotlib, Agg backend).
"""

import math
from dataclasses import asdict
from pathlib import Path

from tokenforge.bench.client import LoadResult
from tokenforge.bench.monitor import MonitorOutput

PERCENTILES = (50, 90, 99)
REPORT_VERSION = 1


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between closest ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: list[float]) -> dict:
    """{"p50", "p90", "p99", "mean"} in milliseconds (None when there are no values)."""
    summary = {f"p{q}": _ms(percentile(values_s, q)) for q in PERCENTILES}
    summary["mean"] = _ms(sum(values_s) / len(values_s)) if values_s else None
    return summary


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else round(value_s * 1e3, 3)


def summarize(result: LoadResult, monitor: MonitorOutput | None = None) -> dict:
    """One load level: throughput over the wall time, latencies over its successful requests.
    TPOT = (latency - TTFT) / (tokens - 1) per request; ITL = every gap between streamed chunks."""
    ok = [t for t in result.timings if t.error is None]
    num_output_tokens = sum(t.num_output_tokens for t in ok)
    prompt_counts = [t.num_prompt_tokens for t in ok if t.num_prompt_tokens is not None]
    tpots = [(t.latency_s - t.ttft_s) / (t.num_output_tokens - 1) for t in ok
             if t.ttft_s is not None and t.num_output_tokens > 1]
    errors = list(dict.fromkeys(t.error for t in result.timings if t.error is not None))
    return {
        "concurrency": result.concurrency,
        "request_rate": result.request_rate,
        "num_requests": len(result.timings),
        "num_errors": len(result.timings) - len(ok),
        "errors": errors[:3],
        "wall_s": round(result.wall_s, 4),
        "num_prompt_tokens": sum(prompt_counts) if len(prompt_counts) == len(ok) else None,
        "num_output_tokens": num_output_tokens,
        "output_tokens_per_s": round(num_output_tokens / result.wall_s, 3),
        "requests_per_s": round(len(ok) / result.wall_s, 4),
        "ttft_ms": distribution_ms([t.ttft_s for t in ok if t.ttft_s is not None]),
        "itl_ms": distribution_ms([gap for t in ok for gap in t.itl_s]),
        "tpot_ms": distribution_ms(tpots),
        "latency_ms": distribution_ms([t.latency_s for t in ok]),
        "monitor": None if monitor is None else asdict(monitor),
    }


def make_report(config: dict, levels: list[dict], environment: dict) -> dict:
    return {"report_version": REPORT_VERSION, "config": config, "environment": environment, "levels": levels}


_COLUMNS = (("target", 22), ("conc", 5), ("reqs", 5), ("err", 4), ("out tok/s", 10), ("req/s", 7),
            ("TTFT p50", 9), ("p90", 8), ("p99", 8), ("ITL p50", 8), ("p90", 7), ("p99", 7), ("other CPU", 10))


def format_table(series: dict[str, list[dict]]) -> str:
    """One row per target and level; times in ms; `other CPU`: cores used by other processes."""
    lines = ["".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(_COLUMNS))]
    for target, levels in series.items():
        for level in levels:
            ttft, itl, monitor = level["ttft_ms"], level["itl_ms"], level["monitor"]
            other = "" if monitor is None else f"{monitor['other_cpu_cores']:.2f}"
            cells = [target[:21], level["concurrency"], level["num_requests"], level["num_errors"],
                     f"{level['output_tokens_per_s']:.1f}", f"{level['requests_per_s']:.2f}",
                     *(_fmt(ttft[k]) for k in ("p50", "p90", "p99")), *(_fmt(itl[k]) for k in ("p50", "p90", "p99")),
                     other]
            lines.append("".join(f"{cell:>{width}}" if i else f"{cell:<{width}}"
                                 for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS))))
    return "\n".join(lines)


def _fmt(value_ms: float | None) -> str:
    return "-" if value_ms is None else f"{value_ms:.1f}"


def write_plot(series: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Four panels against concurrency (log scale): output tokens/s, requests/s, TTFT and ITL
    (p50 solid, p99 dashed); one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = ((axes[0][0], "output tokens/s", "output_tokens_per_s"), (axes[0][1], "requests/s", "requests_per_s"),
              (axes[1][0], "time to first token (ms)", "ttft_ms"), (axes[1][1], "inter-token latency (ms)", "itl_ms"))
    for ax, ylabel, key in panels:
        for index, (target, levels) in enumerate(series.items()):
            color = f"C{index}"
            x = [level["concurrency"] for level in levels]
            if key.endswith("_ms"):
                ax.plot(x, [level[key]["p50"] for level in levels], "o-", color=color, label=f"{target} p50")
                ax.plot(x, [level[key]["p99"] for level in levels], "s--", color=color, label=f"{target} p99",
                        alpha=0.6)
                ax.set_yscale("log")
            else:
                ax.plot(x, [level[key] for level in levels], "o-", color=color, label=target)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({level["concurrency"] for levels in series.values() for level in levels}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
