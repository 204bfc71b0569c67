"""The item and embedding queries of re-embedding and re-admission (app.services.reembed, ingest_async).

An item is *done* under an encoder when its ``embeddings`` row there is ``embedded`` or ``failed``; it is
*waiting* for that encoder when it is embedded under another one and not done under this one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, select

from app.db.models import Embedding, EmbeddingVersion, FusionCheckpoint, Item
from app.db.repo import MetadataRepo
from app.schemas import EmbedStatus


def _done_under(encoder_id: str) -> Any:
    return exists().where(Embedding.item_id == Item.id, Embedding.encoder_id == encoder_id,
                          Embedding.status.in_([EmbedStatus.EMBEDDED, EmbedStatus.FAILED]))


def _embedded_elsewhere(encoder_id: str) -> Any:
    return exists().where(Embedding.item_id == Item.id, Embedding.encoder_id != encoder_id,
                          Embedding.status == EmbedStatus.EMBEDDED)


def items_waiting_for(repo: MetadataRepo, encoder_id: str, limit: int) -> list[Item]:
    """Items (not taken down) embedded under another version and not yet done under ``encoder_id``, id order."""
    stmt = (select(Item).where(and_(_embedded_elsewhere(encoder_id), ~_done_under(encoder_id),
                                    Item.deleted_at.is_(None)))
            .order_by(Item.id).limit(limit))
    with repo.session() as s:
        return list(s.scalars(stmt))


def count_waiting_for(repo: MetadataRepo, encoder_id: str) -> int:
    """How many items wait for ``encoder_id`` (taken-down ones included, as the progress always counted)."""
    with repo.session() as s:
        return int(s.scalar(select(func.count()).select_from(Item)
                            .where(and_(_embedded_elsewhere(encoder_id), ~_done_under(encoder_id)))) or 0)


def status_counts_of(repo: MetadataRepo, encoder_id: str) -> dict[str, int]:
    """{status: rows} under one encoder."""
    with repo.session() as s:
        return {str(k): int(v) for k, v in s.execute(
            select(Embedding.status, func.count()).where(Embedding.encoder_id == encoder_id)
            .group_by(Embedding.status)).all()}


def version_of(repo: MetadataRepo, encoder_id: str) -> EmbeddingVersion | None:
    with repo.session() as s:
        return s.get(EmbeddingVersion, encoder_id)


def count_embedded(repo: MetadataRepo, encoder_id: str) -> int:
    with repo.session() as s:
        return int(s.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.encoder_id == encoder_id, Embedding.status == EmbedStatus.EMBEDDED)) or 0)


def latest_checkpoint(repo: MetadataRepo, encoder_id: str) -> FusionCheckpoint | None:
    """The newest fusion checkpoint trained for ``encoder_id``."""
    with repo.session() as s:
        return s.scalars(select(FusionCheckpoint).where(FusionCheckpoint.encoder_id == encoder_id)
                         .order_by(FusionCheckpoint.created_at.desc(), FusionCheckpoint.id.desc()).limit(1)).first()


def pending_since_before(repo: MetadataRepo, encoder_id: str, ceiling: datetime, limit: int) -> list[Item]:
    """Items pending under ``encoder_id`` whose status has not changed since before ``ceiling``, id order."""
    stmt = (select(Item).join(Embedding, Embedding.item_id == Item.id)
            .where(Embedding.encoder_id == encoder_id, Embedding.status == EmbedStatus.PENDING,
                   Embedding.updated_at < ceiling).order_by(Item.id).limit(limit))
    with repo.session() as s:
        return list(s.scalars(stmt))
