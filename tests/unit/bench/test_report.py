"""Percentiles, one level's summary, the JSON report's shape, the table and the plot (no server)."""

import json

import pytest

from tokenforge.bench.client import LoadResult, RequestTiming, arrival_times
from tokenforge.bench.monitor import MonitorOutput
from tokenforge.bench.report import distribution_ms, format_table, make_report, percentile, summarize, write_plot


def make_timing(ttft_s=0.1, gaps=(0.01, 0.03), num_tokens=3, latency_s=0.14, error=None, num_prompt_tokens=10):
    return RequestTiming(latency_s, ttft_s, list(gaps), num_tokens, num_prompt_tokens, error)


def make_monitor(other=0.05):
    return MonitorOutput(wall_s=2.0, machine_cpu_cores=1.5, client_cpu_cores=0.1, server_cpu_cores=1.35,
                         other_cpu_cores=other, server_peak_rss_bytes=123 << 20, heavy_processes=[])


def test_percentile_interpolates_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_distribution_in_milliseconds():
    assert distribution_ms([0.001, 0.003]) == {"p50": 2.0, "p90": 2.8, "p99": 2.98, "mean": 2.0}
    assert distribution_ms([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_summary_counts_only_successful_requests():
    timings = [make_timing(), make_timing(ttft_s=0.3, latency_s=0.5, num_tokens=5, gaps=(0.05,) * 4),
               make_timing(ttft_s=None, gaps=(), num_tokens=0, error="HTTP 503: busy", num_prompt_tokens=None)]
    level = summarize(LoadResult(concurrency=4, request_rate=None, wall_s=2.0, timings=timings), make_monitor())
    assert level["num_requests"] == 3 and level["num_errors"] == 1 and level["errors"] == ["HTTP 503: busy"]
    assert level["num_output_tokens"] == 8 and level["num_prompt_tokens"] == 20
    assert level["output_tokens_per_s"] == 4.0 and level["requests_per_s"] == 1.0
    assert level["ttft_ms"]["p50"] == 200.0
    assert level["itl_ms"]["p50"] == 50.0  # six gaps pooled: 10, 30, 50, 50, 50, 50
    assert level["tpot_ms"]["mean"] == pytest.approx(((0.14 - 0.1) / 2 + (0.5 - 0.3) / 4) / 2 * 1e3)
    assert level["monitor"]["other_cpu_cores"] == 0.05


def test_report_json_shape():
    level = summarize(LoadResult(1, None, 1.0, [make_timing()]), None)
    report = json.loads(json.dumps(make_report({"model": "m"}, [level], {"num_cores": 2})))
    assert set(report) == {"report_version", "config", "environment", "levels"}
    assert set(report["levels"][0]) >= {"concurrency", "num_requests", "num_errors", "wall_s", "num_output_tokens",
                                        "output_tokens_per_s", "requests_per_s", "ttft_ms", "itl_ms", "tpot_ms",
                                        "latency_ms", "monitor"}
    assert set(report["levels"][0]["ttft_ms"]) == {"p50", "p90", "p99", "mean"}


def test_table_has_a_row_per_target_and_level():
    levels = [summarize(LoadResult(c, None, 1.0, [make_timing()]), make_monitor()) for c in (1, 4)]
    table = format_table({"tokenforge": levels, "llama.cpp Q4_0": levels[:1]})
    lines = table.splitlines()
    assert len(lines) == 4 and "TTFT p50" in lines[0]
    assert lines[1].startswith("tokenforge") and lines[3].startswith("llama.cpp Q4_0")
    assert "100.0" in lines[1]  # TTFT p50 ms


def test_plot_is_a_png(tmp_path):
    levels = [summarize(LoadResult(c, None, 1.0, [make_timing()]), None) for c in (1, 4, 16)]
    path = write_plot({"a": levels, "b": levels}, tmp_path / "sweep.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arrival_times():
    assert arrival_times(3, None) == [0.0, 0.0, 0.0]
    times = arrival_times(200, 10.0, seed=1)
    assert times == arrival_times(200, 10.0, seed=1) and times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert 10 < times[-1] < 30  # 199 gaps of mean 0.1 s
