"""Helpers shared by the control-plane unit tests: an organisation, and a request metered as the server meters it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from tokenforge.control import audit, limits, metering, organizations
from tokenforge.control.metering import MeteredRequest, Usage
from tokenforge.control.pricing import Price
from tokenforge.control.tiers import TierLadder


def make_org(store, name: str, ladder: TierLadder | None = None) -> str:
    """A new organisation made from the CLI, on `ladder` (the default ladder when None); its id."""
    with store.transaction() as db:
        return organizations.create_org(db, name, audit.CLI, ladder or TierLadder.default()).id


def admit(store, org_id: str, model: str, price: Price, used: Usage, now: datetime, *,
          limit_micros: int | None = None, key_id: str | None = None, request_id: str | None = None,
          started_s_ago: float = 1.0) -> MeteredRequest:
    """A request admitted as the server admits it: its worst case reserved (under `limit_micros`), started
    `started_s_ago` seconds before `now`."""
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    with store.transaction() as db:
        worst = price.worst_case_micros(used.num_prompt_tokens, used.num_completion_tokens)
        month = limits.reserve(db, org_id, request_id, worst, limit_micros, ttl_s=900, now=now)
    return MeteredRequest(request_id=request_id, org_id=org_id, key_id=key_id, model=model, endpoint="chat",
                          price=price, month=month, started_at=now - timedelta(seconds=started_s_ago))


def spend(store, org_id: str, model: str, price: Price, used: Usage, now: datetime, status: str = "ok",
          **admission) -> int | None:
    """One request as the server meters it: reserve the worst case, then write the usage (settle); its cost.
    `admission` goes to `admit` (limit_micros, key_id, ...)."""
    req = admit(store, org_id, model, price, used, now, **admission)
    with store.transaction() as db:
        return metering.write_usage(db, req, used, status, now=now)
