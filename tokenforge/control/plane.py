"""ControlPlane: what the server asks of the control plane per request (authenticate, admit, settle),
over one store, price book, tier ladder and rate limiter. Every method blocks on the store: the
server calls them in a worker thread.
"""

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from tokenforge.config import ControlConfig
from tokenforge.control import keys, limits, metering, organizations
from tokenforge.control.errors import PermissionDeniedError
from tokenforge.control.keys import Principal
from tokenforge.control.metering import MeteredRequest, Usage
from tokenforge.control.pricing import ModelFacts, PriceBook
from tokenforge.control.rate_limits import Allowance, RateLimiter, RateLimitState, make_rate_limiter
from tokenforge.control.settings import load_control_toml
from tokenforge.control.store.db import Store, open_store
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
        allowances = self._allowances(principal)
        return self.limiter.hit(allowances, 1, 0) if allowances else None

    def admit(self, principal: Principal, request_id: str, model: ModelFacts, endpoint: str,
              num_prompt_tokens: int, max_completion_tokens: int) -> Admission:
        """Counts the request and its tokens (prompt + max completion, as OpenAI estimates them)
        against the per-minute limits, then reserves its worst-case cost (QuotaExceededError if it
        does not fit). Generation routes are counted here, not in count_request."""
        allowances = self._allowances(principal)
        rate_limit = None
        price = self.prices.price_for(model)
        worst_case = price.worst_case_micros(num_prompt_tokens, max_completion_tokens)
        now = datetime.now(UTC)
        # One transaction, one commit: the counters (when they live in the store) and the reservation.
        with self.store.transaction() as db:
            if allowances:
                rate_limit = self.limiter.hit(allowances, 1, num_prompt_tokens + max_completion_tokens, db=db)
            if time.monotonic() >= self._next_sweep_at:
                limits.release_expired(db, now)
                self._next_sweep_at = time.monotonic() + SWEEP_INTERVAL_S
            month = limits.reserve(db, principal.org_id, request_id, worst_case, self._monthly_limit(principal),
                                   self.reservation_ttl_s, now)
        metered = MeteredRequest(request_id, principal.org_id, principal.key_id, model.name, endpoint, price, month,
                                 now)
        return Admission(metered, rate_limit)

    def settle(self, metered: MeteredRequest, usage: Usage, status: str) -> int | None:
        """Writes the request's one usage record and settles its budget; None if it was written already."""
        with self.store.transaction() as db:
            return metering.write_usage(db, metered, usage, status)

    def _monthly_limit(self, principal: Principal) -> int | None:
        if principal.unlimited:
            return None
        if principal.custom_limit_micros is not None:
            return principal.custom_limit_micros
        return self.ladder.get(principal.tier_index).monthly_limit_micros

    def _allowances(self, principal: Principal) -> list[Allowance]:
        """Per-minute limits of the organisation and of the key, from its tier; none when unlimited."""
        if principal.unlimited:
            return []
        tier = self.ladder.get(principal.tier_index)
        allowances = [Allowance(f"org:{principal.org_id}", tier.requests_per_minute, tier.tokens_per_minute)]
        if principal.key_id is not None:
            allowances.append(Allowance(f"key:{principal.key_id}", tier.requests_per_minute, tier.tokens_per_minute))
        return allowances
