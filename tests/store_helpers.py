"""Test stores on both backends: a SQLite file in a temp dir, or a fresh PostgreSQL database on the
local server (127.0.0.1:5432, user postgres, trust auth). PostgreSQL is never skipped: if it is not
reachable the test fails, loudly, in CI as anywhere."""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tokenforge.control.store.db import Store, open_store

BACKENDS = ("sqlite", "postgresql")
PG_ADMIN_DSN = os.environ.get("TOKENFORGE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


@contextmanager
def fresh_database_url(backend: str, tmp_dir: Path) -> Iterator[str]:
    """The URL of an empty database of `backend`, dropped afterwards (PostgreSQL)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_dir / 'control.db'}"
        return
    name = f"tf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def make_store(backend: str, tmp_dir: Path) -> Iterator[Store]:
    with fresh_database_url(backend, tmp_dir) as url:
        store = open_store(url)
        try:
            yield store
        finally:
            store.close()
