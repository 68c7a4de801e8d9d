"""Rate limits on SQLite, PostgreSQL and Redis (127.0.0.1:6379): counts and remaining, all or nothing
across subjects, window reset, headers, requests too large to ever pass, 50 threads against a limit
of 20, two limiters sharing one limit, old windows pruned, and an unreachable backend failing closed.
The clock is injected: no test sleeps."""

import contextlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import create_engine, select

from tests.store_helpers import make_store
from tokenforge.control.errors import RateLimitError, StoreUnavailableError
from tokenforge.control.rate_limits import (Allowance, RateLimitState, RedisRateLimiter, StoreRateLimiter,
                                            format_duration, make_rate_limiter)
from tokenforge.control.store.db import Store
from tokenforge.control.store.models import RateCounter
from tokenforge.errors import ConfigError

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW_START = 1_700_000_040  # a unix minute
ORG = "org:org_1"
KEY = "key:key_1"


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(WINDOW_START + 10.0)


def _delete_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def make_limiter(request, tmp_path, clock):
    """A factory of limiters of one backend that share their counters (one store, or one key prefix)."""
    limiters = []
    with contextlib.ExitStack() as stack:
        if request.param == "redis":
            key_prefix = f"tokenforge-test:{uuid.uuid4().hex}:"
            stack.callback(_delete_keys, key_prefix)

            def make():
                return RedisRateLimiter(REDIS_URL, clock, key_prefix=key_prefix)
        else:
            store = stack.enter_context(make_store(request.param, tmp_path))

            def make():
                return StoreRateLimiter(store, clock)

        def make_and_keep():
            limiters.append(make())
            return limiters[-1]

        yield make_and_keep
        for limiter in limiters:
            limiter.close()


@pytest.fixture
def limiter(make_limiter):
    return make_limiter()


def make_allowances(org_rpm: int = 100, org_tpm: int = 10_000, key_rpm: int = 100, key_tpm: int = 10_000):
    return [Allowance(ORG, org_rpm, org_tpm), Allowance(KEY, key_rpm, key_tpm)]


def test_counts_and_remaining(limiter):
    allowances = [Allowance(ORG, requests_per_minute=10, tokens_per_minute=1_000)]
    assert limiter.hit(allowances, 1, 100) == RateLimitState(10, 9, 50.0, 1_000, 900, 50.0)
    assert limiter.hit(allowances, 2, 300) == RateLimitState(10, 7, 50.0, 1_000, 600, 50.0)
    # Reading counts nothing.
    assert limiter.hit(allowances, 0, 0) == RateLimitState(10, 7, 50.0, 1_000, 600, 50.0)
    assert limiter.hit(allowances, 0, 0) == RateLimitState(10, 7, 50.0, 1_000, 600, 50.0)


def test_reading_an_unknown_subject_shows_the_full_limits(limiter):
    assert limiter.hit([Allowance(ORG, 5, 50)], 0, 0) == RateLimitState(5, 5, 50.0, 50, 50, 50.0)


def test_state_is_the_tightest_subject_for_requests_and_for_tokens(limiter):
    state = limiter.hit(make_allowances(org_rpm=100, org_tpm=1_000, key_rpm=5, key_tpm=10_000), 1, 10)
    assert (state.limit_requests, state.remaining_requests) == (5, 4)
    assert (state.limit_tokens, state.remaining_tokens) == (1_000, 990)


def test_requests_refused_on_the_org_count_nothing_on_the_key(limiter):
    allowances = make_allowances(org_rpm=2, key_rpm=10)
    limiter.hit(allowances, 1, 10)
    limiter.hit(allowances, 1, 10)
    with pytest.raises(RateLimitError) as refused:
        limiter.hit(allowances, 1, 10)
    assert "org:org_1 on requests per minute: Limit 2, Used 2, Requested 1" in str(refused.value)
    key_state = limiter.hit([Allowance(KEY, 10, 10_000)], 0, 0)
    assert (key_state.remaining_requests, key_state.remaining_tokens) == (8, 9_980)


