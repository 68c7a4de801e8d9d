"""ControlPlane: what the server asks of the control plane per request (authenticate, admit, settle),
over one store, price book, tier ladder and rate limiter. authenticate and count_request block on
the store (the server calls them in a worker thread); admit and settle return a Future, their
writes grouped with those of other requests into shared transactions (store.group_commit).
"""

import dataclasses
import functools
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from tokenforge.config import ControlConfig
from tokenforge.control import keys, limits, metering, organizations
from tokenforge.control.errors import PermissionDeniedError, RateLimitError
from tokenforge.control.keys import Principal
from tokenforge.control.metering import MeteredRequest, Usage
from tokenforge.control.pricing import ModelFacts, PriceBook
from tokenforge.control.rate_limits import Allowance, RateLimiter, RateLimitState, make_rate_limiter
from tokenforge.control.settings import load_control_toml
from tokenforge.control.store.db import Store, open_store
from tokenforge.control.store.group_commit import GroupCommit
from tokenforge.control.tiers import TierLadder


SWEEP_INTERVAL_S = 5.0  # expired reservations are released at most this late (and at start)


@dataclass(frozen=True)
class Admission:
    """A request let through: its reservation (settle it exactly once) and the rate-limit state."""

    metered: MeteredRequest
    rate_limit: RateLimitState | None


class ControlPlane:
    def __init__(self, store: Store, prices: PriceBook, ladder: TierLadder, limiter: RateLimiter,
                 reservation_ttl_s: float = 900.0):
        self.store = store
        self.prices = prices
        self.ladder = ladder
        self.limiter = limiter
        self.reservation_ttl_s = reservation_ttl_s
        self.writes = GroupCommit(store)
        self._next_sweep_at = 0.0  # when admit next releases expired reservations

    @classmethod
    def open(cls, config: ControlConfig) -> tuple["ControlPlane", str | None]:
        """The control plane of `config`, its store migrated, the operator organisation created on
        first start. Returns it and the bootstrap admin key (plaintext, to print once) or None."""
        prices, ladder = load_control_toml(config.pricing_path)
        store = open_store(config.resolved_database_url())
        with store.transaction() as db:
            bootstrap_key = organizations.ensure_operator(db, ladder)
            limits.release_expired(db)
        limiter = make_rate_limiter(store, config.redis_url)
        return cls(store, prices, ladder, limiter, config.reservation_ttl_s), bootstrap_key

    def close(self) -> None:
        self.writes.close()
        self.limiter.close()
        self.store.close()

    def authenticate(self, presented: str | None, scope: str) -> Principal:
        """The principal of a key that may use `scope`: AuthenticationError (401) for a bad key,
        PermissionDeniedError (403) for a key without the scope."""
        with self.store.reading() as db:
            principal = keys.authenticate(db, presented)
        if scope not in principal.scopes:
            raise PermissionDeniedError(f"This API key lacks the '{scope}' scope needed here.")
        return principal

    def local_principal(self) -> Principal:
        """Requests served with auth off are metered to the unlimited `local` organisation."""
        with self.store.transaction() as db:
            return organizations.ensure_local(db, self.ladder)

    def count_request(self, principal: Principal) -> RateLimitState | None:
        """Counts one request against the principal's per-minute limits (RateLimitError if over)."""
        allowances = self.allowances(principal)
        return self.limiter.hit(allowances, 1, 0) if allowances else None

    def admit(self, principal: Principal, request_id: str, model: ModelFacts, endpoint: str,
              num_prompt_tokens: int, max_completion_tokens: int) -> Future:
        """Counts the request and its tokens (prompt + max completion, as OpenAI estimates them)
        against the per-minute limits, then reserves its worst-case cost. The Future holds the
        Admission, or RateLimitError / QuotaExceededError (when it does not fit) /
        StoreUnavailableError. Generation routes are counted here, not in count_request."""
        price = self.prices.price_for(model)
        metered = MeteredRequest(request_id, principal.org_id, principal.key_id, model.name, endpoint, price,
                                 month="", started_at=datetime.now(UTC))
        return self.writes.submit(_AdmitJob(self, principal, metered, num_prompt_tokens + max_completion_tokens,
                                            price.worst_case_micros(num_prompt_tokens, max_completion_tokens)))

    def settle(self, metered: MeteredRequest, usage: Usage, status: str) -> Future:
        """Writes the request's one usage record and settles its budget. The Future holds the cost,
        None if the record was written already, or StoreUnavailableError."""
        return self.writes.submit(functools.partial(metering.write_usage, req=metered, usage=usage, status=status))

    def sweep_expired(self, db: Session, now: datetime) -> None:
        """Releases expired reservations, at most every SWEEP_INTERVAL_S."""
        if time.monotonic() >= self._next_sweep_at:
            limits.release_expired(db, now)
            self._next_sweep_at = time.monotonic() + SWEEP_INTERVAL_S

    def monthly_limit(self, principal: Principal) -> int | None:
        if principal.unlimited:
            return None
        if principal.custom_limit_micros is not None:
            return principal.custom_limit_micros
        return self.ladder.get(principal.tier_index).monthly_limit_micros

    def allowances(self, principal: Principal) -> list[Allowance]:
        """Per-minute limits of the organisation and of the key, from its tier; none when unlimited."""
        if principal.unlimited:
            return []
        tier = self.ladder.get(principal.tier_index)
        allowances = [Allowance(f"org:{principal.org_id}", tier.requests_per_minute, tier.tokens_per_minute)]
        if principal.key_id is not None:
            allowances.append(Allowance(f"key:{principal.key_id}", tier.requests_per_minute, tier.tokens_per_minute))
        return allowances


class _AdmitJob:
    """admit's writes, run by the group commit (perhaps twice: see store.group_commit): the rate
    counters and the reservation. A limiter outside the store (Redis) counts once: a second run
    reuses its answer."""

    def __init__(self, plane: ControlPlane, principal: Principal, metered: MeteredRequest, num_tokens: int,
                 worst_case_micros: int):
        self.plane = plane
        self.principal = principal
        self.metered = metered
        self.num_tokens = num_tokens
        self.worst_case_micros = worst_case_micros
        self._counted: RateLimitState | RateLimitError | None = None  # the answer of a limiter outside the store

    def __call__(self, db: Session) -> Admission:
        plane, now = self.plane, datetime.now(UTC)
        rate_limit = self._count(db)
        plane.sweep_expired(db, now)
        month = limits.reserve(db, self.principal.org_id, self.metered.request_id, self.worst_case_micros,
                               plane.monthly_limit(self.principal), plane.reservation_ttl_s, now)
        return Admission(dataclasses.replace(self.metered, month=month, started_at=now), rate_limit)

    def _count(self, db: Session) -> RateLimitState | None:
        allowances = self.plane.allowances(self.principal)
        if not allowances:
            return None
        limiter = self.plane.limiter
        if limiter.counts_in_transaction:
            return limiter.hit(allowances, 1, self.num_tokens, db=db)
        if self._counted is None:
            try:
                self._counted = limiter.hit(allowances, 1, self.num_tokens)
            except RateLimitError as refusal:
                self._counted = refusal
        if isinstance(self._counted, RateLimitError):
            raise self._counted
        return self._counted
