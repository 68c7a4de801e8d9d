"""Postpaid invoices: close a UTC month per organisation into one line per model and price from its
usage records, mark an invoice paid (once) so the payment moves the organisation up the tier ladder,
and render an invoice as a plain-text statement or CSV."""

import csv
import io
import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenforge.control import audit, keys, organizations
from tokenforge.control.errors import NotFoundError
from tokenforge.control.store.models import Invoice, InvoiceLine, UsageRecord
from tokenforge.control.tiers import TierLadder
from tokenforge.control.usage import format_dollars
from tokenforge.errors import InvalidRequestError

_MONTH = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")
_PRICE_COLUMNS = (UsageRecord.model, UsageRecord.input_price_micros, UsageRecord.cached_input_price_micros,
                  UsageRecord.output_price_micros)


@dataclass(frozen=True)
class LineInfo:
    """One model at one set of prices (per million tokens); amount is the sum of its requests' costs."""

    model: str
    num_requests: int
    num_prompt_tokens: int  # cached ones included
    num_cached_tokens: int
    num_completion_tokens: int
    input_price_micros: int
    cached_input_price_micros: int
    output_price_micros: int
    amount_micros: int

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens

    def to_dict(self) -> dict:
        return {"object": "invoice.line", **asdict(self)}


@dataclass(frozen=True)
class InvoiceInfo:
    id: str
    org_id: str
    month: str  # "YYYY-MM", UTC
    status: str  # open | paid
    total_micros: int
    created_at: datetime
    paid_at: datetime | None
    lines: tuple[LineInfo, ...]

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "invoice", "organization": self.org_id, "month": self.month,
                "status": self.status, "total_micros": self.total_micros, "created_at": self.created_at.isoformat(),
                "paid_at": None if self.paid_at is None else self.paid_at.isoformat(),
                "lines": [line.to_dict() for line in self.lines]}


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """The UTC instants [start, end) of a "YYYY-MM" month; InvalidRequestError for another format."""
    match = _MONTH.match(month) if isinstance(month, str) else None
    if match is None:
        raise InvalidRequestError(f"month must read YYYY-MM, e.g. 2025-01, got {month!r}", param="month")
    year, num = int(match.group(1)), int(match.group(2))
    try:
        start = datetime(year, num, 1, tzinfo=UTC)
        end = datetime(year + num // 12, num % 12 + 1, 1, tzinfo=UTC)
    except ValueError:  # month 00 or 13+, year 0000, or 9999-12 (which ends in the year 10000)
        raise InvalidRequestError(f"month must be a calendar month from 0001-01 to 9999-11, got {month!r}",
                                  param="month") from None
    return start, end


def close_month(db: Session, org_id: str, month: str, actor: str, now: datetime | None = None, *,
                allow_current: bool = False) -> InvoiceInfo:
    """The organisation's invoice for `month`, made from its usage records of that UTC month; closing a
    month again returns the invoice made first, unchanged. A month that has not ended is refused unless
    `allow_current` (usage written later in that month is then on no invoice)."""
    start, end = _closable_bounds(month, now or datetime.now(UTC), allow_current)
    organizations.get_org(db, org_id)
    existing = _find(db, org_id, month)
    if existing is not None:
        return _info(db, existing)
    lines = _lines_from_usage(db, org_id, start, end)
    invoice = Invoice(id=keys.new_id("inv"), org_id=org_id, month=month, status="open",
                      total_micros=sum(line.amount_micros for line in lines), created_at=datetime.now(UTC))
    try:
        with db.begin_nested():
            db.add(invoice)
            db.flush()  # the invoice row before its lines (foreign key)
            db.add_all(InvoiceLine(invoice_id=invoice.id, **asdict(line)) for line in lines)
            audit.record(db, actor, "invoice.created", org_id, invoice.id, month=month,
                         total_micros=invoice.total_micros, num_lines=len(lines))
    except IntegrityError:
        # Another transaction closed the same (org, month) first: its invoice stands.
        existing = _find(db, org_id, month)
        if existing is None:
            raise
        return _info(db, existing)
    return _info(db, invoice)


def close_all(db: Session, month: str, actor: str, now: datetime | None = None, *,
              allow_current: bool = False) -> list[InvoiceInfo]:
    """close_month for every organisation with usage records in `month`, ordered by organisation id."""
    start, end = _closable_bounds(month, now or datetime.now(UTC), allow_current)
    org_ids = db.scalars(select(UsageRecord.org_id).distinct()
                         .where(UsageRecord.created_at >= start, UsageRecord.created_at < end)
                         .order_by(UsageRecord.org_id)).all()
    return [close_month(db, org_id, month, actor, now, allow_current=allow_current) for org_id in org_ids]


def mark_paid(db: Session, invoice_id: str, actor: str, ladder: TierLadder, org_id: str | None = None) -> InvoiceInfo:
    """Marks an open invoice paid and counts its total toward the organisation's tier. Paying a paid
    invoice changes nothing: one guarded UPDATE decides which caller records the payment."""
    invoice = _get(db, invoice_id, org_id)
    paid_at = datetime.now(UTC)
    result = db.execute(update(Invoice).where(Invoice.id == invoice_id, Invoice.status == "open")
                        .values(status="paid", paid_at=paid_at))
    if result.rowcount == 1:
        organizations.record_payment(db, invoice.org_id, invoice.total_micros, actor, ladder)
        audit.record(db, actor, "invoice.paid", invoice.org_id, invoice_id, month=invoice.month,
                     total_micros=invoice.total_micros)
    db.refresh(invoice)
    return _info(db, invoice)


def get_invoice(db: Session, invoice_id: str, org_id: str | None = None) -> InvoiceInfo:
    """The invoice (of `org_id` when given: another organisation's is 'not found')."""
    return _info(db, _get(db, invoice_id, org_id))


def list_invoices(db: Session, org_id: str | None = None, month: str | None = None) -> list[InvoiceInfo]:
    """Oldest month first; `org_id` / `month` filter when given."""
    query = select(Invoice).order_by(Invoice.month, Invoice.org_id, Invoice.id)
    if org_id is not None:
        query = query.where(Invoice.org_id == org_id)
    if month is not None:
        month_bounds(month)  # the format check
        query = query.where(Invoice.month == month)
    invoices = db.scalars(query).all()
    lines: dict[str, list[LineInfo]] = {invoice.id: [] for invoice in invoices}
    if invoices:
        for row in db.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id.in_(lines))
                              .order_by(InvoiceLine.id)):
            lines[row.invoice_id].append(_line_info(row))
    return [_info_with(invoice, lines[invoice.id]) for invoice in invoices]


