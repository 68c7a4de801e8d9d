"""Metering when things fail: a failing engine step still leaves one record per request (charged
for what was processed, status error); a store that cannot be reached makes the server fail closed
with 503 and recover by itself once it is back."""

import asyncio
import json
import time

import httpx
import psycopg
import pytest
from sqlalchemy import select

from tests.integration.control.conftest import MODEL, open_control_server
from tests.store_helpers import PG_ADMIN_DSN, fresh_database_url
from tokenforge.control.store.models import Budget, UsageRecord

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about a ship."}],
        "max_tokens": 200, "ignore_eos": True}


def test_failed_engine_step_is_metered(smollm2_loaded, tmp_path):
    server = open_control_server(smollm2_loaded, f"sqlite:///{tmp_path / 'control.db'}", tmp_path)
    org_id, key = server.new_org("doomed")
    runner = server.running.core.runner
    real_execute, calls = runner.execute, {"n": 0}

    def failing_execute(scheduled):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected forward failure")
        return real_execute(scheduled)

    runner.execute = failing_execute

    async def stream_and_whole():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60,
                                     headers={"authorization": f"Bearer {key}"}) as client:
            async def stream():
                async with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                    return [line async for line in r.aiter_lines() if line.startswith("data: {")]
            return await asyncio.gather(stream(), client.post("/v1/chat/completions", json=BODY))

    try:
        events, whole = asyncio.run(stream_and_whole())
        assert "injected forward failure" in events[-1] and whole.status_code == 503
        with server.client(key) as client:  # the engine recovered: served and billed as usual
            assert client.post("/v1/chat/completions", json={**BODY, "max_tokens": 3}).status_code == 200
        with server.plane.store.transaction() as db:
            records = db.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
            budget = db.scalars(select(Budget).where(Budget.org_id == org_id)).one()
        by_status = sorted((r.status, r.num_completion_tokens > 0) for r in records)
        assert by_status == [("error", True), ("error", True), ("ok", True)]
        stream_record = next(r for r in records if r.request_id == json.loads(events[0][6:])["id"])
        assert stream_record.num_prompt_tokens > 0 and stream_record.cost_micros > 0
        assert budget.reserved_micros == 0 and budget.spent_micros == sum(r.cost_micros for r in records)
    finally:
        server.running.stop()
        server.plane.close()


def _set_connections(database: str, allowed: bool) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))


@pytest.mark.parametrize("store_backend", ["postgresql"])
def test_store_outage_fails_closed_and_recovers(smollm2_loaded, store_backend, tmp_path):
    with fresh_database_url(store_backend, tmp_path) as url:
        database = url.rsplit("/", 1)[1]
        server = open_control_server(smollm2_loaded, url, tmp_path)
        try:
            org_id, key = server.new_org("outage")
            body = {**BODY, "max_tokens": 3}
            with server.client(key) as client:
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                _set_connections(database, False)
                try:
                    down = [client.post("/v1/chat/completions", json=body) for _ in range(3)]
                    assert client.get("/health").status_code == 200  # the engine is fine
                finally:
                    _set_connections(database, True)
                for response in down:
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "store_unavailable"
                    assert response.headers["retry-after"]
                deadline = time.monotonic() + 15
                while (up := client.post("/v1/chat/completions", json=body)).status_code != 200:
                    assert time.monotonic() < deadline, up.text
                    time.sleep(0.2)
                # A request admitted before the outage and settled during it is recorded once the store is back.
                with client.stream("POST", "/v1/chat/completions", json={**BODY, "max_tokens": 40, "stream": True}) as r:
                    lines = r.iter_lines()
                    first = next(line for line in lines if line.startswith("data: {"))
                    _set_connections(database, False)
                    try:
                        assert [line for line in lines if line][-1] == "data: [DONE]"
                        time.sleep(1.0)  # the first settle attempt fails meanwhile
                    finally:
                        _set_connections(database, True)
            request_id = json.loads(first[6:])["id"]
            deadline = time.monotonic() + 20
            while True:
                with server.plane.store.transaction() as db:
                    records = db.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
                if request_id in {r.request_id for r in records} or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            # Nothing served while it was down; the late settlement written once.
            assert sorted((r.status, r.num_completion_tokens) for r in records) == [("ok", 3), ("ok", 3), ("ok", 40)]
        finally:
            server.running.stop()
            server.plane.close()
