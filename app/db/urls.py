"""Database URLs as they may be shown: never with the password that came in them."""

from __future__ import annotations

from sqlalchemy.engine import make_url


def hide_password(url: str) -> str:
    """``url`` with its password masked; an URL SQLAlchemy cannot parse raises its ``ArgumentError``."""
    return make_url(url).render_as_string(hide_password=True)