def render_text(invoice: InvoiceInfo, org_name: str) -> str:
    """A plain-text statement: header, one block per line (input, cached input and output tokens apart,
    each with its price per million tokens), the total. Amounts in dollars to the micro-dollar."""
    start, end = month_bounds(invoice.month)
    status = "paid on " + invoice.paid_at.strftime("%Y-%m-%d") if invoice.paid_at else invoice.status
    out = [f"Invoice {invoice.id}",
           f"Organization  {org_name} ({invoice.org_id})",
           f"Period        {start:%Y-%m-%d} to {end - timedelta(days=1):%Y-%m-%d} (UTC)",
           f"Issued        {invoice.created_at:%Y-%m-%d %H:%M} UTC",
           f"Status        {status}", ""]
    width = 72
    if not invoice.lines:
        out += ["No usage in this period.", ""]
    for line in invoice.lines:
        amount = format_dollars(line.amount_micros)
        title = f"{line.model}  ({line.num_requests:,} request{'s' if line.num_requests != 1 else ''})"
        out.append(f"{title}{amount:>{max(len(amount) + 2, width - len(title))}}")
        for kind, num_tokens, price in (("input", line.num_uncached_tokens, line.input_price_micros),
                                        ("cached input", line.num_cached_tokens, line.cached_input_price_micros),
                                        ("output", line.num_completion_tokens, line.output_price_micros)):
            out.append(f"    {kind:<14}{num_tokens:>16,} tokens  x  {format_dollars(price)} per 1M tokens")
        out.append("")
    total = format_dollars(invoice.total_micros)
    out.append("-" * width)
    out.append(f"Total{total:>{width - 5}}")
    return "\n".join(out) + "\n"


