"""The control plane's store: SQLAlchemy models, Alembic migrations, and open_store()."""