def test_tokens_refused_on_the_key_count_nothing_on_the_org(limiter):
    allowances = make_allowances(org_tpm=10_000, key_tpm=500)
    limiter.hit(allowances, 1, 400)
    with pytest.raises(RateLimitError) as refused:
        limiter.hit(allowances, 1, 101)
    assert "key:key_1 on tokens per minute: Limit 500, Used 400, Requested 101" in str(refused.value)
    org_state = limiter.hit([Allowance(ORG, 100, 10_000)], 0, 0)
    assert (org_state.remaining_requests, org_state.remaining_tokens) == (99, 9_600)
    # What still fits passes.
    assert limiter.hit(allowances, 1, 100).remaining_tokens == 0


def test_refusal_carries_retry_after_and_headers(limiter):
    allowances = [Allowance(ORG, 1, 1_000)]
    limiter.hit(allowances, 1, 10)
    with pytest.raises(RateLimitError) as refused:
        limiter.hit(allowances, 1, 10)
    error = refused.value
    assert (error.status_code, error.code, error.retry_after_s) == (429, "rate_limit_exceeded", 50)
    assert error.headers == {
        "x-ratelimit-limit-requests": "1", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "50s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "990", "x-ratelimit-reset-tokens": "50s", "retry-after": "50",
    }


def test_retry_after_is_at_least_one_second(limiter, clock):
    allowances = [Allowance(ORG, 1, 1_000)]
    clock.advance(49.9)  # 0.1 s before the window ends
    limiter.hit(allowances, 1, 10)
    with pytest.raises(RateLimitError) as refused:
        limiter.hit(allowances, 1, 10)
    assert refused.value.retry_after_s == 1
    assert refused.value.headers["x-ratelimit-reset-requests"] == "100ms"


def test_window_resets_when_the_clock_moves_a_minute(limiter, clock):
    allowances = make_allowances(org_rpm=2, org_tpm=100)
    limiter.hit(allowances, 2, 100)
    with pytest.raises(RateLimitError):
        limiter.hit(allowances, 1, 0)
    clock.advance(60)
    assert limiter.hit(allowances, 1, 50) == RateLimitState(2, 1, 50.0, 100, 50, 50.0)
    clock.advance(-60)  # the old window still holds its counts
    assert limiter.hit(allowances, 0, 0).remaining_requests == 0


def test_request_larger_than_the_token_limit_never_passes(limiter):
    allowances = make_allowances(key_tpm=1_000)
    with pytest.raises(RateLimitError) as refused:
        limiter.hit(allowances, 1, 1_001)
    message = str(refused.value)
    assert "key:key_1 on tokens per minute: Limit 1000, Requested 1001" in message
    assert "never" in message
    assert refused.value.retry_after_s == 50
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "1000"
    assert limiter.hit(allowances, 0, 0).remaining_requests == 100  # nothing counted


def test_zero_requests_per_minute_refuses_everything(limiter):
    with pytest.raises(RateLimitError, match="requests per minute: Limit 0"):
        limiter.hit([Allowance(ORG, 0, 1_000)], 1, 1)


def test_fifty_threads_against_a_limit_of_twenty(limiter):
    allowances = make_allowances(org_rpm=20, key_rpm=1_000)
    start = threading.Barrier(50)

    def one_request(_: int) -> bool:
        start.wait()
        try:
            limiter.hit(allowances, 1, 10)
        except RateLimitError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=50) as pool:
        passed = list(pool.map(one_request, range(50)))
    assert sum(passed) == 20
    state = limiter.hit(allowances, 0, 0)
    assert (state.limit_requests, state.remaining_requests, state.remaining_tokens) == (20, 0, 9_800)
    assert limiter.hit([Allowance(KEY, 1_000, 10_000)], 0, 0).remaining_requests == 980


