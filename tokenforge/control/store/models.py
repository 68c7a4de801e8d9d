"""The control plane's tables (SQLAlchemy 2 declarative models). Alembic migrations under
migrations/ create them; change a model only together with a new migration.

Money is integer micro-dollars (BigInteger); times are timezone-aware UTC.
"""

from datetime import UTC, date, datetime

from sqlalchemy import BigInteger, Boolean, Date, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: store naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: use datetime.now(UTC)")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        # SQLite hands back naive UTC; PostgreSQL an aware time in the session's zone.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "org_<hex>"
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # The operator organisation owns the server: its admin keys manage every organisation.
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    # Sum of paid invoices: moves the organisation up the tier ladder.
    paid_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    tier_index: Mapped[int] = mapped_column(Integer, default=1)
    # An admin's monthly limit instead of the tier's; None: the tier's.
    custom_limit_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # No spending limit at all (the local organisation when auth is off).
    unlimited: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "key_<hex>"
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # The key's public prefix finds its row; only a hash of the whole key is stored.
    prefix: Mapped[str] = mapped_column(String(40), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    scopes: Mapped[str] = mapped_column(String(200))  # space-separated: "inference admin"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Budget(Base):
    """One organisation's month: the limit, what is spent (settled) and what is reserved (in flight).
    Reservation is one atomic UPDATE guarded by spent + reserved + cost <= limit."""

    __tablename__ = "budgets"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # "YYYY-MM", UTC
    limit_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # None: unlimited
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    # The highest spend alert (50, 75, 90 percent) written to the audit log this month.
    alert_percent: Mapped[int] = mapped_column(Integer, default=0)


class Reservation(Base):
    """A request's worst-case cost held against its month's budget until it settles or expires."""

    __tablename__ = "reservations"

    request_id: Mapped[str] = mapped_column(String(140), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(40), index=True)
    month: Mapped[str] = mapped_column(String(7))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class UsageRecord(Base):
    """Exactly one per metered request (unique request_id). Never holds prompts or outputs."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_org_created", "org_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(140), unique=True)
    org_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))  # ok | client_closed | error
    num_prompt_tokens: Mapped[int] = mapped_column(Integer)
    num_cached_tokens: Mapped[int] = mapped_column(Integer)
    num_completion_tokens: Mapped[int] = mapped_column(Integer)
    # The prices the request was charged at, per million tokens.
    input_price_micros: Mapped[int] = mapped_column(BigInteger)
    cached_input_price_micros: Mapped[int] = mapped_column(BigInteger)
    output_price_micros: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    latency_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DailyUsage(Base):
    """Roll-up of usage records per organisation, UTC day and model, kept in the same transaction."""

    __tablename__ = "usage_daily"

    org_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    num_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    num_prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    num_cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    num_completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("org_id", "month"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "inv_<hex>"
    org_id: Mapped[str] = mapped_column(String(40), index=True)
    month: Mapped[str] = mapped_column(String(7))
    status: Mapped[str] = mapped_column(String(10))  # open | paid
    total_micros: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class InvoiceLine(Base):
    """One model at one set of prices in an invoice; amount is the sum of its requests' costs."""

    __tablename__ = "invoice_lines"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    num_requests: Mapped[int] = mapped_column(BigInteger)
    num_prompt_tokens: Mapped[int] = mapped_column(BigInteger)  # cached ones included
    num_cached_tokens: Mapped[int] = mapped_column(BigInteger)
    num_completion_tokens: Mapped[int] = mapped_column(BigInteger)
    input_price_micros: Mapped[int] = mapped_column(BigInteger)
    cached_input_price_micros: Mapped[int] = mapped_column(BigInteger)
    output_price_micros: Mapped[int] = mapped_column(BigInteger)
    amount_micros: Mapped[int] = mapped_column(BigInteger)


class RateCounter(Base):
    """Requests and tokens in one fixed one-minute window of one subject ("org:<id>" / "key:<id>")."""

    __tablename__ = "rate_counters"

    subject: Mapped[str] = mapped_column(String(60), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds
    num_requests: Mapped[int] = mapped_column(Integer, default=0)
    num_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class AuditEvent(Base):
    """Append-only: the code never updates or deletes a row."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_org_at", "org_id", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(100))  # "key:<id>", "cli", "system"
    org_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    action: Mapped[str] = mapped_column(String(60))  # "key.created", "budget.alert", ...
    target: Mapped[str | None] = mapped_column(String(140), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON
