"""Requests- and tokens-per-minute limits (the x-ratelimit-* headers), counted in the store's
rate_counters table (StoreRateLimiter) or in Redis shared by several server processes (RedisRateLimiter).

Windows are fixed and aligned to the unix minute (window_start = floor(now / 60) * 60): simple and
exact, at the price of letting a subject reach up to twice its limit across a window boundary.
"""

import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis
from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from tokenforge.control.errors import RateLimitError, StoreUnavailableError
from tokenforge.control.store.db import Store, dialect_insert, dialect_of
from tokenforge.control.store.models import RateCounter
from tokenforge.errors import ConfigError

WINDOW_S = 60
# Store rows of windows older than this are deleted now and then; Redis keys expire this long after
# their window ends, so a process whose clock runs a little behind still finds its window's key.
KEEP_OLD_WINDOWS_S = 120
REDIS_EXPIRY_MARGIN_S = 60
REDIS_TIMEOUT_S = 2.0

Used = dict[str, tuple[int, int]]  # subject -> (num_requests, num_tokens) counted in the window


@dataclass(frozen=True)
class Allowance:
    """One subject's per-minute limits, e.g.
    Allowance("org:org_123", requests_per_minute=600, tokens_per_minute=1_000_000)."""

    subject: str
    requests_per_minute: int
    tokens_per_minute: int

    def __post_init__(self):
        if self.requests_per_minute < 0 or self.tokens_per_minute < 0:
            raise ValueError(f"negative per-minute limit for {self.subject!r}")


@dataclass(frozen=True)
class RateLimitState:
    """What the x-ratelimit-* headers say: the tightest of the subjects checked."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-reset-requests": format_duration(self.reset_requests_s),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
            "x-ratelimit-reset-tokens": format_duration(self.reset_tokens_s),
        }


class RateLimiter(Protocol):
    # True when hit(db=...) counts in db's transaction (and a rollback takes the counts back)
    counts_in_transaction: bool

    def hit(self, allowances: Sequence[Allowance], num_requests: int, num_tokens: int,
            db: Session | None = None) -> RateLimitState:
        """Counts num_requests and num_tokens against every allowance, all or nothing: if any subject
        would go over its per-minute limit, nothing is counted and RateLimitError is raised.
        num_requests=0, num_tokens=0 only reads the state. StoreUnavailableError: fail closed."""
        ...

    def close(self) -> None: ...


def format_duration(seconds: float) -> str:
    """OpenAI's (Go's) duration style at millisecond precision: "20ms", "1s", "6.5s", "6m0s"."""
    num_ms = round(seconds * 1000)
    if num_ms <= 0:
        return "0s"
    if num_ms < 1000:
        return f"{num_ms}ms"
    num_minutes, num_ms = divmod(num_ms, 60_000)
    num_hours, num_minutes = divmod(num_minutes, 60)
    text = f"{num_hours}h" if num_hours else ""
    if num_hours or num_minutes:
        text += f"{num_minutes}m"
    return text + f"{num_ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"


class _WindowLimiter:
    """hit() for fixed one-minute windows; subclasses keep the counters (_read, _count)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock

    def hit(self, allowances: Sequence[Allowance], num_requests: int, num_tokens: int,
            db: Session | None = None) -> RateLimitState:
        allowances = _checked(allowances, num_requests, num_tokens)
        now = self._clock()
        window_start = int(now // WINDOW_S) * WINDOW_S
        reset_s = window_start + WINDOW_S - now
        too_large = _too_large(allowances, num_requests, num_tokens)
        denied = None
        if too_large is not None or (num_requests == 0 and num_tokens == 0):
            used = self._read(allowances, window_start, db)
        else:
            denied, used = self._count(allowances, window_start, num_requests, num_tokens, reset_s, db)
        state = _state_of(allowances, used, reset_s)
        if too_large is not None:
            raise _refusal(too_large, used, num_requests, num_tokens, state, never=True)
        if denied is not None:
            raise _refusal(denied, used, num_requests, num_tokens, state, never=False)
        return state

    def _read(self, allowances: list[Allowance], window_start: int, db: Session | None) -> Used:
        raise NotImplementedError

    def _count(self, allowances: list[Allowance], window_start: int, num_requests: int, num_tokens: int,
               reset_s: float, db: Session | None) -> tuple[Allowance | None, Used]:
        """Counts against all allowances or none; returns the first one that refused (None: counted)
        and the counts as they now stand (without this request's when refused)."""
        raise NotImplementedError


def _checked(allowances: Sequence[Allowance], num_requests: int, num_tokens: int) -> list[Allowance]:
    """The allowances sorted by subject: every limiter takes its row locks in that order (no deadlocks)."""
    if not allowances:
        raise ValueError("hit() needs at least one allowance")
    if num_requests < 0 or num_tokens < 0:
        raise ValueError(f"negative counts: num_requests={num_requests}, num_tokens={num_tokens}")
    subjects = [allowance.subject for allowance in allowances]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"an allowance subject appears twice: {subjects}")
    return sorted(allowances, key=lambda allowance: allowance.subject)


