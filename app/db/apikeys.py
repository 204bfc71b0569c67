"""API keys of ``reco serve``: made here, stored as SHA-256 only, compared in constant time.

A key reads ``reco_<prefix>_<secret>``; the prefix finds the row, the hash of the whole key is compared with
:func:`hmac.compare_digest`. Scopes: ``read`` (search, predict, browse), ``write`` (ingest, memory writes),
``admin`` (delete items, drop collections, keys).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import ApiKey

SCOPES = ("read", "write", "admin")
_LAST_USED_EVERY = timedelta(seconds=60)  # last_used_at is a hint: not one write per request


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    scopes: frozenset[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma-separated subset of {', '.join(SCOPES)}, got {text!r}")
    return scopes


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.prefix, frozenset(row.scopes.split(",")), row.created_at,
                   row.last_used_at, row.revoked_at is not None)


class ApiKeyRepo:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def create(self, name: str, scopes: str) -> tuple[str, KeyInfo]:
        """A new key: the plain text is returned once and never stored."""
        parsed = parse_scopes(scopes)
        prefix = secrets.token_hex(4)
        key = f"reco_{prefix}_{secrets.token_urlsafe(32)}"
        with self.session_factory.begin() as s:
            row = ApiKey(name=name[:128], prefix=prefix, key_hash=_hash(key),
                         scopes=",".join(sorted(parsed)))
            s.add(row)
            s.flush()
            return key, _info(row)

    def verify(self, key: str) -> KeyInfo | None:
        """The key's record when it is valid and not revoked; None otherwise (constant-time hash compare)."""
        parts = key.split("_")
        if len(parts) < 3 or parts[0] != "reco":
            return None
        digest = _hash(key)
        with self.session_factory() as s:
            candidates = list(s.scalars(select(ApiKey).where(ApiKey.prefix == parts[1])))
        found = None
        for row in candidates:  # compare against every candidate: the time does not tell which one matched
            if hmac.compare_digest(row.key_hash, digest) and row.revoked_at is None:
                found = row
        if found is None:
            return None
        now = datetime.now(UTC)
        last = found.last_used_at
        if last is None or now - (last if last.tzinfo else last.replace(tzinfo=UTC)) > _LAST_USED_EVERY:
            with self.session_factory.begin() as s:
                s.execute(update(ApiKey).where(ApiKey.id == found.id).values(last_used_at=now))
        return _info(found)

    def list(self) -> list[KeyInfo]:
        with self.session_factory() as s:
            return [_info(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.id))]

    def revoke(self, name_or_id: str) -> int:
        """Revoke keys by id, name or prefix; returns how many."""
        with self.session_factory.begin() as s:
            condition = ((ApiKey.id == int(name_or_id)) if name_or_id.isdigit()
                         else (ApiKey.name == name_or_id) | (ApiKey.prefix == name_or_id))
            result = s.execute(update(ApiKey).where(condition, ApiKey.revoked_at.is_(None))
                               .values(revoked_at=datetime.now(UTC)))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]
