"""Spending limits by reservation: reserve a request's worst-case cost before the engine runs, settle
to the real cost after, and let reservations a crashed server left behind expire.

The guard is one atomic statement, `UPDATE budgets SET reserved = reserved + :cost WHERE
spent + reserved + :cost <= limit`: under any concurrency a month's spend never exceeds its limit
(PostgreSQL re-checks the WHERE after waiting on the row lock; SQLite runs one writer at a time).
A reservation row is removed by exactly one of settle / expiry (DELETE ... RETURNING decides), so
its amount leaves `reserved` exactly once.
"""

from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from tokenforge.control import audit
from tokenforge.control.errors import QuotaExceededError
from tokenforge.control.store.db import dialect_insert, dialect_of
from tokenforge.control.store.models import Budget, Reservation

ALERT_PERCENTS = (50, 75, 90)

# The statements of every request, built once (see store.db.dialect_insert).
_budgets, _reservations = Budget.__table__.c, Reservation.__table__.c
_RESERVE = (update(Budget.__table__)
            .where(_budgets.org_id == bindparam("of_org"), _budgets.month == bindparam("of_month"),
                   _budgets.limit_micros.is_(None)
                   | (_budgets.spent_micros + _budgets.reserved_micros + bindparam("amount") <= _budgets.limit_micros))
            .values(reserved_micros=_budgets.reserved_micros + bindparam("amount")))
_HOLD = insert(Reservation.__table__)  # VALUES from the parameters' names
_UNHOLD = (delete(Reservation.__table__).where(_reservations.request_id == bindparam("request_id"))
           .returning(_reservations.amount_micros))
_SPEND = (update(Budget.__table__)
          .where(_budgets.org_id == bindparam("of_org"), _budgets.month == bindparam("of_month"))
          .values(spent_micros=_budgets.spent_micros + bindparam("cost"),
                  reserved_micros=_budgets.reserved_micros - bindparam("held"))
          .returning(_budgets.spent_micros, _budgets.limit_micros, _budgets.alert_percent))


def month_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


def insert_ignore(db: Session, table, values: dict, index_elements: list[str]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
    db.execute(dialect_insert(dialect_of(db), table).values(**values)
               .on_conflict_do_nothing(index_elements=index_elements))


def ensure_budget(db: Session, org_id: str, month: str, limit_micros: int | None) -> None:
    """The month's budget row, created with `limit_micros` on the organisation's first request."""
    insert_ignore(db, Budget, {"org_id": org_id, "month": month, "limit_micros": limit_micros, "spent_micros": 0,
                               "reserved_micros": 0, "alert_percent": 0}, ["org_id", "month"])


def set_budget_limit(db: Session, org_id: str, month: str, limit_micros: int | None) -> None:
    ensure_budget(db, org_id, month, limit_micros)
    db.execute(update(Budget).where(Budget.org_id == org_id, Budget.month == month)
               .values(limit_micros=limit_micros))


def reserve(db: Session, org_id: str, request_id: str, amount_micros: int, limit_micros: int | None,
            ttl_s: float, now: datetime | None = None) -> str:
    """Holds `amount_micros` of the current month's budget for `request_id`; returns the month.
    QuotaExceededError (429 insufficient_quota) when it does not fit."""
    now = now or datetime.now(UTC)
    month = month_of(now)
    params = {"of_org": org_id, "of_month": month, "amount": amount_micros}
    reserved = db.execute(_RESERVE, params).rowcount == 1
    if not reserved:  # the month's first request, or over the limit (perhaps until expired ones go)
        release_expired(db, now, org_id)
        ensure_budget(db, org_id, month, limit_micros)
        reserved = db.execute(_RESERVE, params).rowcount == 1
    if not reserved:
        raise QuotaExceededError(
            "You exceeded your current quota: this request could cost up to "
            f"${amount_micros / 1e6:.6f}, more than what is left of this month's spending limit. "
            "Lower max_tokens, wait for the next month, or ask an admin to raise the limit.")
    db.execute(_HOLD, {"request_id": request_id, "org_id": org_id, "month": month, "amount_micros": amount_micros,
                       "expires_at": now + timedelta(seconds=ttl_s)})
    return month


def settle(db: Session, org_id: str, request_id: str, month: str, cost_micros: int,
           now: datetime | None = None) -> None:
    """Frees the request's reservation (if it has not expired) from its month, and adds its real
    cost to the spend of the month it ends in (its usage record's month, so that a month's spend
    and its invoice agree for a request that runs over midnight at the month's end)."""
    held = db.execute(_UNHOLD, {"request_id": request_id}).scalar_one_or_none() or 0
    spend_month = month_of(now or datetime.now(UTC))
    if spend_month != month:
        limit = db.scalar(select(Budget.limit_micros).where(Budget.org_id == org_id, Budget.month == month))
        ensure_budget(db, org_id, spend_month, limit)
        if held:
            db.execute(update(Budget).where(Budget.org_id == org_id, Budget.month == month)
                       .values(reserved_micros=Budget.reserved_micros - held))
        held = 0
    budget = db.execute(_SPEND, {"of_org": org_id, "of_month": spend_month, "cost": cost_micros,
                                 "held": held}).first()
    if cost_micros and budget is not None:
        _maybe_alert(db, org_id, spend_month, budget)


def release_expired(db: Session, now: datetime | None = None, org_id: str | None = None) -> int:
    """Releases the reservations past their expiry (of `org_id`, or all); returns how many."""
    now = now or datetime.now(UTC)
    query = select(Reservation.request_id).where(Reservation.expires_at <= now)
    if org_id is not None:
        query = query.where(Reservation.org_id == org_id)
    num_released = 0
    for request_id in db.scalars(query).all():
        row = db.execute(delete(Reservation).where(Reservation.request_id == request_id)
                         .returning(Reservation.org_id, Reservation.month, Reservation.amount_micros)).first()
        if row is None:
            continue  # settled or released by someone else meanwhile
        db.execute(update(Budget).where(Budget.org_id == row.org_id, Budget.month == row.month)
                   .values(reserved_micros=Budget.reserved_micros - row.amount_micros))
        audit.record(db, audit.SYSTEM, "reservation.expired", row.org_id, request_id,
                     amount_micros=row.amount_micros)
        num_released += 1
    return num_released


def _maybe_alert(db: Session, org_id: str, month: str, budget) -> None:
    """Writes budget.alert to the audit log once per threshold (50/75/90%) and month; `budget` is the
    row as the settling UPDATE left it (spent, limit, alert percent)."""
    if not budget.limit_micros:
        return
    percent = budget.spent_micros * 100 // budget.limit_micros
    crossed = [p for p in ALERT_PERCENTS if budget.alert_percent < p <= percent]
    if not crossed:
        return
    level = crossed[-1]
    raised = db.execute(update(Budget).where(Budget.org_id == org_id, Budget.month == month,
                                             Budget.alert_percent < level).values(alert_percent=level))
    if raised.rowcount == 1:
        audit.record(db, audit.SYSTEM, "budget.alert", org_id, month, percent=level,
                     spent_micros=budget.spent_micros, limit_micros=budget.limit_micros)
