"""A KV cache so small that requests are preempted all the time, through the real server: greedy
outputs equal those of an unpressured server, nothing deadlocks, every block comes back, and a
request that can never fit is a clear 400."""

import asyncio

import httpx

from tests.integration.server.conftest import MODEL, make_server, wait_until_idle

NUM_BLOCKS = 12  # 192 tokens: about 3 of these requests (4 blocks each at the end) at once
TOPICS = ["rivers", "mountains", "the moon", "bread", "trains", "owls", "glass", "tea"]


def body(topic: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Write two sentences about {topic}."}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True}


async def _all(base_url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body(t)) for t in TOPICS))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json()["choices"][0]["message"]["content"] for r in responses]


def test_constant_preemption_changes_nothing(smollm2_loaded):
    roomy = make_server(smollm2_loaded, num_blocks=512)
    try:
        expected = asyncio.run(_all(roomy.base_url))
    finally:
        roomy.stop()
    tight = make_server(smollm2_loaded, num_blocks=NUM_BLOCKS, prefix_caching=False)
    try:
        got = asyncio.run(asyncio.wait_for(_all(tight.base_url), timeout=600))
        assert tight.core.scheduler.num_preemptions > 0
        assert got == expected
        assert wait_until_idle(tight.core, tight.engine)
        with httpx.Client(base_url=tight.base_url, timeout=60) as client:
            never = client.post("/v1/chat/completions", json={**body("x"), "messages": [
                {"role": "user", "content": "word " * 300}]})
            too_long = client.post("/v1/chat/completions", json={**body("x"), "max_tokens": NUM_BLOCKS * 16})
        for response in (never, too_long):
            assert response.status_code == 400
            assert "maximum context length is 192 tokens" in response.json()["error"]["message"]
    finally:
        tight.stop()
