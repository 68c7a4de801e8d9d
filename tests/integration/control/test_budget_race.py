"""The spend limit under a burst: 200 concurrent requests against an organisation whose budget
covers about 20 of them. Spend never exceeds the limit; each request is served and billed once,
or refused with 429 insufficient_quota and not billed; the ledger, the budget and the invoice agree."""

import asyncio
from datetime import UTC, datetime

import httpx
from sqlalchemy import func, select

from tests.integration.control.conftest import MODEL
from tokenforge.control.store.models import Budget, UsageRecord

NUM_REQUESTS = 200
MAX_TOKENS = 4
MESSAGES = [{"role": "user", "content": "Count from one to ten."}]


async def _send_all(base_url: str, key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits,
                                 headers={"authorization": f"Bearer {key}"}) as client:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True}
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(NUM_REQUESTS)))


def test_burst_never_overspends(control_server):
    with httpx.Client(base_url=control_server.base_url, timeout=60) as probe:
        _, probe_key = control_server.new_org("probe")
        tokens = probe.post("/tokenize", json={"model": MODEL, "messages": MESSAGES},
                            headers={"authorization": f"Bearer {probe_key}"}).raise_for_status().json()["count"]
    worst_case = (tokens + MAX_TOKENS) * 1000  # TEST_PRICING: 1,000 micro-dollars a token, in and out
    limit = 20 * worst_case + worst_case // 2
    org_id, key = control_server.new_org("burst", monthly_limit_micros=limit)

    responses = asyncio.run(_send_all(control_server.base_url, key))

    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == NUM_REQUESTS, {r.status_code for r in responses}
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert len(served) >= 20  # the budget holds 20 worst cases
    with control_server.plane.store.transaction() as db:
        records = db.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
        budget = db.scalars(select(Budget).where(Budget.org_id == org_id)).one()
    # Served and billed once: one record per served response, with the usage the client saw.
    assert sorted(r.request_id for r in records) == sorted(r.json()["id"] for r in served)
    by_id = {r.request_id: r for r in records}
    for response in served:
        usage, record = response.json()["usage"], by_id[response.json()["id"]]
        assert (record.num_prompt_tokens, record.num_completion_tokens, record.status) == (
            usage["prompt_tokens"], usage["completion_tokens"], "ok")
        assert record.num_cached_tokens == usage["prompt_tokens_details"]["cached_tokens"]
    ledger = sum(r.cost_micros for r in records)
    assert budget.spent_micros == ledger <= limit
    # Cached prompt tokens cost half, so a few more than 20 may fit: never more than the cheapest allow.
    assert len(served) <= limit // min(r.cost_micros for r in records)
    assert budget.reserved_micros == 0

    with control_server.admin() as admin:
        month = datetime.now(UTC).strftime("%Y-%m")
        closed = admin.post("/v1/invoices/close", json={"month": month, "organization": org_id,
                                                         "include_current": True}).raise_for_status().json()
    invoice = closed["data"][0]
    assert invoice["total_micros"] == ledger
    assert sum(line["amount_micros"] for line in invoice["lines"]) == ledger
    with control_server.plane.store.transaction() as db:
        assert db.scalar(select(func.count()).select_from(UsageRecord)
                         .where(UsageRecord.org_id == org_id)) == len(served)
