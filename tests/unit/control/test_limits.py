"""Spending limits on both store backends: reserving the worst case within the month's limit (and
holding nothing when refused), settling to the real cost, expired reservations released exactly
once, a request that settles in the next month, spend alerts, and 40 threads against one limit."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tests.unit.control.helpers import make_org
from tokenforge.control import audit, limits, metering
from tokenforge.control.errors import QuotaExceededError
from tokenforge.control.metering import MeteredRequest, Usage
from tokenforge.control.pricing import Price
from tokenforge.control.store.models import Budget, Reservation, UsageRecord

SMALL = Price(input_micros=100_000, cached_input_micros=50_000, output_micros=200_000)  # $0.10/0.05/0.20 per 1M
NOW = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


def reserve(store, org_id: str, request_id: str, amount_micros: int, limit_micros: int | None,
            now: datetime = NOW, ttl_s: float = 900) -> str:
    with store.transaction() as db:
        return limits.reserve(db, org_id, request_id, amount_micros, limit_micros, ttl_s, now)


def reserve_and_settle(store, org_id: str, cost_micros: int, limit_micros: int | None, now: datetime = NOW) -> None:
    """One request whose worst case is its real cost: reserve it, then settle it."""
    request_id = f"req-{uuid.uuid4().hex}"
    month = reserve(store, org_id, request_id, cost_micros, limit_micros, now)
    with store.transaction() as db:
        limits.settle(db, org_id, request_id, month, cost_micros, now)


def budget(store, org_id: str, month: str = "2025-01") -> tuple[int | None, int, int] | None:
    """(limit, spent, reserved) of the month, None when it has no budget row."""
    with store.transaction() as db:
        row = db.get(Budget, (org_id, month))
        return None if row is None else (row.limit_micros, row.spent_micros, row.reserved_micros)


def reservations(store) -> dict[str, int]:
    with store.transaction() as db:
        rows = db.execute(select(Reservation.request_id, Reservation.amount_micros))
        return {row.request_id: row.amount_micros for row in rows}


def test_reserve_within_the_limit_and_refuse_over_it(store):
    acme, local = make_org(store, "acme"), make_org(store, "local")
    assert reserve(store, acme, "r1", 600, 1_000) == "2025-01"
    assert budget(store, acme) == (1_000, 0, 600)
    with pytest.raises(QuotaExceededError):
        reserve(store, acme, "r2", 401, 1_000)  # 600 + 401 > 1000
    assert budget(store, acme) == (1_000, 0, 600)
    assert reservations(store) == {"r1": 600}
    reserve(store, acme, "r3", 400, 1_000)  # 600 + 400 == 1000 fits exactly
    assert budget(store, acme) == (1_000, 0, 1_000)
    with pytest.raises(QuotaExceededError):
        reserve(store, acme, "r4", 1, 1_000)
    assert reservations(store) == {"r1": 600, "r3": 400}
    # No limit: anything fits.
    reserve(store, local, "big1", 10**15, None)
    reserve(store, local, "big2", 10**15, None)
    assert budget(store, local) == (None, 0, 2 * 10**15)


def test_settle_moves_the_reservation_to_the_real_cost(store):
    acme = make_org(store, "acme")
    month = reserve(store, acme, "r1", 1_000, 10_000)
    reserve(store, acme, "r2", 500, 10_000)
    with store.transaction() as db:
        limits.settle(db, acme, "r1", month, 123, NOW + timedelta(seconds=5))
    assert budget(store, acme) == (10_000, 123, 500)
    assert reservations(store) == {"r2": 500}


def test_settle_after_the_reservation_expired_counts_the_cost_once(store):
    acme = make_org(store, "acme")
    month = reserve(store, acme, "r1", 1_000, 10_000, ttl_s=60)
    with store.transaction() as db:
        assert limits.release_expired(db, NOW + timedelta(seconds=61)) == 1
    assert budget(store, acme) == (10_000, 0, 0)
    with store.transaction() as db:
        limits.settle(db, acme, "r1", month, 300, NOW + timedelta(seconds=70))
    assert budget(store, acme) == (10_000, 300, 0)
    assert reservations(store) == {}


def test_release_expired_frees_exactly_the_expired_ones(store):
    acme, globex = make_org(store, "acme"), make_org(store, "globex")
    reserve(store, acme, "a60", 100, None, ttl_s=60)
    reserve(store, acme, "a120", 200, None, ttl_s=120)
    reserve(store, acme, "a600", 400, None, ttl_s=600)
    reserve(store, globex, "g60", 800, None, ttl_s=60)
    later = NOW + timedelta(seconds=120)  # a120 expires exactly now: released
    with store.transaction() as db:
        assert limits.release_expired(db, later, org_id=globex) == 1
    assert reservations(store) == {"a60": 100, "a120": 200, "a600": 400}
    with store.transaction() as db:
        assert limits.release_expired(db, later) == 2
        assert limits.release_expired(db, later) == 0
    assert reservations(store) == {"a600": 400}
    assert budget(store, acme) == (None, 0, 400)
    assert budget(store, globex) == (None, 0, 0)
    with store.transaction() as db:
        events = audit.list_events(db, action="reservation.expired")
    assert {(e.org_id, e.target, e.actor, e.detail["amount_micros"]) for e in events} == {
        (acme, "a120", "system", 200), (acme, "a60", "system", 100), (globex, "g60", "system", 800)}
    assert len(events) == 3


def test_a_request_settled_in_the_next_month_spends_from_the_next_month(store):
    acme = make_org(store, "acme")
    last_second = datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC)
    month = reserve(store, acme, "r1", 1_000, 5_000, now=last_second)
    assert month == "2025-01"
    req = MeteredRequest(request_id="r1", org_id=acme, key_id=None, model="small", endpoint="chat", price=SMALL,
                         month=month, started_at=last_second)
    with store.transaction() as db:
        # 1000 x 0.10 + 500 x 0.20 = 100 + 100 = 200 micros
        first_second = last_second + timedelta(seconds=1)
        assert metering.write_usage(db, req, Usage(1_000, 0, 500), "ok", now=first_second) == 200
    assert budget(store, acme, "2025-01") == (5_000, 0, 0)
    assert budget(store, acme, "2025-02") == (5_000, 200, 0)
    assert reservations(store) == {}
    with store.transaction() as db:
        record = db.scalars(select(UsageRecord)).one()
        assert record.created_at == datetime(2025, 2, 1, tzinfo=UTC)


def test_spend_alerts_once_per_threshold(store):
    acme, globex = make_org(store, "acme"), make_org(store, "globex")

    def alerts(org_id: str) -> list[tuple[int, int, int]]:
        with store.transaction() as db:
            return [(e.detail["percent"], e.detail["spent_micros"], e.detail["limit_micros"])
                    for e in audit.list_events(db, org_id, "budget.alert")]

    reserve_and_settle(store, acme, 499, 1_000)  # 49%
    assert alerts(acme) == []
    reserve_and_settle(store, acme, 1, 1_000)  # 50%
    assert alerts(acme) == [(50, 500, 1_000)]
    reserve_and_settle(store, acme, 100, 1_000)  # 60%
    reserve_and_settle(store, acme, 200, 1_000)  # 80%
    assert alerts(acme) == [(50, 500, 1_000), (75, 800, 1_000)]
    reserve_and_settle(store, acme, 50, 1_000)  # 85%
    reserve_and_settle(store, acme, 100, 1_000)  # 95%
    reserve_and_settle(store, acme, 50, 1_000)  # 100%
    assert alerts(acme) == [(50, 500, 1_000), (75, 800, 1_000), (90, 950, 1_000)]
    assert budget(store, acme) == (1_000, 1_000, 0)
    # 0% to 80% in one request crosses 50 and 75: only 75 is written, and 50 never afterwards.
    reserve_and_settle(store, globex, 800, 1_000)
    reserve_and_settle(store, globex, 10, 1_000)
    assert alerts(globex) == [(75, 800, 1_000)]
    reserve_and_settle(store, globex, 90, 1_000)  # 90%
    assert alerts(globex) == [(75, 800, 1_000), (90, 900, 1_000)]
    with store.transaction() as db:
        assert {e.actor for e in audit.list_events(db, action="budget.alert")} == {"system"}
        assert {e.target for e in audit.list_events(db, action="budget.alert")} == {"2025-01"}


def test_forty_threads_against_a_limit_holding_ten(store):
    acme = make_org(store, "acme")
    amount = 250
    start = threading.Barrier(40)

    def one_request(i: int) -> bool:
        start.wait()
        try:
            reserve(store, acme, f"req-{i}", amount, 10 * amount)
        except QuotaExceededError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=40) as pool:
        passed = list(pool.map(one_request, range(40)))
    assert sum(passed) == 10
    assert budget(store, acme) == (10 * amount, 0, 10 * amount)
    assert sorted(reservations(store)) == sorted(f"req-{i}" for i, ok in enumerate(passed) if ok)
