"""Organisations on both store backends: creation and unique names, the operator and local
organisations made once, an admin's custom limit, payments climbing the tier ladder, and deleting one
organisation's data while invoices, the audit log and other organisations stay."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from tests.unit.control.helpers import make_org, spend
from tokenforge.control import audit, invoices, keys, limits, organizations
from tokenforge.control.errors import NotFoundError
from tokenforge.control.metering import Usage
from tokenforge.control.pricing import Price
from tokenforge.control.rate_limits import Allowance, StoreRateLimiter
from tokenforge.control.store.models import (ApiKey, AuditEvent, Budget, DailyUsage, Invoice, Organization,
                                             RateCounter, Reservation, UsageRecord)
from tokenforge.control.tiers import TierLadder
from tokenforge.errors import InvalidRequestError

DOLLAR = 1_000_000
LADDER = TierLadder.default()  # tier 2 from $50 paid ($500 a month), tier 3 from $500 ($5,000 a month)
SMALL = Price(input_micros=100_000, cached_input_micros=50_000, output_micros=200_000)  # $0.10/0.05/0.20 per 1M
JANUARY = datetime(2025, 1, 10, 8, 0, tzinfo=UTC)


def this_month() -> str:
    return limits.month_of(datetime.now(UTC))


def budget_limit(store, org_id: str) -> int | None:
    with store.transaction() as db:
        return db.get(Budget, (org_id, this_month())).limit_micros


def test_create_with_a_unique_name(store):
    with store.transaction() as db:
        org = organizations.create_org(db, "  acme ", "key:key_admin", LADDER)
    assert org.id.startswith("org_")
    assert (org.name, org.is_operator, org.unlimited, org.tier_index, org.paid_micros, org.custom_limit_micros) == (
        "acme", False, False, 1, 0, None)
    with store.transaction() as db:
        for name in ("acme", " acme", "", "   ", "x" * 201):
            with pytest.raises(InvalidRequestError, match="organization"):
                organizations.create_org(db, name, audit.CLI, LADDER)
        assert [o.id for o in organizations.list_orgs(db)] == [org.id]
        assert organizations.info(org, LADDER).monthly_limit_micros == 50 * DOLLAR
        [event] = audit.list_events(db, org.id, "organization.created")
        assert (event.actor, event.target, event.detail) == ("key:key_admin", org.id, {"name": "acme", "tier": 1})
        with pytest.raises(NotFoundError):
            organizations.get_org(db, "org_unknown")


def test_the_operator_and_local_organizations_are_made_once(store):
    with store.transaction() as db:
        plaintext = organizations.ensure_operator(db, LADDER)
    assert keys.KEY_PATTERN.match(plaintext)
    with store.transaction() as db:
        assert organizations.ensure_operator(db, LADDER) is None
        operator = keys.authenticate(db, plaintext)
        assert (operator.scopes, operator.is_operator, operator.unlimited) == (
            frozenset({"admin", "inference"}), True, True)
        assert db.scalar(select(func.count()).select_from(ApiKey)) == 1
    with store.transaction() as db:
        first = organizations.ensure_local(db, LADDER)
    with store.transaction() as db:
        second = organizations.ensure_local(db, LADDER)
        local = organizations.get_org(db, first.org_id)
        assert organizations.monthly_limit(local, LADDER) is None
        assert sorted(o.name for o in organizations.list_orgs(db)) == ["local", "operator"]
    assert first == second
    assert (first.key_id, first.scopes, first.unlimited, first.is_operator) == (
        None, frozenset({"inference"}), True, False)


def test_a_custom_limit_replaces_this_months_limit(store):
    acme = make_org(store, "acme")
    with store.transaction() as db:
        limits.ensure_budget(db, acme, this_month(), 50 * DOLLAR)  # the month's first request made it
        organizations.set_custom_limit(db, acme, 1_234, "key:key_admin", LADDER)
    assert budget_limit(store, acme) == 1_234
    with store.transaction() as db:
        assert organizations.info(organizations.get_org(db, acme), LADDER).monthly_limit_micros == 1_234
        organizations.set_custom_limit(db, acme, None, audit.CLI, LADDER)
    assert budget_limit(store, acme) == 50 * DOLLAR
    with store.transaction() as db:
        with pytest.raises(InvalidRequestError, match="negative"):
            organizations.set_custom_limit(db, acme, -1, audit.CLI, LADDER)
        with pytest.raises(NotFoundError):
            organizations.set_custom_limit(db, "org_unknown", 5, audit.CLI, LADDER)
        events = audit.list_events(db, acme, "limit.changed")
    assert [(e.actor, e.detail) for e in events] == [
        ("key:key_admin", {"before_micros": 50 * DOLLAR, "after_micros": 1_234, "custom": True}),
        ("cli", {"before_micros": 1_234, "after_micros": 50 * DOLLAR, "custom": False}),
    ]


def test_payments_climb_the_tier_ladder_and_raise_the_limit(store):
    acme = make_org(store, "acme")

    def pay(amount_micros: int) -> int:
        with store.transaction() as db:
            organizations.record_payment(db, acme, amount_micros, audit.CLI, LADDER)
        with store.transaction() as db:
            return organizations.get_org(db, acme).tier_index

    assert pay(50 * DOLLAR - 1) == 1  # a micro-dollar short of tier 2
    with store.transaction() as db:
        assert db.get(Budget, (acme, this_month())) is None
        assert audit.list_events(db, acme, "tier.changed") == []
    assert pay(1) == 2
    assert budget_limit(store, acme) == 500 * DOLLAR
    assert pay(449 * DOLLAR) == 2  # $499 paid
    assert pay(DOLLAR) == 3  # $500 paid
    assert budget_limit(store, acme) == 5_000 * DOLLAR
    with store.transaction() as db:
        assert organizations.get_org(db, acme).paid_micros == 500 * DOLLAR
        events = audit.list_events(db, acme, "tier.changed")
    assert [(e.actor, e.detail) for e in events] == [
        ("cli", {"before": 1, "after": 2, "paid_micros": 50 * DOLLAR}),
        ("cli", {"before": 2, "after": 3, "paid_micros": 500 * DOLLAR}),
    ]


def test_delete_org_data_removes_one_orgs_data_and_keeps_invoices_and_audit(store):
    limiter = StoreRateLimiter(store, clock=lambda: 1_740_000_000.0)
    org_ids, key_ids = {}, {}
    for name in ("acme", "globex"):
        org_ids[name] = org_id = make_org(store, name)
        with store.transaction() as db:
            key_ids[name] = keys.create_key(db, org_id, audit.CLI)[0].id
        limiter.hit([Allowance(f"org:{org_id}", 100, 10_000), Allowance(f"key:{key_ids[name]}", 100, 10_000)], 1, 10)
        spend(store, org_id, "small", SMALL, Usage(1_000, 0, 0), JANUARY)  # 100 micros
        with store.transaction() as db:
            limits.reserve(db, org_id, f"in-flight-{name}", 50, None, ttl_s=900, now=JANUARY)
            invoices.close_month(db, org_id, "2025-01", audit.CLI)
    acme, globex = org_ids["acme"], org_ids["globex"]

    def rows_of(org_id: str, key_id: str) -> dict[str, int]:
        with store.transaction() as db:
            def count(table, *where) -> int:
                return db.scalar(select(func.count()).select_from(table).where(*where))
            return {
                "keys": count(ApiKey, ApiKey.org_id == org_id),
                "usage_records": count(UsageRecord, UsageRecord.org_id == org_id),
                "usage_daily": count(DailyUsage, DailyUsage.org_id == org_id),
                "reservations": count(Reservation, Reservation.org_id == org_id),
                "budgets": count(Budget, Budget.org_id == org_id),
                "rate_counters": count(RateCounter, RateCounter.subject.in_([f"org:{org_id}", f"key:{key_id}"])),
                "invoices": count(Invoice, Invoice.org_id == org_id),
                "organizations": count(Organization, Organization.id == org_id),
                "audit_events": count(AuditEvent, AuditEvent.org_id == org_id),
            }

    before = {name: rows_of(org_ids[name], key_ids[name]) for name in org_ids}
    assert before["acme"] == {"keys": 1, "usage_records": 1, "usage_daily": 1, "reservations": 1, "budgets": 1,
                              "rate_counters": 2, "invoices": 1, "organizations": 1,
                              "audit_events": before["acme"]["audit_events"]}
    with store.transaction() as db:
        counts = organizations.delete_org_data(db, acme, "key:key_admin")
    assert counts == {"rate_counters": 2, "keys": 1, "usage_records": 1, "usage_daily": 1, "reservations": 1,
                      "budgets": 1}
    after = rows_of(acme, key_ids["acme"])
    assert after == {**{name: 0 for name in counts}, "invoices": 1, "organizations": 1,
                     "audit_events": before["acme"]["audit_events"] + 1}
    assert rows_of(globex, key_ids["globex"]) == before["globex"]
    with store.transaction() as db:
        [event] = audit.list_events(db, acme, "organization.data_deleted")
        assert (event.actor, event.target, event.detail) == ("key:key_admin", acme, counts)
        assert invoices.list_invoices(db, acme)[0].total_micros == 100
        with pytest.raises(NotFoundError):
            organizations.delete_org_data(db, "org_unknown", audit.CLI)