def _too_large(allowances: list[Allowance], num_requests: int, num_tokens: int) -> Allowance | None:
    """The allowance a request this large could not fit even in an empty window, if any."""
    for allowance in allowances:
        if num_requests > allowance.requests_per_minute or num_tokens > allowance.tokens_per_minute:
            return allowance
    return None


def _state_of(allowances: list[Allowance], used: Used, reset_s: float) -> RateLimitState:
    """Requests and tokens each from the subject with the fewest remaining (then the lowest limit)."""
    def remaining(limit: int, num_used: int) -> int:
        return max(0, limit - num_used)

    by_requests = min(allowances, key=lambda a: (remaining(a.requests_per_minute, used[a.subject][0]),
                                                 a.requests_per_minute))
    by_tokens = min(allowances, key=lambda a: (remaining(a.tokens_per_minute, used[a.subject][1]),
                                               a.tokens_per_minute))
    return RateLimitState(
        limit_requests=by_requests.requests_per_minute,
        remaining_requests=remaining(by_requests.requests_per_minute, used[by_requests.subject][0]),
        reset_requests_s=reset_s,
        limit_tokens=by_tokens.tokens_per_minute,
        remaining_tokens=remaining(by_tokens.tokens_per_minute, used[by_tokens.subject][1]),
        reset_tokens_s=reset_s,
    )


def _refusal(allowance: Allowance, used: Used, num_requests: int, num_tokens: int, state: RateLimitState,
             never: bool) -> RateLimitError:
    """The 429 for `allowance`: which limit (requests or tokens), its value, and when to retry."""
    num_used_requests, num_used_tokens = used[allowance.subject]
    if num_requests > allowance.requests_per_minute or (
            not never and num_used_requests + num_requests > allowance.requests_per_minute):
        kind, limit, num_used, num_asked = "requests", allowance.requests_per_minute, num_used_requests, num_requests
    else:
        kind, limit, num_used, num_asked = "tokens", allowance.tokens_per_minute, num_used_tokens, num_tokens
    retry_after_s = max(1, math.ceil(state.reset_requests_s))
    headers = state.headers() | {"retry-after": str(retry_after_s)}
    if never:
        message = (f"Request too large for {allowance.subject} on {kind} per minute: Limit {limit}, "
                   f"Requested {num_asked}. It can never fit in one minute: ask for fewer {kind}.")
    else:
        message = (f"Rate limit reached for {allowance.subject} on {kind} per minute: Limit {limit}, "
                   f"Used {num_used}, Requested {num_asked}. Please try again in {retry_after_s}s.")
    return RateLimitError(message, retry_after_s=retry_after_s, headers=headers)


class _Refused(Exception):
    """Raised inside a store transaction to roll back what it counted."""

    def __init__(self, allowance: Allowance, used: Used):
        super().__init__(allowance.subject)
        self.allowance = allowance
        self.used = used


