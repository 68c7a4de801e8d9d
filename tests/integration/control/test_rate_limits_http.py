"""Per-minute limits on a real server: x-ratelimit-* headers on every inference response, 429 with
retry-after and OpenAI's rate_limit_exceeded once a key's requests or tokens per minute run out."""

import pytest

from tests.integration.control.conftest import MODEL, open_control_server

TIERS = """
[[tiers]]
min_paid = 0
monthly_limit = 50
requests_per_minute = 3
tokens_per_minute = 400
"""
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def small_tier_server(smollm2_loaded, tmp_path):
    server = open_control_server(smollm2_loaded, f"sqlite:///{tmp_path / 'control.db'}", tmp_path, TIERS)
    yield server
    server.running.stop()
    server.plane.close()


def reset_s(response) -> float:
    """The x-ratelimit-reset-requests duration ("20ms", "59.5s", "1m0s") in seconds."""
    text = response.headers["x-ratelimit-reset-requests"]
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    minutes, _, seconds = text[:-1].rpartition("m")
    return float(minutes or 0) * 60 + float(seconds)


def test_requests_per_minute(small_tier_server):
    for attempt in range(3):  # windows are whole minutes: start again if one ended mid-test
        _, key = small_tier_server.new_org(f"limited-{attempt}")
        with small_tier_server.client(key) as client:
            responses = [client.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
        resets = [reset_s(r) for r in responses]
        if resets == sorted(resets, reverse=True):
            break
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["2", "1", "0", "0"]
    for response in responses:
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-limit-tokens"] == "400"
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = responses[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_tokens_per_minute(small_tier_server):
    for attempt in range(3):  # start again if the minute window ended between the two requests
        _, key = small_tier_server.new_org(f"token-limited-{attempt}")
        with small_tier_server.client(key) as client:
            first = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 150})
            second = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 300})
            never = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1000})
        if reset_s(second) <= reset_s(first):
            break
    assert first.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 400 - 150
    assert second.status_code == never.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded" and "tokens" in second.json()["error"]["message"]
    assert "retry-after" in second.headers
