"""Issue 4's crash test: SIGKILL a real `tokenforge serve` process in the middle of streaming requests,
restart it on the same store, and check in the database that every settled request kept exactly one
usage record and that the reservations the dead server held expired (released at restart, audited).
"""

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests import serve_process
from tests.integration.control.conftest import MODEL, write_pricing
from tests.serve_process import ServeProcess
from tests.store_helpers import BACKENDS, fresh_database_url
from tokenforge.control.store.db import open_store
from tokenforge.control.store.models import AuditEvent, Budget, DailyUsage, Reservation, UsageRecord

RESERVATION_TTL_S = 3
NUM_SETTLED = 3  # two plain requests and one stream, all run to the end before the kill
NUM_KILLED = 6  # streams in flight when the server dies
NUM_CHUNKS_BEFORE_KILL = 3
KILLED_MAX_TOKENS = 400  # with ignore_eos: far from done when the kill comes
REQUEST_TIMEOUT_S = 60
KEY_RE = re.compile(r"(tf_[0-9a-f]{12}[A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")


def start_serve(url: str, pricing: Path, log_path: Path) -> ServeProcess:
    """The server with auth on, over the store at `url`, with short-lived reservations."""
    return serve_process.start_serve(["--auth", "on", "--database-url", url, "--pricing", str(pricing),
                                      "--log-level", "warning"], log_path,
                                     {"TOKENFORGE_RESERVATION_TTL_S": str(RESERVATION_TTL_S)})


