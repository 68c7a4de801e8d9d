"""Invoices on both store backends: lines per model and price from the usage records of a UTC month
(hand-computed costs, cached tokens apart), the month's edges, idempotent and concurrent closes,
paying once (the tier moves), and the text and CSV renderings."""

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from tests.unit.control.helpers import make_org, spend
from tokenforge.control import audit, invoices, organizations
from tokenforge.control.errors import NotFoundError
from tokenforge.control.invoices import LineInfo
from tokenforge.control.metering import Usage
from tokenforge.control.pricing import Price
from tokenforge.control.store.models import Organization, UsageRecord
from tokenforge.control.tiers import Tier, TierLadder
from tokenforge.errors import InvalidRequestError

DOLLAR = 1_000_000
SMALL = Price(input_micros=100_000, cached_input_micros=50_000, output_micros=200_000)  # $0.10/0.05/0.20 per 1M
SMALL_NEW = Price(input_micros=150_000, cached_input_micros=75_000, output_micros=300_000)  # a price change
BIG = Price(input_micros=900_000, cached_input_micros=450_000, output_micros=900_000)
# Tier 2 from $0.002 paid, so that one small invoice crosses it.
LADDER = TierLadder((Tier(1, "tier-1", 0, 50 * DOLLAR, 600, 1_000_000),
                     Tier(2, "tier-2", 2_000, 500 * DOLLAR, 1_200, 2_000_000)))
AFTER = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)  # "now" when January and February have ended


def close(store, org_id: str, month: str, now: datetime = AFTER, **kwargs) -> invoices.InvoiceInfo:
    with store.transaction() as db:
        return invoices.close_month(db, org_id, month, audit.CLI, now, **kwargs)


@pytest.fixture
def january(store):
    """acme's January: two models, one of them at two prices, records on the month's edges."""
    acme = make_org(store, "acme", LADDER)
    jan = datetime(2025, 1, 10, 8, 0, tzinfo=UTC)
    # 800 uncached x 0.10 + 200 cached x 0.05 + 500 out x 0.20 = 80 + 10 + 100 = 190 micros
    assert spend(store, acme, "small", SMALL, Usage(1000, 200, 500), jan) == 190
    # 3 x 0.10 + 1 x 0.20 = 0.5 micros, rounded up to 1
    assert spend(store, acme, "small", SMALL, Usage(3, 0, 1), jan + timedelta(hours=1)) == 1
    # 1000 x 0.15 + 0 + 1000 x 0.30 = 450 micros, at the new price: its own line
    assert spend(store, acme, "small", SMALL_NEW, Usage(1000, 0, 1000), jan + timedelta(days=5)) == 450
    # 1000 x 0.90 + 1000 cached x 0.45 + 1000 x 0.90 = 2250 micros, on the last second of January
    last_second = datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC)
    assert spend(store, acme, "big", BIG, Usage(2000, 1000, 1000), last_second) == 2250
    # The first second of February: not on January's invoice. 10,000 x 0.90 = 9000 micros
    assert spend(store, acme, "big", BIG, Usage(10_000, 0, 0), last_second + timedelta(seconds=1)) == 9000
    # The first second of January is in it: 100 x 0.10 = 10 micros
    assert spend(store, acme, "small", SMALL, Usage(100, 0, 0), datetime(2025, 1, 1, tzinfo=UTC)) == 10
    return store, acme


def test_lines_per_model_and_price(january):
    store, acme = january
    invoice = close(store, acme, "2025-01")
    assert (invoice.org_id, invoice.month, invoice.status, invoice.paid_at) == (acme, "2025-01", "open", None)
    assert invoice.lines == (
        LineInfo("big", 1, 2000, 1000, 1000, 900_000, 450_000, 900_000, 2250),
        LineInfo("small", 3, 1103, 200, 501, 100_000, 50_000, 200_000, 201),
        LineInfo("small", 1, 1000, 0, 1000, 150_000, 75_000, 300_000, 450),
    )
    assert invoice.total_micros == 2250 + 201 + 450
    with store.transaction() as db:
        in_january = (UsageRecord.org_id == acme, UsageRecord.created_at < datetime(2025, 2, 1, tzinfo=UTC))
        assert db.scalar(select(func.sum(UsageRecord.cost_micros)).where(*in_january)) == invoice.total_micros
        assert invoices.get_invoice(db, invoice.id) == invoice
        assert [e.target for e in audit.list_events(db, acme, "invoice.created")] == [invoice.id]


