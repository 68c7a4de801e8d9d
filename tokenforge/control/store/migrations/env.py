"""Alembic environment: runs on the connection that tokenforge.control.store.db hands over, or on
`sqlalchemy.url` when the alembic CLI is used by hand (developers: `alembic revision --autogenerate`)."""

from alembic import context
from sqlalchemy import create_engine, pool

from tokenforge.control.store.models import Base

config = context.config


def run_migrations(connection) -> None:
    # Batch mode lets ALTER TABLE work on SQLite (copy-and-move).
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    with create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool).connect() as conn:
        run_migrations(conn)
