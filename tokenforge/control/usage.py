"""Usage queries: the daily roll-ups (usage_daily) per organisation and date range, as rows and CSV,
and the date-range parsing and dollar formatting that the usage and invoice views share."""

import csv
import io
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenforge.control.store.models import DailyUsage
from tokenforge.errors import InvalidRequestError

MAX_RANGE_DAYS = 366  # a whole leap year, both ends included
_COUNT_NAMES = ("num_requests", "num_prompt_tokens", "num_cached_tokens", "num_completion_tokens", "cost_micros")
CSV_COLUMNS = ("day", "organization", "model", *_COUNT_NAMES)  # then cost_usd


@dataclass(frozen=True)
class DailyRow:
    """One organisation's use of one model on one UTC day."""

    day: date
    org_id: str
    model: str
    num_requests: int
    num_prompt_tokens: int  # cached ones included
    num_cached_tokens: int
    num_completion_tokens: int
    cost_micros: int

    def to_dict(self) -> dict:
        return {"day": self.day.isoformat(), "organization": self.org_id, "model": self.model,
                **{name: getattr(self, name) for name in _COUNT_NAMES}}


def daily_usage(db: Session, org_id: str | None, start: date, end: date) -> list[DailyRow]:
    """The roll-ups from `start` to `end` (both included) of `org_id`, or of every organisation when
    None; ordered by day, organisation, model."""
    query = (select(DailyUsage).where(DailyUsage.day >= start, DailyUsage.day <= end)
             .order_by(DailyUsage.day, DailyUsage.org_id, DailyUsage.model))
    if org_id is not None:
        query = query.where(DailyUsage.org_id == org_id)
    return [DailyRow(row.day, row.org_id, row.model, *(int(getattr(row, name)) for name in _COUNT_NAMES))
            for row in db.scalars(query)]


def usage_totals(rows: list[DailyRow]) -> dict[str, int]:
    """The sums of the counts and the cost over `rows`."""
    return {name: sum(getattr(row, name) for row in rows) for name in _COUNT_NAMES}


def to_csv(rows: list[DailyRow]) -> str:
    """One line per row under a header; cost in micro-dollars and in dollars (6 decimals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, "cost_usd"])
    for row in rows:
        writer.writerow([*row.to_dict().values(), format_dollars(row.cost_micros, dollar_sign=False)])
    return out.getvalue()


def parse_date_range(start: str | None, end: str | None, today: date) -> tuple[date, date]:
    """ISO dates, both included. Defaults: `end` today, `start` the first day of `end`'s month
    (so no flag at all means this month so far)."""
    end_day = _parse_day(end, "end") if end else today
    start_day = _parse_day(start, "start") if start else end_day.replace(day=1)
    if start_day > end_day:
        raise InvalidRequestError(f"start ({start_day}) is after end ({end_day})", param="start")
    if end_day - start_day >= timedelta(days=MAX_RANGE_DAYS):
        raise InvalidRequestError(f"a usage range covers at most {MAX_RANGE_DAYS} days, "
                                  f"{start_day}..{end_day} covers {(end_day - start_day).days + 1}", param="end")
    return start_day, end_day


def format_dollars(micros: int, places: int = 6, dollar_sign: bool = True) -> str:
    """1_234_567 -> "$1.234567" (places=6) or "$1.23" (places=2, rounded half up); exact, no floats."""
    amount = (Decimal(micros) / 1_000_000).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    text = f"{amount:,.{places}f}" if dollar_sign else f"{amount:.{places}f}"
    if not dollar_sign:
        return text
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def _parse_day(text: str, param: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"{param} must be an ISO date such as 2025-01-31, got {text!r}",
                                  param=param) from None
