"""Health, metrics, client disconnects, a full queue and a dead engine, through a real server."""

import asyncio

import httpx
import pytest

from tests.integration.server.conftest import MODEL, make_server, wait_until_idle

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500,
        "ignore_eos": True, "temperature": 0}
METRIC_NAMES = ["tokenforge_requests_total", "tokenforge_prompt_tokens_total", "tokenforge_generation_tokens_total",
                "tokenforge_time_to_first_token_seconds_bucket", "tokenforge_inter_token_latency_seconds_bucket",
                "tokenforge_e2e_request_latency_seconds_bucket", "tokenforge_num_requests_running",
                "tokenforge_num_requests_waiting", "tokenforge_kv_cache_usage_ratio",
                "tokenforge_prefix_cache_hit_rate"]


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200 and response.headers["x-request-id"]


def test_metrics(http):
    http.post("/v1/chat/completions", json={**LONG, "max_tokens": 3})
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert name in response.text, name
    assert 'tokenforge_requests_total{endpoint="/v1/chat/completions",status="200"}' in response.text


def test_disconnect_mid_stream_frees_blocks(http, server):
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        num_events = 0
        for line in lines:
            num_events += line.startswith("data: ")
            if num_events == 4:
                break
        assert server.core.has_unfinished_requests()
    # Leaving the block closed the connection mid-stream.
    assert wait_until_idle(server.core, server.engine), "the abandoned stream still holds the engine"


def test_disconnect_while_waiting_for_a_whole_response(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(60, read=1.0))
    assert wait_until_idle(server.core, server.engine), "the abandoned request still holds the engine"


def test_full_queue_answers_503_with_retry_after(smollm2_loaded):
    running = make_server(smollm2_loaded, num_blocks=64, max_num_seqs=1, max_num_waiting=1)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(6)))

    try:
        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["code"] == "overloaded"
        assert httpx.get(f"{running.base_url}/health").status_code == 200
    finally:
        running.stop()


def test_failed_step_ends_its_requests_and_the_server_recovers(smollm2_loaded):
    running = make_server(smollm2_loaded, num_blocks=64)
    real_execute = running.core.runner.execute
    calls = {"n": 0}

    def failing_execute(scheduled):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected forward failure")
        return real_execute(scheduled)

    running.core.runner.execute = failing_execute
    body = {**LONG, "max_tokens": 200}

    async def stream_and_wait():
        async with httpx.AsyncClient(base_url=running.base_url, timeout=30) as client:
            async def stream():
                async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                    assert response.status_code == 200
                    return [line async for line in response.aiter_lines() if line.startswith("data: ")]

            return await asyncio.gather(stream(), client.post("/v1/chat/completions", json=body))

    try:
        events, whole = asyncio.run(stream_and_wait())
        assert '"error"' in events[-2] and "injected forward failure" in events[-2]
        assert events[-1] == "data: [DONE]"
        assert whole.status_code == 503 and whole.json()["error"]["code"] == "engine_step_failed"
        assert whole.headers["retry-after"]
        with httpx.Client(base_url=running.base_url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            late = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert late.status_code == 200 and late.json()["choices"][0]["finish_reason"] == "length"
        assert wait_until_idle(running.core, running.engine)
    finally:
        running.stop()


def test_engine_that_keeps_failing_turns_503_and_unhealthy(smollm2_loaded):
    running = make_server(smollm2_loaded, num_blocks=64)

    def failing_execute(scheduled):
        raise RuntimeError("injected forward failure")

    running.core.runner.execute = failing_execute
    body = {**LONG, "max_tokens": 4}
    try:
        with httpx.Client(base_url=running.base_url, timeout=30) as client:
            codes = [client.post("/v1/chat/completions", json=body).json()["error"]["code"] for _ in range(4)]
            assert codes == ["engine_step_failed", "engine_step_failed", "engine_unavailable", "engine_unavailable"]
            health = client.get("/health")
            assert health.status_code == 503
            late = client.post("/v1/chat/completions", json=body)
            assert late.status_code == 503 and late.headers["retry-after"]
            assert late.json()["error"]["type"] == "server_error"
    finally:
        running.stop()