def test_the_next_month_starts_at_midnight(january):
    store, acme = january
    february = close(store, acme, "2025-02")
    assert february.lines == (LineInfo("big", 1, 10_000, 0, 0, 900_000, 450_000, 900_000, 9000),)
    assert february.total_micros == 9000


def test_closing_again_changes_nothing(january):
    store, acme = january
    first = close(store, acme, "2025-01", allow_current=False)
    # A record that lands in the closed month afterwards (clock skew) does not change the invoice.
    spend(store, acme, "big", BIG, Usage(5, 0, 5), datetime(2025, 1, 20, tzinfo=UTC))
    assert close(store, acme, "2025-01") == first
    with store.transaction() as db:
        assert len(audit.list_events(db, acme, "invoice.created")) == 1
        assert invoices.list_invoices(db, acme) == [first]


def test_a_concurrent_close_keeps_the_first_invoice(january, monkeypatch):
    """The other transaction inserted (org, month) after our look-up: the unique constraint fails our
    insert in its savepoint, and its invoice is returned."""
    store, acme = january
    first = close(store, acme, "2025-01")
    real_find = invoices._find
    calls = []

    def find_missing_once(db, org_id, month):
        calls.append(month)
        return None if len(calls) == 1 else real_find(db, org_id, month)

    monkeypatch.setattr(invoices, "_find", find_missing_once)
    with store.transaction() as db:
        again = invoices.close_month(db, acme, "2025-01", audit.CLI, AFTER)
        db.get(Organization, acme)  # the session is still usable after the savepoint's rollback
    assert again == first and len(calls) == 2
    with store.transaction() as db:
        assert len(invoices.list_invoices(db, acme)) == 1


def test_an_org_without_usage_gets_an_empty_invoice(store):
    idle = make_org(store, "idle", LADDER)
    invoice = close(store, idle, "2025-01")
    assert (invoice.lines, invoice.total_micros) == ((), 0)
    with store.transaction() as db:
        assert invoices.list_invoices(db, month="2025-01") == [invoice]


@pytest.mark.parametrize("month", ["2025-13", "2025-1", "25-01", "2025-01-01", "", "2025/01"])
def test_bad_months(january, month):
    store, acme = january
    with pytest.raises(InvalidRequestError) as caught:
        close(store, acme, month)
    assert caught.value.param == "month"


def test_the_current_month_only_when_allowed(january):
    store, acme = january
    in_february = datetime(2025, 2, 14, tzinfo=UTC)
    with pytest.raises(InvalidRequestError, match="not ended"):
        close(store, acme, "2025-02", in_february)
    with pytest.raises(InvalidRequestError, match="not ended"):
        close(store, acme, "2025-03", in_february, allow_current=True)  # a month not begun, never
    assert close(store, acme, "2025-02", in_february, allow_current=True).total_micros == 9000


def test_close_all_covers_the_orgs_with_usage(january):
    store, acme = january
    beta, idle = make_org(store, "beta", LADDER), make_org(store, "idle", LADDER)
    spend(store, beta, "small", SMALL, Usage(10_000, 0, 0), datetime(2025, 1, 3, tzinfo=UTC))  # 1000 micros
    with store.transaction() as db:
        closed = invoices.close_all(db, "2025-01", audit.CLI, AFTER)
        assert {i.org_id: i.total_micros for i in closed} == {acme: 2901, beta: 1000}
        assert invoices.close_all(db, "2025-01", audit.CLI, AFTER) == closed
        assert invoices.list_invoices(db, idle) == []