def chat_body(max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Count from one to a thousand."}],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}


class Stream(threading.Thread):
    """One streamed chat completion read in a thread; `enough` is set after a few content chunks
    (or when the stream ends, whichever comes first)."""

    def __init__(self, base_url: str, key: str, max_tokens: int):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.key = key
        self.max_tokens = max_tokens
        self.request_id: str | None = None
        self.num_chunks = 0
        self.finished = False  # saw [DONE]
        self.error: str | None = None
        self.enough = threading.Event()

    def run(self) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        try:
            with httpx.Client(base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client, \
                    client.stream("POST", "/v1/chat/completions", json=chat_body(self.max_tokens, True)) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.finished = True
                        break
                    if not line.startswith("data: "):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = str(chunk["error"])
                        break
                    self.request_id = chunk["id"]
                    if any(choice["delta"].get("content") for choice in chunk["choices"]):
                        self.num_chunks += 1
                    if self.num_chunks >= NUM_CHUNKS_BEFORE_KILL:
                        self.enough.set()
        except httpx.HTTPError as exc:  # the server died under it: expected for the killed streams
            self.error = repr(exc)
        finally:
            self.enough.set()


@dataclass
class Ledger:
    """What the store holds for one organisation."""

    usage: list[tuple[str, str, int]]  # (request_id, status, cost_micros), every usage record
    reservations: dict[str, int]  # request_id -> amount_micros still held
    reserved_micros: int  # budgets, all months
    spent_micros: int
    daily_num_requests: int  # usage_daily roll-up
    daily_cost_micros: int
    expired: list[tuple[str, int]]  # (request_id, amount_micros) of reservation.expired audit events


def read_ledger(url: str, org_id: str) -> Ledger:
    store = open_store(url)
    try:
        with store.transaction() as db:
            usage = [tuple(row) for row in db.execute(
                select(UsageRecord.request_id, UsageRecord.status, UsageRecord.cost_micros)
                .where(UsageRecord.org_id == org_id))]
            reservations = dict(db.execute(select(Reservation.request_id, Reservation.amount_micros)
                                           .where(Reservation.org_id == org_id)).all())
            reserved, spent = db.execute(select(func.coalesce(func.sum(Budget.reserved_micros), 0),
                                                func.coalesce(func.sum(Budget.spent_micros), 0))
                                         .where(Budget.org_id == org_id)).one()
            daily_requests, daily_cost = db.execute(select(func.coalesce(func.sum(DailyUsage.num_requests), 0),
                                                           func.coalesce(func.sum(DailyUsage.cost_micros), 0))
                                                    .where(DailyUsage.org_id == org_id)).one()
            events = db.execute(select(AuditEvent.target, AuditEvent.detail)
                                .where(AuditEvent.org_id == org_id, AuditEvent.action == "reservation.expired")).all()
    finally:
        store.close()
    expired = [(target, json.loads(detail)["amount_micros"]) for target, detail in events]
    return Ledger(usage, reservations, reserved, spent, daily_requests, daily_cost, expired)


def new_org(base_url: str, admin_key: str) -> tuple[str, str]:
    with httpx.Client(base_url=base_url, timeout=30, headers={"authorization": f"Bearer {admin_key}"}) as admin:
        org = admin.post("/v1/organizations", json={"name": "crash-test"}).raise_for_status().json()
        key = admin.post("/v1/keys", json={"organization": org["id"], "scopes": ["inference"]}).raise_for_status()
        return org["id"], key.json()["key"]


def complete(base_url: str, key: str) -> str:
    """One short request run to the end; its id is the request id of its usage record."""
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(4, False), timeout=REQUEST_TIMEOUT_S,
                          headers={"authorization": f"Bearer {key}"})
    return response.raise_for_status().json()["id"]


def run_until_killed(serve: ServeProcess, key: str) -> list[Stream]:
    """Starts the long streams, and SIGKILLs the server once each has received a few chunks."""
    streams = [Stream(serve.base_url, key, KILLED_MAX_TOKENS) for _ in range(NUM_KILLED)]
    for stream in streams:
        stream.start()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    for stream in streams:
        stream.enough.wait(max(0.0, deadline - time.monotonic()))
    serve.kill()
    for stream in streams:
        stream.join(REQUEST_TIMEOUT_S)
    return streams


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_mid_stream_loses_no_record_and_reservations_expire(backend, tmp_path):
    pricing = write_pricing(tmp_path)
    with fresh_database_url(backend, tmp_path) as url:
        serve = start_serve(url, pricing, tmp_path / "serve-1.log")
        try:
            match = KEY_RE.search(serve.log())
            assert match, f"no bootstrap admin key on stderr:\n{serve.log()[-3000:]}"
            org_id, key = new_org(serve.base_url, match.group(1))
            settled_ids = {complete(serve.base_url, key) for _ in range(NUM_SETTLED - 1)}
            settled_stream = Stream(serve.base_url, key, 4)
            settled_stream.start()
            settled_stream.join(REQUEST_TIMEOUT_S)
            assert settled_stream.finished, settled_stream.error
            settled_ids.add(settled_stream.request_id)
            killed = run_until_killed(serve, key)
        finally:
            serve.kill()
        killed_at = time.monotonic()

        for stream in killed:
            assert stream.num_chunks >= NUM_CHUNKS_BEFORE_KILL and not stream.finished, \
                f"a stream was not in flight at the kill: {stream.num_chunks} chunks, {stream.error}"
        killed_ids = {stream.request_id for stream in killed}
        assert len(killed_ids) == NUM_KILLED and not killed_ids & settled_ids

        # A response, or a stream's [DONE], goes out only once its usage record is committed.
        dead = read_ledger(url, org_id)
        assert sorted(request_id for request_id, _, _ in dead.usage) == sorted(settled_ids)
        assert {status for _, status, _ in dead.usage} == {"ok"}
        assert set(dead.reservations) == killed_ids, "the killed requests should still hold their reservations"
        assert dead.reserved_micros == sum(dead.reservations.values()) > 0
        assert dead.spent_micros == sum(cost for _, _, cost in dead.usage)

        # Restart past the TTL: ControlPlane.open releases the expired reservations before serving.
        time.sleep(max(0.0, killed_at + RESERVATION_TTL_S + 0.5 - time.monotonic()))
        serve = start_serve(url, pricing, tmp_path / "serve-2.log")
        try:
            restarted = read_ledger(url, org_id)
            assert restarted.reservations == {} and restarted.reserved_micros == 0
            settled_ids.add(complete(serve.base_url, key))
            after = read_ledger(url, org_id)
        finally:
            serve.kill()

    request_ids = [request_id for request_id, _, _ in after.usage]
    assert len(request_ids) == len(set(request_ids)), "a usage record was duplicated"
    assert set(request_ids) == settled_ids, "a settled request lost its record, or a killed one gained one"
    assert {status for _, status, _ in after.usage} == {"ok"}
    assert after.reservations == {} and after.reserved_micros == 0
    assert after.spent_micros == sum(cost for _, _, cost in after.usage)
    assert (after.daily_num_requests, after.daily_cost_micros) == (len(request_ids), after.spent_micros)
    # A settled request may also show up here, had its reservation outlived the short TTL: not the point.
    killed_expired = [(request_id, amount) for request_id, amount in after.expired if request_id in killed_ids]
    assert sorted(killed_expired) == sorted(dead.reservations.items()), \
        "each killed request's reservation should be released (and audited) exactly once"
