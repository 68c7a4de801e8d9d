"""GroupCommit on SQLite and PostgreSQL: jobs queued meanwhile share one transaction; a job that
raises takes back only its own writes; a cancelled job never runs; and admissions through the
control plane, grouped with refused ones, count each request once in Redis as in the store."""

import threading
import uuid
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import func, select

from tokenforge.control import audit, keys, limits, organizations
from tokenforge.control.errors import QuotaExceededError
from tokenforge.control.plane import ControlPlane
from tokenforge.control.pricing import ModelFacts, PriceBook
from tokenforge.control.rate_limits import RedisRateLimiter, StoreRateLimiter
from tokenforge.control.store.group_commit import GroupCommit
from tokenforge.control.store.models import AuditEvent, Budget, RateCounter
from tokenforge.control.tiers import TierLadder

from tests.unit.control.helpers import make_org

REDIS_URL = "redis://127.0.0.1:6379/0"
MODEL = ModelFacts("m", 135_000_000)  # $0.10 per million tokens in and out


def record(name: str):
    """A job that appends one audit event (a row to count) and returns the session it ran in."""
    def work(db):
        audit.record(db, audit.CLI, "test.job", None, name)
        return db
    return work


def fail_after_writing(name: str):
    def work(db):
        record(name)(db)
        db.flush()
        raise QuotaExceededError(f"{name} refused")
    return work


def recorded(store) -> list[str]:
    with store.reading() as db:
        return sorted(db.scalars(select(AuditEvent.target).where(AuditEvent.action == "test.job")))


def hold_writer(writes: GroupCommit) -> threading.Event:
    """Keeps the writer busy in a job until the returned event is set: what is submitted meanwhile
    queues, and runs as one batch after."""
    release, started = threading.Event(), threading.Event()

    def block(db):
        started.set()
        release.wait(30)
    writes.submit(block)
    assert started.wait(30)
    return release


@pytest.fixture
def writes(store):
    group = GroupCommit(store)
    yield group
    group.close()


def test_jobs_queued_meanwhile_share_one_transaction(store, writes):
    release = hold_writer(writes)
    futures = [writes.submit(record(f"job-{i}")) for i in range(10)]
    release.set()
    sessions = {id(future.result(30)) for future in futures}
    assert len(sessions) == 1
    assert recorded(store) == sorted(f"job-{i}" for i in range(10))


def test_a_raising_job_takes_back_only_its_own_writes(store, writes):
    release = hold_writer(writes)
    before = writes.submit(record("before"))
    refused = writes.submit(fail_after_writing("refused"))
    after = writes.submit(record("after"))
    release.set()
    before.result(30), after.result(30)
    with pytest.raises(QuotaExceededError, match="refused refused"):
        refused.result(30)
    assert recorded(store) == ["after", "before"]


def test_a_cancelled_job_never_runs(store, writes):
    release = hold_writer(writes)
    cancelled = writes.submit(record("cancelled"))
    kept = writes.submit(record("kept"))
    assert cancelled.cancel()
    release.set()
    kept.result(30)
    assert recorded(store) == ["kept"]


def test_close_runs_what_was_submitted_then_refuses(store):
    group = GroupCommit(store)
    futures = [group.submit(record(f"job-{i}")) for i in range(5)]
    group.close()
    assert all(future.done() for future in futures)
    assert len(recorded(store)) == 5
    with pytest.raises(RuntimeError, match="closed"):
        group.submit(record("late"))


def new_org(plane: ControlPlane, limit_micros: int | None) -> tuple[str, keys.Principal]:
    org_id = make_org(plane.store, f"org-{uuid.uuid4().hex[:8]}", plane.ladder)
    with plane.store.transaction() as db:
        if limit_micros is not None:
            organizations.set_custom_limit(db, org_id, limit_micros, audit.CLI, plane.ladder)
        plaintext = keys.create_key(db, org_id, audit.CLI)[1]
    return org_id, plane.authenticate(plaintext, "inference")


@pytest.mark.parametrize("limiter_kind", ["store", "redis"])
def test_admissions_grouped_with_a_refused_one_are_counted_once(store, limiter_kind):
    limiter = StoreRateLimiter(store) if limiter_kind == "store" else \
        RedisRateLimiter(REDIS_URL, key_prefix=f"tf-test-{uuid.uuid4().hex}:")
    plane = ControlPlane(store, PriceBook.default(), TierLadder.default(), limiter)
    try:
        poor_id, poor = new_org(plane, limit_micros=1)
        rich_id, rich = new_org(plane, limit_micros=None)
        release = hold_writer(plane.writes)
        # 1,000 + 1,000 tokens cost 200 micros: over the poor org's 1 micro, within the rich one's tier
        futures = [plane.admit(principal, f"req-{i}-{uuid.uuid4().hex[:6]}", MODEL, "chat", 1_000, 1_000)
                   for i, principal in enumerate([rich, poor, rich, poor, rich])]
        release.set()
        admitted = [futures[i].result(30) for i in (0, 2, 4)]
        for i in (1, 3):
            with pytest.raises(QuotaExceededError):
                futures[i].result(30)
        assert [a.rate_limit.remaining_requests for a in admitted] == [
            admitted[0].rate_limit.limit_requests - n for n in (1, 2, 3)]
        month = limits.month_of(datetime.now(UTC))
        with store.reading() as db:
            assert db.get(Budget, (rich_id, month)).reserved_micros == 3 * 200
            assert db.get(Budget, (poor_id, month)).reserved_micros == 0
            if limiter_kind == "store":
                counted = db.scalar(select(func.sum(RateCounter.num_requests))
                                    .where(RateCounter.subject == f"org:{rich_id}"))
                assert counted == 3
    finally:
        plane.close()
        if limiter_kind == "redis":
            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(f"{limiter._key_prefix}*"):
                client.delete(key)