class StoreRateLimiter(_WindowLimiter):
    """Counters in the RateCounter table: one guarded upsert per subject in one transaction
    (`... ON CONFLICT DO UPDATE ... WHERE num_requests + :n <= :limit AND num_tokens + :t <= :limit`);
    one that changes no row rolls the whole transaction back. Atomic under any concurrency, like limits.py."""

    counts_in_transaction = True

    def __init__(self, store: Store, clock: Callable[[], float] = time.time, num_calls_per_prune: int = 1000):
        super().__init__(clock)
        self._store = store
        self._num_calls_per_prune = num_calls_per_prune
        self._num_calls = itertools.count()  # next() is atomic under the GIL

    def _read(self, allowances: list[Allowance], window_start: int, db: Session | None) -> Used:
        if db is not None:
            return _select_used(db, allowances, window_start)
        with self._store.reading() as db:
            return _select_used(db, allowances, window_start)

    def _count(self, allowances: list[Allowance], window_start: int, num_requests: int, num_tokens: int,
               reset_s: float, db: Session | None) -> tuple[Allowance | None, Used]:
        """In `db`'s transaction when given (hit() then raises on a refusal, and that transaction must
        roll back: the caller's `with store.transaction()` does), else in its own."""
        prune = next(self._num_calls) % self._num_calls_per_prune == 0
        try:
            if db is not None:
                return None, self._count_in(db, allowances, window_start, num_requests, num_tokens, prune)
            with self._store.transaction() as db:
                return None, self._count_in(db, allowances, window_start, num_requests, num_tokens, prune)
        except _Refused as refused:
            return refused.allowance, refused.used

    def _count_in(self, db: Session, allowances: list[Allowance], window_start: int, num_requests: int,
                  num_tokens: int, prune: bool) -> Used:
        """One guarded upsert per subject, which returns the subject's new counts, or nothing when
        the subject's limit refused (then _Refused rolls back what the others counted)."""
        if prune:
            self.prune(window_start, db)
        statement = _count_statement(dialect_of(db))
        used = {}
        for index, allowance in enumerate(allowances):
            row = db.execute(statement, {"subject": allowance.subject, "window_start": window_start,
                                         "num_requests": num_requests, "num_tokens": num_tokens,
                                         "requests_per_minute": allowance.requests_per_minute,
                                         "tokens_per_minute": allowance.tokens_per_minute}).first()
            if row is None:
                used = _select_used(db, allowances, window_start)
                for counted in allowances[:index]:  # what the rollback takes back
                    num_used_requests, num_used_tokens = used[counted.subject]
                    used[counted.subject] = (num_used_requests - num_requests, num_used_tokens - num_tokens)
                raise _Refused(allowance, used)
            used[allowance.subject] = (row.num_requests, row.num_tokens)
        return used

    def prune(self, window_start: int, db: Session) -> None:
        """Deletes the counters of windows that ended long ago, so the table stays small."""
        db.execute(delete(RateCounter).where(RateCounter.window_start < window_start - KEEP_OLD_WINDOWS_S))

    def close(self) -> None:
        """The store belongs to the caller: nothing to close."""


@functools.cache
def _count_statement(dialect: str):
    """INSERT the subject's window row, or add to it ON CONFLICT only WHERE both counts stay within
    the limits (PostgreSQL checks the WHERE on the row it locked), RETURNING the counts."""
    table = RateCounter.__table__
    insert = dialect_insert(dialect, table)  # VALUES from the parameters' names
    return insert.on_conflict_do_update(
        index_elements=[table.c.subject, table.c.window_start],
        set_={"num_requests": table.c.num_requests + insert.excluded.num_requests,
              "num_tokens": table.c.num_tokens + insert.excluded.num_tokens},
        where=(table.c.num_requests + insert.excluded.num_requests <= bindparam("requests_per_minute"))
        & (table.c.num_tokens + insert.excluded.num_tokens <= bindparam("tokens_per_minute")),
    ).returning(table.c.num_requests, table.c.num_tokens)


def _select_used(db: Session, allowances: list[Allowance], window_start: int) -> Used:
    rows = db.execute(select(RateCounter.subject, RateCounter.num_requests, RateCounter.num_tokens)
                      .where(RateCounter.subject.in_([a.subject for a in allowances]),
                             RateCounter.window_start == window_start)).all()
    used = {allowance.subject: (0, 0) for allowance in allowances}
    used.update({row.subject: (row.num_requests, row.num_tokens) for row in rows})
    return used


