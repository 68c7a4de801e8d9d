"""A bounded soak of a real server with the control plane: 64 concurrent streaming clients, mixed
prompt lengths, some with stop strings, some leaving mid-stream. Afterwards: no 5xx but documented
503s, exactly one usage record per admitted request, every KV block free, no growth in open file
descriptors or threads, and memory growth within a bound.

TOKENFORGE_SOAK_REQUESTS (default 64) makes it a longer manual soak run."""

import asyncio
import gc
import json
import os
import random
import threading
import time

import httpx
import psutil
from sqlalchemy import select

from tests.integration.control.conftest import MODEL
from tests.integration.server.conftest import wait_until_idle
from tokenforge.control.store.models import Budget, Reservation, UsageRecord

NUM_REQUESTS = int(os.environ.get("TOKENFORGE_SOAK_REQUESTS", "64"))
CONCURRENCY = 64
MAX_RSS_GROWTH_MIB = 300  # the bound this test holds the server to (warm-up excluded)
WORDS = "the river runs past old stone walls and green fields toward a quiet town".split()


def make_request(rng: random.Random, index: int) -> tuple[dict, int | None]:
    """A streaming chat request of a random length and kind, and after how many events to leave (None: stay)."""
    words = rng.choice((4, 40, 200))
    content = " ".join(rng.choice(WORDS) for _ in range(words)) + f" ({index})"
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": rng.choice((4, 12, 32)), "temperature": 0.7,
            "seed": index}
    if rng.random() < 0.25:
        body["stop"] = [".", "\n", "the"]
    leave_after = rng.choice((2, 5)) if rng.random() < 0.2 else None
    return body, leave_after


async def _soak(base_url: str, key: str, requests: list[tuple[dict, int | None]]) -> list[dict]:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits,
                                 headers={"authorization": f"Bearer {key}"}) as client:
        async def one(body: dict, leave_after: int | None) -> dict:
            async with semaphore, client.stream("POST", "/v1/chat/completions", json=body) as response:
                result = {"status": response.status_code, "id": None, "events": 0, "left": False, "done": False}
                if response.status_code != 200:
                    await response.aread()
                    return result
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        result["id"] = result["id"] or json.loads(line[6:])["id"]
                        result["events"] += 1
                        if leave_after is not None and result["events"] >= leave_after:
                            result["left"] = True
                            break
                    result["done"] = result["done"] or line == "data: [DONE]"
                return result

        return await asyncio.gather(*(one(body, leave) for body, leave in requests))


def resources(store) -> tuple[int, int, int]:
    """Open fds, threads and RSS of this process; the store's idle pooled connections (how many
    stay open depends on how many requests overlapped) are closed first, so only leaks count."""
    gc.collect()
    store.engine.dispose()
    process = psutil.Process()
    return process.num_fds(), threading.active_count(), process.memory_info().rss


def test_soak(sqlite_control_server):
    server = sqlite_control_server
    org_id, key = server.new_org("soak")
    rng = random.Random(7)
    asyncio.run(_soak(server.base_url, key, [make_request(rng, i) for i in range(8)]))  # warm-up
    assert wait_until_idle(server.running.core, server.running.engine, timeout_s=30)
    fds_before, threads_before, rss_before = resources(server.plane.store)

    started = time.monotonic()
    results = asyncio.run(_soak(server.base_url, key, [make_request(rng, i) for i in range(NUM_REQUESTS)]))
    elapsed_s = time.monotonic() - started

    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    served = [r for r in results if r["status"] == 200]
    assert all(r["done"] or r["left"] for r in served)
    assert any(r["left"] for r in served) and any(r["done"] for r in served)
    assert wait_until_idle(server.running.core, server.running.engine, timeout_s=30)
    time.sleep(0.5)  # the last settlements of clients that left
    with server.plane.store.transaction() as db:
        records = db.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
        budget = db.scalars(select(Budget).where(Budget.org_id == org_id)).one()
        held = db.scalars(select(Reservation).where(Reservation.org_id == org_id)).all()
    soak_ids = {r["id"] for r in served}
    soak_records = [r for r in records if r.request_id in soak_ids]
    assert len(soak_records) == len(soak_ids) == len(served)  # one record per admitted request
    assert {r.status for r in soak_records if r.request_id in {x["id"] for x in served if x["left"]}} <= {
        "client_closed", "ok"}
    assert not held and budget.reserved_micros == 0
    assert budget.spent_micros == sum(r.cost_micros for r in records)

    fds_after, threads_after, rss_after = resources(server.plane.store)
    assert fds_after <= fds_before + 8, (fds_before, fds_after)
    assert threads_after <= threads_before + 4, (threads_before, threads_after)
    assert rss_after - rss_before < MAX_RSS_GROWTH_MIB << 20, (rss_before >> 20, rss_after >> 20)
    print(f"soak: {len(results)} requests at {CONCURRENCY} concurrent in {elapsed_s:.1f} s; "
          f"{len(served)} served ({sum(r['left'] for r in served)} left mid-stream), "
          f"{statuses.count(503)} x 503; fds {fds_before}->{fds_after}, threads {threads_before}->{threads_after}, "
          f"rss {rss_before >> 20}->{rss_after >> 20} MiB")
