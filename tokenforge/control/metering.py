"""Metering: exactly one usage record per request, written with its daily roll-up and the budget
settlement in one transaction. A second write for the same request id changes nothing.

Usage records hold counts, prices and cost, never prompts or outputs.
"""

import functools
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from tokenforge.control import limits
from tokenforge.control.pricing import Price
from tokenforge.control.store.db import dialect_insert, dialect_of
from tokenforge.control.store.models import DailyUsage, UsageRecord

STATUSES = ("ok", "client_closed", "error", "refused")


@dataclass(frozen=True)
class Usage:
    """What one API request processed (all its choices together; the prompt counted once per prompt)."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_completion_tokens: int = 0


@dataclass(frozen=True)
class MeteredRequest:
    """A request that holds a reservation: what settling it needs to know."""

    request_id: str
    org_id: str
    key_id: str | None
    model: str
    endpoint: str
    price: Price
    month: str  # the budget month its reservation was taken from
    started_at: datetime


def write_usage(db: Session, req: MeteredRequest, usage: Usage, status: str,
                now: datetime | None = None) -> int | None:
    """Records the request's usage and settles its budget; returns the cost, or None if the request
    was recorded already (its first record stands, nothing is counted twice)."""
    if status not in STATUSES:
        raise ValueError(f"unknown usage status {status!r}")
    now = now or datetime.now(UTC)
    cost = req.price.cost_micros(usage.num_prompt_tokens, usage.num_cached_tokens, usage.num_completion_tokens)
    counts = {"num_prompt_tokens": usage.num_prompt_tokens, "num_cached_tokens": usage.num_cached_tokens,
              "num_completion_tokens": usage.num_completion_tokens, "cost_micros": cost}
    dialect = dialect_of(db)
    # ON CONFLICT (request_id) DO NOTHING: a second write, even a concurrent one, inserts nothing.
    inserted = db.execute(_record_statement(dialect), counts | {
        "request_id": req.request_id, "org_id": req.org_id, "key_id": req.key_id, "model": req.model,
        "endpoint": req.endpoint, "status": status, "input_price_micros": req.price.input_micros,
        "cached_input_price_micros": req.price.cached_input_micros, "output_price_micros": req.price.output_micros,
        "latency_ms": max(0, int((now - req.started_at).total_seconds() * 1000)), "created_at": now}).first()
    if inserted is None:
        return None
    db.execute(_add_to_daily_statement(dialect), counts | {
        "org_id": req.org_id, "day": now.astimezone(UTC).date(), "model": req.model, "num_requests": 1})
    limits.settle(db, req.org_id, req.request_id, req.month, cost, now)
    return cost


@functools.cache
def _record_statement(dialect: str):
    table = UsageRecord.__table__  # VALUES from the parameters' names
    return dialect_insert(dialect, table).on_conflict_do_nothing(index_elements=["request_id"]).returning(table.c.id)


@functools.cache
def _add_to_daily_statement(dialect: str):
    """The day's roll-up row of (org, model), created or added to."""
    table = DailyUsage.__table__
    insert = dialect_insert(dialect, table)  # VALUES from the parameters' names
    return insert.on_conflict_do_update(
        index_elements=["org_id", "day", "model"],
        set_={name: table.c[name] + insert.excluded[name] for name in
              ("num_requests", "num_prompt_tokens", "num_cached_tokens", "num_completion_tokens", "cost_micros")})
