"""open_store: migrations that run again harmlessly, SQLite in WAL mode, an unreachable PostgreSQL
failing as StoreUnavailableError, and times stored and read back as aware UTC on both backends."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.exc import StatementError

from tests.store_helpers import make_store
from tokenforge.control import audit, keys, organizations
from tokenforge.control.errors import StoreUnavailableError
from tokenforge.control.store.db import Store, normalise_url, open_store
from tokenforge.control.store.models import ApiKey, Organization
from tokenforge.control.tiers import TierLadder

PLUS_TWO = timezone(timedelta(hours=2))


def make_org_row(org_id: str, created_at: datetime) -> Organization:
    return Organization(id=org_id, name=org_id, is_operator=False, paid_micros=0, tier_index=1, unlimited=False,
                        created_at=created_at)


def test_open_store_twice_on_the_same_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'nested' / 'control.db'}"  # the directory is made
    first = open_store(url)
    with first.transaction() as db:
        org_id = organizations.create_org(db, "acme", audit.CLI, TierLadder.default()).id
        revision = db.scalars(text("SELECT version_num FROM alembic_version")).all()
    first.close()
    second = open_store(url)
    try:
        with second.transaction() as db:
            assert db.scalars(text("SELECT version_num FROM alembic_version")).all() == revision
            assert len(revision) == 1
            assert [o.id for o in organizations.list_orgs(db)] == [org_id]
    finally:
        second.close()


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'control.db'}")
    try:
        assert store.dialect == "sqlite"
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        store.close()


def test_an_unreachable_postgresql_is_unavailable():
    with pytest.raises(StoreUnavailableError, match="cannot open the store"):
        open_store("postgresql://postgres@127.0.0.1:1/none")
    store = Store(create_engine(normalise_url("postgresql://postgres@127.0.0.1:1/none")))
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        with store.transaction() as db:
            db.execute(text("SELECT 1"))


def test_normalise_url():
    assert normalise_url("postgresql://u:secret@db:5432/tf") == "postgresql+psycopg://u:secret@db:5432/tf"
    assert normalise_url("postgres://u@db/tf") == "postgresql+psycopg://u@db/tf"
    assert normalise_url("sqlite:///x/control.db") == "sqlite:///x/control.db"


def test_utc_datetimes_round_trip(store):
    noon_plus_two = datetime(2025, 1, 1, 12, 0, tzinfo=PLUS_TWO)  # 10:00 UTC
    expires_at = datetime(2025, 6, 30, 23, 59, 59, 123_456, tzinfo=UTC)
    with store.transaction() as db:
        db.add(make_org_row("org_a", noon_plus_two))
        db.flush()
        db.add(ApiKey(id="key_a", org_id="org_a", name="", prefix="0123456789ab", key_hash="0" * 64,
                      scopes="inference", created_at=noon_plus_two, expires_at=expires_at))
    with store.transaction() as db:
        org = db.get(Organization, "org_a")
        key = db.get(ApiKey, "key_a")
        assert org.created_at == datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
        assert org.created_at.utcoffset() == timedelta(0)
        assert (key.expires_at, key.expires_at.utcoffset()) == (expires_at, timedelta(0))
        # Compared as instants in SQL too: 10:00 UTC is before 11:00 UTC (the local 12:00 is not).
        assert db.scalars(select(Organization.id).where(
            Organization.created_at < datetime(2025, 1, 1, 11, 0, tzinfo=UTC))).all() == ["org_a"]
        assert keys.list_keys(db)[0].to_dict()["created_at"] == "2025-01-01T10:00:00+00:00"
    with pytest.raises((ValueError, StatementError), match="naive"):
        with store.transaction() as db:
            db.add(make_org_row("org_naive", datetime(2025, 1, 1, 12, 0)))


def test_postgresql_in_another_time_zone_still_reads_utc(tmp_path):
    """A PostgreSQL server (or role) whose TimeZone is not UTC: timestamptz comes back in that zone
    unless the store converts it, and the models promise aware UTC on every backend."""
    with make_store("postgresql", tmp_path) as store:
        @event.listens_for(store.engine, "connect")
        def in_kolkata(dbapi_connection, record):
            dbapi_connection.execute("SET TIME ZONE 'Asia/Kolkata'")

        store.engine.dispose()  # new connections only
        with store.transaction() as db:
            db.add(make_org_row("org_a", datetime(2025, 3, 31, 20, 0, tzinfo=UTC)))
        with store.transaction() as db:
            created_at = db.get(Organization, "org_a").created_at
        assert created_at == datetime(2025, 3, 31, 20, 0, tzinfo=UTC)
        assert created_at.utcoffset() == timedelta(0), f"read back as {created_at.isoformat()}"
