"""The audit log: who did what to which organisation, when. Append-only: rows are only inserted,
in the same transaction as the change they record."""

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenforge.control.store.models import AuditEvent

SYSTEM = "system"  # the control plane itself (spend alerts, expired reservations)
CLI = "cli"  # an operator on the server's machine


def key_actor(key_id: str) -> str:
    return f"key:{key_id}"


def record(db: Session, actor: str, action: str, org_id: str | None, target: str | None = None,
           **detail) -> None:
    """Appends one event (in the caller's transaction). `detail` must never hold a key or a prompt."""
    db.add(AuditEvent(at=datetime.now(UTC), actor=actor, org_id=org_id, action=action, target=target,
                      detail=json.dumps(detail, sort_keys=True, default=str)))


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    org_id: str | None
    action: str
    target: str | None
    detail: dict

    def to_dict(self) -> dict:
        return {"id": self.id, "at": self.at.isoformat(), "actor": self.actor, "organization": self.org_id,
                "action": self.action, "target": self.target, "detail": self.detail}


def list_events(db: Session, org_id: str | None = None, action: str | None = None,
                limit: int = 1000) -> list[AuditEntry]:
    """Newest last; `org_id`/`action` filter when given."""
    query = select(AuditEvent).order_by(AuditEvent.id)
    if org_id is not None:
        query = query.where(AuditEvent.org_id == org_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    rows = db.scalars(query.limit(limit)).all()
    return [AuditEntry(r.id, r.at, r.actor, r.org_id, r.action, r.target, json.loads(r.detail)) for r in rows]
