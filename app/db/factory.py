"""The session factory as the layers above the database hold it: its type, and one migrated to head."""

from __future__ import annotations

from typing import TypeAlias

from sqlalchemy.orm import Session, sessionmaker

from app.db.session import make_session_factory, upgrade_database

SessionFactory: TypeAlias = sessionmaker[Session]


def migrated_session_factory(url: str) -> SessionFactory:
    """The metadata DB at ``url``, migrated to head first (idempotent: a fresh data dir needs no
    ``reco db upgrade``)."""
    upgrade_database(url)
    return make_session_factory(url)