# KEYS: one hash per subject and window; ARGV: num_requests, num_tokens, expiry_s, then each key's
# requests and tokens per minute. Checks every key before it counts on any: all or nothing, and
# atomic, since Redis runs one script at a time. Returns {index of the refusing key or 0, then each
# key's requests and tokens as they now stand}.
_CHECK_AND_COUNT_LUA = """
local num_requests = tonumber(ARGV[1])
local num_tokens = tonumber(ARGV[2])
local result = {0}
for i, key in ipairs(KEYS) do
  local counts = redis.call('HMGET', key, 'requests', 'tokens')
  local used_requests = tonumber(counts[1]) or 0
  local used_tokens = tonumber(counts[2]) or 0
  result[2 * i] = used_requests
  result[2 * i + 1] = used_tokens
  if result[1] == 0 and (used_requests + num_requests > tonumber(ARGV[2 + 2 * i])
                         or used_tokens + num_tokens > tonumber(ARGV[3 + 2 * i])) then
    result[1] = i
  end
end
if result[1] == 0 and (num_requests > 0 or num_tokens > 0) then
  for i, key in ipairs(KEYS) do
    redis.call('HINCRBY', key, 'requests', num_requests)
    redis.call('HINCRBY', key, 'tokens', num_tokens)
    redis.call('EXPIRE', key, ARGV[3])
    result[2 * i] = result[2 * i] + num_requests
    result[2 * i + 1] = result[2 * i + 1] + num_tokens
  end
end
return result
"""


class RedisRateLimiter(_WindowLimiter):
    """Counters in Redis, shared by every server process pointed at it: one Lua script checks and
    counts all subjects atomically. The window start (from each process's clock) is part of the key
    name, and a key expires a margin after its window ends. One Redis server, not a Cluster."""

    counts_in_transaction = False

    def __init__(self, url: str, clock: Callable[[], float] = time.time, key_prefix: str = "tokenforge:rl:"):
        super().__init__(clock)
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                               socket_timeout=REDIS_TIMEOUT_S)
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL for rate limits: {exc}") from exc
        self._key_prefix = key_prefix
        self._script = self._redis.register_script(_CHECK_AND_COUNT_LUA)

    def key_of(self, subject: str, window_start: int) -> str:
        return f"{self._key_prefix}{subject}:{window_start}"

    def _read(self, allowances: list[Allowance], window_start: int, db: Session | None) -> Used:
        return self._run(allowances, window_start, 0, 0, expiry_s=0)[1]

    def _count(self, allowances: list[Allowance], window_start: int, num_requests: int, num_tokens: int,
               reset_s: float, db: Session | None) -> tuple[Allowance | None, Used]:
        """Counts in Redis; `db` (the caller's store transaction) is not involved."""
        expiry_s = math.ceil(reset_s) + REDIS_EXPIRY_MARGIN_S
        return self._run(allowances, window_start, num_requests, num_tokens, expiry_s)

    def _run(self, allowances: list[Allowance], window_start: int, num_requests: int, num_tokens: int,
             expiry_s: int) -> tuple[Allowance | None, Used]:
        keys = [self.key_of(allowance.subject, window_start) for allowance in allowances]
        args = [num_requests, num_tokens, expiry_s]
        for allowance in allowances:
            args += [allowance.requests_per_minute, allowance.tokens_per_minute]
        try:
            result = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"the rate-limit Redis is unavailable: {exc}") from exc
        refused_index, counts = int(result[0]), [int(count) for count in result[1:]]
        used = {allowance.subject: (counts[2 * i], counts[2 * i + 1]) for i, allowance in enumerate(allowances)}
        return (allowances[refused_index - 1] if refused_index else None), used

    def close(self) -> None:
        self._redis.close()


def make_rate_limiter(store: Store, redis_url: str | None) -> RateLimiter:
    """Redis when a URL is configured (several server processes share the limits), else the store."""
    if redis_url:
        return RedisRateLimiter(redis_url)
    return StoreRateLimiter(store)
