"""Organisations: creation, the operator and local organisations, their tier and monthly limit,
payments that move them up the tier ladder, and deleting an organisation's data."""

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenforge.control import audit, keys
from tokenforge.control.errors import NotFoundError
from tokenforge.control.limits import month_of, set_budget_limit
from tokenforge.control.store.models import (ApiKey, Budget, DailyUsage, Organization, RateCounter, Reservation,
                                             UsageRecord)
from tokenforge.control.tiers import TierLadder
from tokenforge.errors import InvalidRequestError

OPERATOR_NAME = "operator"
LOCAL_NAME = "local"  # requests served with auth off are metered to this organisation


@dataclass(frozen=True)
class OrgInfo:
    id: str
    name: str
    is_operator: bool
    tier_index: int
    paid_micros: int
    custom_limit_micros: int | None
    unlimited: bool
    monthly_limit_micros: int | None  # what applies now: None = no limit
    created_at: datetime

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "organization", "name": self.name, "is_operator": self.is_operator,
                "tier": self.tier_index, "paid_micros": self.paid_micros,
                "custom_limit_micros": self.custom_limit_micros, "unlimited": self.unlimited,
                "monthly_limit_micros": self.monthly_limit_micros, "created_at": self.created_at.isoformat()}


def monthly_limit(org: Organization, ladder: TierLadder) -> int | None:
    if org.unlimited:
        return None
    if org.custom_limit_micros is not None:
        return org.custom_limit_micros
    return ladder.get(org.tier_index).monthly_limit_micros


def info(org: Organization, ladder: TierLadder) -> OrgInfo:
    return OrgInfo(org.id, org.name, org.is_operator, org.tier_index, org.paid_micros, org.custom_limit_micros,
                   org.unlimited, monthly_limit(org, ladder), org.created_at)


def create_org(db: Session, name: str, actor: str, ladder: TierLadder, *, is_operator: bool = False,
               unlimited: bool = False) -> Organization:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidRequestError("an organization needs a name of 1 to 200 characters", param="name")
    if db.scalars(select(Organization.id).where(Organization.name == name)).first() is not None:
        raise InvalidRequestError(f"an organization named {name!r} exists already", param="name")
    org = Organization(id=keys.new_id("org"), name=name, is_operator=is_operator, unlimited=unlimited,
                       paid_micros=0, tier_index=ladder.tier_for(0).index, created_at=datetime.now(UTC))
    db.add(org)
    db.flush()
    audit.record(db, actor, "organization.created", org.id, org.id, name=name, tier=org.tier_index)
    return org


def get_org(db: Session, org_id: str) -> Organization:
    org = db.get(Organization, org_id)
    if org is None:
        raise NotFoundError(f"no organization {org_id}", param="organization")
    return org


def find_by_name(db: Session, name: str) -> Organization | None:
    return db.scalars(select(Organization).where(Organization.name == name)).first()


def list_orgs(db: Session) -> list[Organization]:
    return list(db.scalars(select(Organization).order_by(Organization.created_at, Organization.id)))


def set_custom_limit(db: Session, org_id: str, limit_micros: int | None, actor: str, ladder: TierLadder) -> None:
    """An admin's monthly limit for the organisation (None: back to its tier's)."""
    if limit_micros is not None and limit_micros < 0:
        raise InvalidRequestError("a spending limit cannot be negative", param="monthly_limit_micros")
    org = get_org(db, org_id)
    before = monthly_limit(org, ladder)
    org.custom_limit_micros = limit_micros
    set_budget_limit(db, org_id, month_of(datetime.now(UTC)), monthly_limit(org, ladder))
    audit.record(db, actor, "limit.changed", org_id, org_id, before_micros=before,
                 after_micros=monthly_limit(org, ladder), custom=limit_micros is not None)


def record_payment(db: Session, org_id: str, amount_micros: int, actor: str, ladder: TierLadder) -> None:
    """Counts a payment toward the tier ladder; moving up a tier raises this month's limit."""
    get_org(db, org_id)
    # One atomic increment: two invoices paid at once both count.
    db.execute(update(Organization).where(Organization.id == org_id)
               .values(paid_micros=Organization.paid_micros + amount_micros))
    org = db.get(Organization, org_id, populate_existing=True, with_for_update=db.get_bind().dialect.name != "sqlite")
    tier = ladder.tier_for(org.paid_micros)
    if tier.index > org.tier_index:
        before = org.tier_index
        org.tier_index = tier.index
        set_budget_limit(db, org_id, month_of(datetime.now(UTC)), monthly_limit(org, ladder))
        audit.record(db, actor, "tier.changed", org_id, org_id, before=before, after=tier.index,
                     paid_micros=org.paid_micros)


def ensure_operator(db: Session, ladder: TierLadder) -> str | None:
    """On first start: the operator organisation and its admin key. Returns the plaintext key once
    (to print), or None when the operator exists already."""
    try:
        with db.begin_nested():
            if db.scalars(select(Organization.id).where(Organization.is_operator)).first() is not None:
                return None
            org = create_org(db, OPERATOR_NAME, audit.SYSTEM, ladder, is_operator=True, unlimited=True)
            _, plaintext = keys.create_key(db, org.id, audit.SYSTEM, name="bootstrap admin",
                                           scopes=("admin", "inference"))
    except IntegrityError:
        return None  # another server process bootstrapped at the same moment
    return plaintext


def ensure_local(db: Session, ladder: TierLadder) -> keys.Principal:
    """The principal of requests served with auth off: the unlimited `local` organisation."""
    org = find_by_name(db, LOCAL_NAME)
    if org is None:
        try:
            with db.begin_nested():
                org = create_org(db, LOCAL_NAME, audit.SYSTEM, ladder, unlimited=True)
        except IntegrityError:
            org = find_by_name(db, LOCAL_NAME)
    return keys.principal_of(org, None, frozenset({"inference"}))


def delete_org_data(db: Session, org_id: str, actor: str) -> dict[str, int]:
    """Deletes what the organisation left in the store: keys, usage records and roll-ups,
    reservations, budgets and rate counters. Invoices (financial records) and the audit log stay.
    Returns the number of rows deleted per kind."""
    get_org(db, org_id)
    subjects = [f"org:{org_id}", *(f"key:{key_id}" for key_id in
                                    db.scalars(select(ApiKey.id).where(ApiKey.org_id == org_id)))]
    counts = {"rate_counters": db.execute(delete(RateCounter).where(RateCounter.subject.in_(subjects))).rowcount}
    for name, table, column in (("keys", ApiKey, ApiKey.org_id), ("usage_records", UsageRecord, UsageRecord.org_id),
                                ("usage_daily", DailyUsage, DailyUsage.org_id),
                                ("reservations", Reservation, Reservation.org_id),
                                ("budgets", Budget, Budget.org_id)):
        counts[name] = db.execute(delete(table).where(column == org_id)).rowcount
    audit.record(db, actor, "organization.data_deleted", org_id, org_id, **counts)
    return counts
