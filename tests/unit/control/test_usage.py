"""Usage queries on both store backends: daily roll-ups per organisation and inclusive date range,
totals, CSV; the date-range parser and dollar formatting."""

import csv
import io
from datetime import UTC, date, datetime, timedelta

import pytest

from tests.unit.control.helpers import make_org, spend
from tokenforge.control import usage
from tokenforge.control.metering import Usage
from tokenforge.control.pricing import Price
from tokenforge.errors import InvalidRequestError

SMALL = Price(input_micros=100_000, cached_input_micros=50_000, output_micros=200_000)  # $0.10/0.05/0.20 per 1M
BIG = Price(input_micros=900_000, cached_input_micros=450_000, output_micros=900_000)
TODAY = date(2025, 3, 14)


@pytest.fixture
def filled(store):
    """Two organisations, two models, three days (one at the very end of a day)."""
    acme, beta = make_org(store, "acme"), make_org(store, "beta")
    day1 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
    # 800 uncached x 0.10 + 200 cached x 0.05 + 500 x 0.20 = 190 micros
    assert spend(store, acme, "small", SMALL, Usage(1000, 200, 500), day1) == 190
    assert spend(store, acme, "small", SMALL, Usage(3, 0, 1), day1 + timedelta(hours=1)) == 1  # 0.5 rounds up
    # 1000 x 0.90 + 1000 x 0.45 + 1000 x 0.90 = 2250 micros
    assert spend(store, acme, "big", BIG, Usage(2000, 1000, 1000), datetime(2025, 3, 2, 23, 59, 59, tzinfo=UTC)) == 2250
    assert spend(store, beta, "small", SMALL, Usage(10_000, 0, 0), datetime(2025, 3, 3, 0, 0, tzinfo=UTC)) == 1000
    return store, acme, beta


def test_daily_rows_of_one_org(filled):
    store, acme, _ = filled
    with store.transaction() as db:
        rows = usage.daily_usage(db, acme, date(2025, 3, 1), date(2025, 3, 31))
    assert rows == [
        usage.DailyRow(date(2025, 3, 1), acme, "small", 2, 1003, 200, 501, 191),
        usage.DailyRow(date(2025, 3, 2), acme, "big", 1, 2000, 1000, 1000, 2250),
    ]
    assert usage.usage_totals(rows) == {"num_requests": 3, "num_prompt_tokens": 3003, "num_cached_tokens": 1200,
                                        "num_completion_tokens": 1501, "cost_micros": 2441}


def test_all_orgs_ordered_and_range_inclusive(filled):
    store, acme, beta = filled
    with store.transaction() as db:
        rows = usage.daily_usage(db, None, date(2025, 3, 2), date(2025, 3, 3))
        assert usage.daily_usage(db, None, date(2025, 3, 4), date(2025, 3, 31)) == []
        assert usage.daily_usage(db, "org_unknown", date(2025, 3, 1), date(2025, 3, 31)) == []
    assert [(row.day.day, row.org_id, row.model) for row in rows] == [(2, acme, "big"), (3, beta, "small")]


def test_csv(filled):
    store, acme, _ = filled
    with store.transaction() as db:
        rows = usage.daily_usage(db, None, date(2025, 3, 1), date(2025, 3, 31))
    parsed = list(csv.DictReader(io.StringIO(usage.to_csv(rows))))
    assert len(parsed) == 3
    assert parsed[0] == {"day": "2025-03-01", "organization": acme, "model": "small", "num_requests": "2",
                         "num_prompt_tokens": "1003", "num_cached_tokens": "200", "num_completion_tokens": "501",
                         "cost_micros": "191", "cost_usd": "0.000191"}
    assert sum(int(row["cost_micros"]) for row in parsed) == 3441
    assert usage.to_csv([]).splitlines() == [",".join((*usage.CSV_COLUMNS, "cost_usd"))]


def test_to_dict(filled):
    store, acme, _ = filled
    with store.transaction() as db:
        row = usage.daily_usage(db, acme, date(2025, 3, 2), date(2025, 3, 2))[0]
    assert row.to_dict() == {"day": "2025-03-02", "organization": acme, "model": "big", "num_requests": 1,
                             "num_prompt_tokens": 2000, "num_cached_tokens": 1000, "num_completion_tokens": 1000,
                             "cost_micros": 2250}


def test_date_range_defaults():
    assert usage.parse_date_range(None, None, TODAY) == (date(2025, 3, 1), TODAY)
    assert usage.parse_date_range("2025-02-10", None, TODAY) == (date(2025, 2, 10), TODAY)
    # Only an end: from the first day of the end's month.
    assert usage.parse_date_range(None, "2024-12-24", TODAY) == (date(2024, 12, 1), date(2024, 12, 24))
    assert usage.parse_date_range("2024-01-01", "2024-12-31", TODAY) == (date(2024, 1, 1), date(2024, 12, 31))


@pytest.mark.parametrize("start, end, param", [
    ("2025-02-30", None, "start"), ("yesterday", None, "start"), (None, "2025-13-01", "end"),
    ("2025-03-15", None, "start"),  # after today, the default end
    ("2025-03-02", "2025-03-01", "start"),
    ("2024-01-01", "2025-01-01", "end"),  # 367 days
])
def test_bad_date_ranges(start, end, param):
    with pytest.raises(InvalidRequestError) as caught:
        usage.parse_date_range(start, end, TODAY)
    assert caught.value.param == param


def test_format_dollars():
    assert usage.format_dollars(1_234_567) == "$1.234567"
    assert usage.format_dollars(1_234_567, places=2) == "$1.23"
    assert usage.format_dollars(1_235_000, places=2) == "$1.24"  # half up
    assert usage.format_dollars(1) == "$0.000001"
    assert usage.format_dollars(1_234_000_000_000) == "$1,234,000.000000"
    assert usage.format_dollars(191, dollar_sign=False) == "0.000191"
