"""open_store(url): the SQLAlchemy engine of the control plane, migrated to the latest schema.

SQLite (the embedded default) runs in WAL mode with every transaction BEGIN IMMEDIATE, so writers
queue on the busy timeout instead of failing on a lock upgrade; PostgreSQL runs READ COMMITTED,
where the guarded UPDATEs of limits.py are atomic row by row.
"""

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tokenforge.control.errors import StoreUnavailableError

SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "tokenforge_read_only"  # execution option of Store.reading()


def dialect_of(db: Session) -> str:
    """"sqlite" or "postgresql"."""
    return db.get_bind().dialect.name


def dialect_insert(dialect: str, table):
    """INSERT of `dialect`, which knows ON CONFLICT. Statements on the request path are built once
    per dialect (functools.cache) with bind parameters: building one costs more than running it."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 (the driver we install), not psycopg2."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, record):
        # Let SQLAlchemy, not pysqlite, say when transactions begin (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed usage record survives a power cut
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        # Readers need no write lock: they see the last commit (WAL) and never block writers.
        read_only = connection.get_execution_options().get(READ_ONLY)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


class Store:
    """The database of one control plane: sessions in transactions, errors as StoreUnavailableError."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # SQLite has one writer at a time: the threads of this process queue on a lock, which wakes
        # the next one at once, instead of polling the file lock with sleeps (the busy timeout, still
        # what other processes wait on).
        self._writer_lock = threading.RLock() if self.dialect == "sqlite" else nullcontext()
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def transaction(self) -> AbstractContextManager[Session]:
        """A session in one transaction: committed on success, rolled back on error. A database that
        cannot be reached (or a statement it fails on operationally) raises StoreUnavailableError."""
        return self._write(self._sessions)

    def reading(self) -> AbstractContextManager[Session]:
        """A transaction that only reads (on SQLite it takes no write lock)."""
        return self._begin(self._readers)

    @contextmanager
    def _write(self, sessions: sessionmaker) -> Iterator[Session]:
        with self._writer_lock, self._begin(sessions) as session:
            yield session

    @contextmanager
    def _begin(self, sessions: sessionmaker) -> Iterator[Session]:
        try:
            with sessions.begin() as session:
                yield session
        except DBAPIError as exc:
            if exc.connection_invalidated or _is_operational(exc):
                raise StoreUnavailableError(f"the store is unavailable: {exc.orig}") from exc
            raise

    def close(self) -> None:
        self.engine.dispose()


def _is_operational(exc: DBAPIError) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError))


def migrate(engine: Engine) -> None:
    """Brings the schema to the latest Alembic revision (creates it on first start)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing to a user
    config = Config()
    config.set_main_option("script_location", str(resources.files("tokenforge.control.store") / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_store(url: str) -> Store:
    """The store at `url`, migrated; StoreUnavailableError when it cannot be reached."""
    engine = _make_engine(normalise_url(url))
    try:
        migrate(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise StoreUnavailableError(f"cannot open the store: {exc.orig}") from exc
    return Store(engine)
