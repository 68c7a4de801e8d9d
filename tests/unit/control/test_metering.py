"""Metering on both store backends: one usage record per request with its prices and hand-computed
cost, the daily roll-up per organisation, UTC day and model, a second write of the same request
counting nothing, statuses, and 20 threads writing the same request at once."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from tests.unit.control.helpers import admit, make_org, spend
from tokenforge.control import metering
from tokenforge.control.metering import MeteredRequest, Usage
from tokenforge.control.pricing import Price
from tokenforge.control.store.models import Budget, DailyUsage, Reservation, UsageRecord

SMALL = Price(input_micros=100_000, cached_input_micros=50_000, output_micros=200_000)  # $0.10/0.05/0.20 per 1M
BIG = Price(input_micros=900_000, cached_input_micros=450_000, output_micros=900_000)
NOW = datetime(2025, 3, 14, 10, 0, tzinfo=UTC)
LIMIT = 1_000_000
ADMISSION = {"limit_micros": LIMIT, "key_id": "key_1", "started_s_ago": 1.5}


def make_metered(store, org_id: str, model: str, price: Price, used: Usage, now: datetime,
                 request_id: str | None = None) -> MeteredRequest:
    """A request admitted as the server admits it: its worst case reserved, started a second and a half ago."""
    return admit(store, org_id, model, price, used, now, **ADMISSION, request_id=request_id)


def spent_and_reserved(store, org_id: str, month: str = "2025-03") -> tuple[int, int]:
    with store.transaction() as db:
        row = db.get(Budget, (org_id, month))
        return row.spent_micros, row.reserved_micros


def daily(store, org_id: str) -> list[tuple]:
    """The organisation's roll-up rows: (day, model, requests, prompt, cached, completion tokens, cost)."""
    with store.transaction() as db:
        rows = db.scalars(select(DailyUsage).where(DailyUsage.org_id == org_id)
                          .order_by(DailyUsage.day, DailyUsage.model))
        return [(r.day, r.model, r.num_requests, r.num_prompt_tokens, r.num_cached_tokens, r.num_completion_tokens,
                 r.cost_micros) for r in rows]


def test_one_record_with_its_prices_and_cost(store):
    acme = make_org(store, "acme")
    req = make_metered(store, acme, "small", SMALL, Usage(1_000, 200, 500), NOW)
    assert spent_and_reserved(store, acme) == (0, 200)  # worst case: 1000 x 0.10 + 500 x 0.20
    with store.transaction() as db:
        # 800 uncached x 0.10 + 200 cached x 0.05 + 500 out x 0.20 = 80 + 10 + 100 = 190 micros
        assert metering.write_usage(db, req, Usage(1_000, 200, 500), "ok", now=NOW) == 190
    with store.transaction() as db:
        record = db.scalars(select(UsageRecord)).one()
        assert (record.request_id, record.org_id, record.key_id, record.model, record.endpoint, record.status) == (
            req.request_id, acme, "key_1", "small", "chat", "ok")
        assert (record.num_prompt_tokens, record.num_cached_tokens, record.num_completion_tokens) == (1_000, 200, 500)
        assert (record.input_price_micros, record.cached_input_price_micros, record.output_price_micros) == (
            100_000, 50_000, 200_000)
        assert (record.cost_micros, record.latency_ms, record.created_at) == (190, 1_500, NOW)
        assert db.scalars(select(Reservation)).all() == []
    assert spent_and_reserved(store, acme) == (190, 0)