def test_two_limiters_share_one_limit(make_limiter):
    first, second = make_limiter(), make_limiter()
    allowances = [Allowance(ORG, 3, 1_000)]
    first.hit(allowances, 1, 10)
    second.hit(allowances, 1, 10)
    assert first.hit(allowances, 1, 10).remaining_requests == 0
    with pytest.raises(RateLimitError):
        second.hit(allowances, 1, 10)


@pytest.mark.parametrize("allowances, num_requests, num_tokens", [
    ([], 1, 1),
    ([Allowance(ORG, 1, 1), Allowance(ORG, 2, 2)], 1, 1),
    ([Allowance(ORG, 1, 1)], -1, 0),
    ([Allowance(ORG, 1, 1)], 0, -1),
])
def test_bad_arguments(allowances, num_requests, num_tokens):
    limiter = StoreRateLimiter(Store(create_engine("sqlite://")))  # never reached
    with pytest.raises(ValueError):
        limiter.hit(allowances, num_requests, num_tokens)


def test_negative_allowance_is_refused():
    with pytest.raises(ValueError, match="negative"):
        Allowance(ORG, -1, 10)


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.0004, "0s"), (0.02, "20ms"), (0.999, "999ms"), (1, "1s"), (6.5, "6.5s"),
    (59.9994, "59.999s"), (60, "1m0s"), (360, "6m0s"), (61.25, "1m1.25s"), (3661, "1h1m1s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_headers():
    state = RateLimitState(600, 599, 59.98, 1_000_000, 999_000, 0.02)
    assert state.headers() == {
        "x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599",
        "x-ratelimit-reset-requests": "59.98s", "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "999000", "x-ratelimit-reset-tokens": "20ms",
    }


def test_store_prunes_old_windows(store, clock):
    limiter = StoreRateLimiter(store, clock, num_calls_per_prune=2)
    allowances = [Allowance(ORG, 10, 100)]
    limiter.hit(allowances, 1, 1)  # call 0 prunes (nothing yet), then counts
    clock.advance(180)
    limiter.hit(allowances, 1, 1)  # call 1: no pruning
    with store.transaction() as db:
        assert db.scalars(select(RateCounter.window_start)).all() == [WINDOW_START, WINDOW_START + 180]
    limiter.hit(allowances, 1, 1)  # call 2 prunes windows that started over 120 s before this one
    with store.transaction() as db:
        assert db.scalars(select(RateCounter.window_start)).all() == [WINDOW_START + 180]


def test_unreachable_store_fails_closed():
    limiter = StoreRateLimiter(Store(create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")))
    with pytest.raises(StoreUnavailableError):
        limiter.hit([Allowance(ORG, 10, 100)], 1, 1)


def test_unreachable_redis_fails_closed():
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailableError, match="Redis"):
        limiter.hit([Allowance(ORG, 10, 100)], 1, 1)
    with pytest.raises(StoreUnavailableError):
        limiter.hit([Allowance(ORG, 10, 100)], 0, 0)
    limiter.close()


def test_redis_keys_expire_after_their_window(clock):
    key_prefix = f"tokenforge-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter(REDIS_URL, clock, key_prefix=key_prefix)
    try:
        limiter.hit([Allowance(ORG, 10, 100)], 1, 1)
        client = redis.Redis.from_url(REDIS_URL)
        key = f"{key_prefix}{ORG}:{WINDOW_START}"
        assert client.hgetall(key) == {b"requests": b"1", b"tokens": b"1"}
        assert 100 < client.ttl(key) <= 110  # 50 s left in the window, then a 60 s margin
        client.close()
    finally:
        limiter.close()
        _delete_keys(key_prefix)


def test_make_rate_limiter(tmp_path):
    with make_store("sqlite", tmp_path) as store:
        limiter = make_rate_limiter(store, None)
        assert isinstance(limiter, StoreRateLimiter)
        limiter = make_rate_limiter(store, REDIS_URL)
        assert isinstance(limiter, RedisRateLimiter)
        limiter.close()
    with pytest.raises(ConfigError):
        RedisRateLimiter("ftp://127.0.0.1/0")