def render_csv(invoice: InvoiceInfo) -> str:
    """One row per line under a header; prices per million tokens and amounts in micro-dollars, the
    amount in dollars too. The total is the sum of amount_micros."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [field.name for field in fields(LineInfo)]
    writer.writerow(["invoice", "organization", "month", *columns, "amount_usd"])
    for line in invoice.lines:
        writer.writerow([invoice.id, invoice.org_id, invoice.month, *(getattr(line, name) for name in columns),
                         format_dollars(line.amount_micros, dollar_sign=False)])
    return out.getvalue()


def _closable_bounds(month: str, now: datetime, allow_current: bool) -> tuple[datetime, datetime]:
    start, end = month_bounds(month)
    if now < start or (now < end and not allow_current):
        raise InvalidRequestError(f"month {month} has not ended yet (it ends {end:%Y-%m-%d} 00:00 UTC)",
                                  param="month")
    return start, end


def _lines_from_usage(db: Session, org_id: str, start: datetime, end: datetime) -> list[LineInfo]:
    query = (select(*_PRICE_COLUMNS, func.count(), func.sum(UsageRecord.num_prompt_tokens),
                    func.sum(UsageRecord.num_cached_tokens), func.sum(UsageRecord.num_completion_tokens),
                    func.sum(UsageRecord.cost_micros))
             .where(UsageRecord.org_id == org_id, UsageRecord.created_at >= start, UsageRecord.created_at < end)
             .group_by(*_PRICE_COLUMNS).order_by(*_PRICE_COLUMNS))
    lines = []
    for (model, input_price, cached_price, output_price, num_requests, num_prompt, num_cached, num_completion,
         amount) in db.execute(query):
        # PostgreSQL sums BIGINTs as NUMERIC: back to int.
        lines.append(LineInfo(model, int(num_requests), int(num_prompt), int(num_cached), int(num_completion),
                              int(input_price), int(cached_price), int(output_price), int(amount)))
    return lines


def _find(db: Session, org_id: str, month: str) -> Invoice | None:
    return db.scalars(select(Invoice).where(Invoice.org_id == org_id, Invoice.month == month)).first()


def _get(db: Session, invoice_id: str, org_id: str | None) -> Invoice:
    invoice = db.get(Invoice, invoice_id)
    if invoice is None or (org_id is not None and invoice.org_id != org_id):
        raise NotFoundError(f"no invoice {invoice_id}", param="invoice")
    return invoice


def _info(db: Session, invoice: Invoice) -> InvoiceInfo:
    rows = db.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id).order_by(InvoiceLine.id))
    return _info_with(invoice, [_line_info(row) for row in rows])


def _info_with(invoice: Invoice, lines: list[LineInfo]) -> InvoiceInfo:
    return InvoiceInfo(invoice.id, invoice.org_id, invoice.month, invoice.status, invoice.total_micros,
                       invoice.created_at, invoice.paid_at, tuple(lines))


def _line_info(row: InvoiceLine) -> LineInfo:
    return LineInfo(row.model, row.num_requests, row.num_prompt_tokens, row.num_cached_tokens,
                    row.num_completion_tokens, row.input_price_micros, row.cached_input_price_micros,
                    row.output_price_micros, row.amount_micros)
