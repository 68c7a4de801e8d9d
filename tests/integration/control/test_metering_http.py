"""Metering on a real server: one usage record per API request with the usage the client saw, at
the test prices (1,000 micro-dollars per token in and out, 500 per cached prompt token); also for
streams, n > 1, several prompts and a client that leaves mid-stream; nothing for refused input."""

import json
import time

import pytest
from sqlalchemy import select

from tests.integration.control.conftest import MODEL
from tokenforge.control.store.models import Reservation, UsageRecord


@pytest.fixture(scope="module")
def org(sqlite_control_server):
    return sqlite_control_server.new_org("metered")


def records(server, org_id: str) -> list[UsageRecord]:
    with server.plane.store.transaction() as db:
        return list(db.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id).order_by(UsageRecord.id)))


def expected_cost(usage: dict) -> int:
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return (usage["prompt_tokens"] - cached) * 1000 + cached * 500 + usage["completion_tokens"] * 1000


def record_for(server, org_id: str, request_id: str) -> UsageRecord:
    [record] = [r for r in records(server, org_id) if r.request_id == request_id]
    return record


def test_one_record_per_request_with_the_usage_returned(sqlite_control_server, org):
    org_id, key = org
    with sqlite_control_server.client(key) as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "n": 2}
        chat = client.post("/v1/chat/completions", json=body).raise_for_status().json()
        completion = client.post("/v1/completions", json={"model": MODEL, "prompt": ["One, two", "Red, green"],
                                                          "max_tokens": 3}).raise_for_status().json()
    for response, endpoint in ((chat, "chat"), (completion, "completions")):
        record = record_for(sqlite_control_server, org_id, response["id"])
        usage = response["usage"]
        assert (record.endpoint, record.status, record.model) == (endpoint, "ok", MODEL)
        assert record.num_prompt_tokens == usage["prompt_tokens"]
        assert record.num_completion_tokens == usage["completion_tokens"]
        assert record.cost_micros == expected_cost(usage)
        assert (record.input_price_micros, record.cached_input_price_micros, record.output_price_micros) == (
            1000 * 10**6, 500 * 10**6, 1000 * 10**6)


def test_stream_is_metered_with_its_final_usage(sqlite_control_server, org):
    org_id, key = org
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}}
    with sqlite_control_server.client(key) as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = events[-1]["usage"]
    record = record_for(sqlite_control_server, org_id, events[-1]["id"])
    assert (record.num_prompt_tokens, record.num_completion_tokens, record.status) == (
        usage["prompt_tokens"], usage["completion_tokens"], "ok")
    assert record.cost_micros == expected_cost(usage)


def test_client_leaving_mid_stream_is_charged_what_was_processed(sqlite_control_server, org):
    org_id, key = org
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with sqlite_control_server.client(key) as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        request_id = None
        for num_lines, line in enumerate(r.iter_lines()):
            if line.startswith("data: {"):
                request_id = request_id or line.split('"id":"')[1].split('"')[0]
            if num_lines >= 10:
                break  # leave: closing the stream disconnects
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not [r for r in records(sqlite_control_server, org_id)
                                               if r.request_id == request_id]:
        time.sleep(0.05)
    record = record_for(sqlite_control_server, org_id, request_id)
    assert record.status == "client_closed"
    assert 3 <= record.num_completion_tokens < 400 and record.num_prompt_tokens > 0
    assert record.cost_micros == ((record.num_prompt_tokens - record.num_cached_tokens) * 1000
                                  + record.num_cached_tokens * 500 + record.num_completion_tokens * 1000)
    with sqlite_control_server.plane.store.transaction() as db:
        assert db.scalars(select(Reservation).where(Reservation.request_id == request_id)).first() is None


def test_bad_input_is_not_metered(sqlite_control_server, org):
    org_id, key = org
    before = len(records(sqlite_control_server, org_id))
    with sqlite_control_server.client(key) as client:
        too_long = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 10**9,
                                                             "messages": [{"role": "user", "content": "hi"}]})
        bad = client.post("/v1/chat/completions", json={"model": MODEL, "messages": "not a list"})
    assert too_long.status_code == bad.status_code == 400
    assert len(records(sqlite_control_server, org_id)) == before
    with sqlite_control_server.plane.store.transaction() as db:
        assert db.scalars(select(Reservation).where(Reservation.org_id == org_id)).first() is None
