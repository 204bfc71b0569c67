"""The metadata side of lost vectors (:mod:`app.services.restore`): the items marked embedded, page by page."""

from __future__ import annotations

from sqlalchemy import select

from app.db.models import Embedding, Item
from app.db.repo import MetadataRepo
from app.schemas import EmbedStatus


def embedded_ids_after(repo: MetadataRepo, encoder_id: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` ids, in order and greater than ``after``, of the items marked embedded under
    ``encoder_id`` and not taken down."""
    stmt = (select(Embedding.item_id).join(Item, Item.id == Embedding.item_id)
            .where(Embedding.encoder_id == encoder_id, Embedding.status == EmbedStatus.EMBEDDED,
                   Item.deleted_at.is_(None), Embedding.item_id > after)
            .order_by(Embedding.item_id).limit(limit))
    with repo.session() as s:
        return list(s.scalars(stmt))
