"""Alembic environment: the URL comes from the caller (``reco db upgrade``) or RECO_DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from app.config import get_settings
from app.db.models import Base

config = context.config
target_metadata = Base.metadata
# Two first commands on an empty PostgreSQL database both run the migrations: one waits for the other on this
# advisory lock (held by the connection, released when it closes), then finds the schema at head.
MIGRATION_LOCK_KEY = 0x5245434F  # "RECO"


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section) or {}
    section["sqlalchemy.url"] = _url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()  # the lock is the session's: it outlives this transaction
        # batch mode: SQLite cannot ALTER most things, so Alembic rebuilds tables there.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