def test_daily_roll_up_per_org_day_and_model(store):
    acme, globex = make_org(store, "acme"), make_org(store, "globex")
    day_end = datetime(2025, 3, 14, 23, 59, 59, tzinfo=UTC)
    assert spend(store, acme, "small", SMALL, Usage(1_000, 200, 500), NOW, **ADMISSION) == 190
    # 3 x 0.10 + 1 x 0.20 = 0.5 micros, rounded up to 1
    assert spend(store, acme, "small", SMALL, Usage(3, 0, 1), NOW + timedelta(hours=1), **ADMISSION) == 1
    assert spend(store, acme, "small", SMALL, Usage(2_000, 0, 0), day_end, **ADMISSION) == 200
    # 1000 x 0.90 + 1000 x 0.90 = 1800 micros: another model, its own row
    assert spend(store, acme, "big", BIG, Usage(1_000, 0, 1_000), NOW, **ADMISSION) == 1_800
    # 10 x 0.10 + 10 x 0.20 = 3 micros, on the next UTC day (midnight)
    assert spend(store, acme, "small", SMALL, Usage(10, 0, 10), day_end + timedelta(seconds=1), **ADMISSION) == 3
    # 100 x 0.10 = 10 micros: another organisation
    assert spend(store, globex, "small", SMALL, Usage(100, 0, 0), NOW, **ADMISSION) == 10
    assert daily(store, acme) == [
        (date(2025, 3, 14), "big", 1, 1_000, 0, 1_000, 1_800),
        (date(2025, 3, 14), "small", 3, 3_003, 200, 501, 190 + 1 + 200),
        (date(2025, 3, 15), "small", 1, 10, 0, 10, 3),
    ]
    assert daily(store, globex) == [(date(2025, 3, 14), "small", 1, 100, 0, 0, 10)]
    assert spent_and_reserved(store, acme) == (190 + 1 + 200 + 1_800 + 3, 0)


def test_a_second_write_of_the_same_request_changes_nothing(store):
    acme = make_org(store, "acme")
    req = make_metered(store, acme, "small", SMALL, Usage(1_000, 0, 1_000), NOW)
    with store.transaction() as db:
        # 1000 x 0.10 + 1000 x 0.20 = 300 micros
        assert metering.write_usage(db, req, Usage(1_000, 0, 1_000), "ok", now=NOW) == 300
    before = daily(store, acme), spent_and_reserved(store, acme)
    with store.transaction() as db:
        assert metering.write_usage(db, req, Usage(5_000, 0, 5_000), "error", now=NOW + timedelta(seconds=5)) is None
    with store.transaction() as db:
        assert db.scalar(select(func.count()).select_from(UsageRecord)) == 1
        assert db.scalars(select(UsageRecord.status)).one() == "ok"
    assert (daily(store, acme), spent_and_reserved(store, acme)) == before == (
        [(date(2025, 3, 14), "small", 1, 1_000, 0, 1_000, 300)], (300, 0))


def test_statuses(store):
    acme = make_org(store, "acme")
    req = make_metered(store, acme, "small", SMALL, Usage(10, 0, 0), NOW)
    with store.transaction() as db:
        with pytest.raises(ValueError, match="status"):
            metering.write_usage(db, req, Usage(10, 0, 0), "cancelled", now=NOW)
        assert db.scalars(select(UsageRecord)).all() == []
    assert spent_and_reserved(store, acme) == (0, 1)  # still held
    for status in ("ok", "client_closed", "error", "refused"):
        assert spend(store, acme, "small", SMALL, Usage(10, 0, 0), NOW, status, **ADMISSION) == 1
    with store.transaction() as db:
        assert sorted(db.scalars(select(UsageRecord.status))) == ["client_closed", "error", "ok", "refused"]


def test_twenty_threads_writing_one_request_count_it_once(store):
    acme = make_org(store, "acme")
    used = Usage(1_000, 0, 1_000)  # 300 micros
    req = make_metered(store, acme, "small", SMALL, used, NOW)
    start = threading.Barrier(20)

    def write(_: int):
        start.wait()
        try:
            with store.transaction() as db:
                return metering.write_usage(db, req, used, "ok", now=NOW)
        except IntegrityError:
            return "lost"  # the unique request_id refused a concurrent duplicate

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(write, range(20)))
    assert results.count(300) == 1
    assert all(result in (None, "lost") for result in results if result != 300)
    with store.transaction() as db:
        assert db.scalar(select(func.count()).select_from(UsageRecord)) == 1
    assert daily(store, acme) == [(date(2025, 3, 14), "small", 1, 1_000, 0, 1_000, 300)]
    assert spent_and_reserved(store, acme) == (300, 0)