def test_paying_moves_the_tier_once(january):
    store, acme = january
    invoice = close(store, acme, "2025-01")
    assert invoice.total_micros >= LADDER.tiers[1].min_paid_micros
    with store.transaction() as db:
        paid = invoices.mark_paid(db, invoice.id, audit.CLI, LADDER)
    assert (paid.status, paid.total_micros, paid.lines) == ("paid", invoice.total_micros, invoice.lines)
    assert paid.paid_at is not None
    with store.transaction() as db:
        assert invoices.mark_paid(db, invoice.id, audit.CLI, LADDER, org_id=acme) == paid  # a no-op
    with store.transaction() as db:
        org = organizations.get_org(db, acme)
        assert (org.paid_micros, org.tier_index) == (invoice.total_micros, 2)
        assert organizations.monthly_limit(org, LADDER) == 500 * DOLLAR
        assert len(audit.list_events(db, acme, "invoice.paid")) == 1
        assert [e.detail["after"] for e in audit.list_events(db, acme, "tier.changed")] == [2]


def test_paying_below_the_threshold_keeps_the_tier(store):
    acme = make_org(store, "acme", LADDER)
    spend(store, acme, "small", SMALL, Usage(1000, 0, 0), datetime(2025, 1, 3, tzinfo=UTC))  # 100 micros
    invoice = close(store, acme, "2025-01")
    with store.transaction() as db:
        invoices.mark_paid(db, invoice.id, audit.CLI, LADDER)
        org = organizations.get_org(db, acme)
        assert (org.paid_micros, org.tier_index) == (100, 1)


def test_another_orgs_invoice_is_not_found(january):
    store, acme = january
    beta = make_org(store, "beta", LADDER)
    invoice = close(store, acme, "2025-01")
    with store.transaction() as db:
        with pytest.raises(NotFoundError):
            invoices.mark_paid(db, invoice.id, audit.CLI, LADDER, org_id=beta)
        with pytest.raises(NotFoundError):
            invoices.get_invoice(db, invoice.id, org_id=beta)
        with pytest.raises(NotFoundError):
            invoices.get_invoice(db, "inv_missing")
        assert invoices.list_invoices(db, beta) == []
    with store.transaction() as db:
        assert invoices.get_invoice(db, invoice.id).status == "open"


def test_to_dict_is_json_with_micros(january):
    store, acme = january
    data = json.loads(json.dumps(close(store, acme, "2025-01").to_dict()))
    assert (data["object"], data["organization"], data["total_micros"], data["paid_at"]) == \
        ("invoice", acme, 2901, None)
    assert data["lines"][0] == {"object": "invoice.line", "model": "big", "num_requests": 1,
                                "num_prompt_tokens": 2000, "num_cached_tokens": 1000, "num_completion_tokens": 1000,
                                "input_price_micros": 900_000, "cached_input_price_micros": 450_000,
                                "output_price_micros": 900_000, "amount_micros": 2250}


def test_render_text(january):
    store, acme = january
    text = invoices.render_text(close(store, acme, "2025-01"), "Acme Corp")
    assert "Invoice inv_" in text and f"Acme Corp ({acme})" in text
    assert "2025-01-01 to 2025-01-31 (UTC)" in text
    big = text[text.index("big"):text.index("small")]
    assert "(1 request)" in big and big.rstrip().splitlines()[0].endswith("$0.002250")
    # Uncached input, cached input and output apart, each at its price per million tokens.
    assert "input                    1,000 tokens  x  $0.900000 per 1M tokens" in big
    assert "cached input             1,000 tokens  x  $0.450000 per 1M tokens" in big
    assert "output                   1,000 tokens  x  $0.900000 per 1M tokens" in big
    assert "(3 requests)" in text and "$0.000201" in text and "$0.000450" in text
    assert text.rstrip().splitlines()[-1].startswith("Total") and text.rstrip().endswith("$0.002901")


def test_render_csv(january):
    store, acme = january
    invoice = close(store, acme, "2025-01")
    rows = list(csv.DictReader(io.StringIO(invoices.render_csv(invoice))))
    assert [(row["model"], row["amount_micros"], row["amount_usd"]) for row in rows] == [
        ("big", "2250", "0.002250"), ("small", "201", "0.000201"), ("small", "450", "0.000450")]
    assert rows[0]["invoice"] == invoice.id and rows[0]["num_cached_tokens"] == "1000"
    assert sum(int(row["amount_micros"]) for row in rows) == invoice.total_micros
