"""`tokenforge bench` against a real server on loopback, and its offline client over the same engine:
a tiny load (2 requests of 4 tokens per level), checking the report's fields, never timings."""

import asyncio
import json
import os

from tokenforge.bench.offline import OfflineClient
from tokenforge.bench.sweep import SweepConfig, run_sweep
from tokenforge.cli.main import main

from .conftest import MODEL


def test_bench_cli_streams_from_the_server_and_writes_the_report(server, tmp_path):
    out = tmp_path / "bench.json"
    status = main(["bench", "--url", f"{server.base_url}/v1", "--model", MODEL, "--concurrency", "2",
                   "--num-requests", "2", "--max-tokens", "4", "--num-warmup-requests", "1",
                   "--server-pid", str(os.getpid()), "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["config"]["concurrency"] == [2] and report["config"]["prompts"] == "short"
    assert report["environment"]["num_cores"] == os.cpu_count()
    (level,) = report["levels"]
    assert level["concurrency"] == 2 and level["num_requests"] == 2 and level["num_errors"] == 0
    assert level["num_output_tokens"] == 8  # from the streamed usage: ignore_eos, 4 tokens each
    assert 200 <= level["num_prompt_tokens"] <= 260  # two short chat prompts
    assert level["output_tokens_per_s"] > 0 and level["requests_per_s"] > 0
    assert level["ttft_ms"]["p50"] > 0 and level["itl_ms"]["p99"] is not None
    assert level["monitor"]["server_peak_rss_bytes"] > 0  # the server runs in this process


def test_bench_cli_reports_an_unknown_model_before_the_sweep(server, capsys):
    status = main(["bench", "--url", f"{server.base_url}/v1", "--model", "no-such-model", "--concurrency", "1",
                   "--num-requests", "1", "--max-tokens", "2"])
    assert status == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_offline_client_over_the_engine(server):
    client = OfflineClient(server.engine, max_tokens=4)
    config = SweepConfig(concurrency=(2,), num_requests=2, max_tokens=4, num_warmup_requests=0)
    (level,) = asyncio.run(run_sweep(client.send, config, log=lambda line: None))
    assert level["num_errors"] == 0 and level["num_output_tokens"] == 8
    assert len(level["itl_ms"]) == 4 and level["ttft_ms"]["p50"] > 0
