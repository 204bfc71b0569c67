"""Lost vectors: items the metadata calls *embedded* whose vectors the memory no longer has, and their repair.

A vector store removed or replaced (a new Qdrant over the same metadata, a damaged collection moved away)
leaves metadata that says *embedded* beside a collection without those points. :func:`missing_vector_ids`
finds exactly those items (all of them, page by page); :func:`restore_lost_vectors` (``reco memory
reconcile``) re-embeds exactly those from their source files — each must still hash to the item's
``image_hash`` — into the live version's collection. Ingestion never counts such an item as a duplicate
(:meth:`app.services.ingest.IngestService._admit`), and ``reco status`` reports how many there are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.db.repo import MetadataRepo
from app.db.restore_queries import embedded_ids_after

if TYPE_CHECKING:
    from app.config import Settings
    from app.encoder import Encoder
    from app.memory.base import MemoryStore, VectorMemory

log = logging.getLogger(__name__)

PAGE = 5_000


def missing_vector_ids(repo: MetadataRepo, memory: VectorMemory, encoder_id: str) -> list[str]:
    """Ids the metadata marks embedded under ``encoder_id`` (not taken down) whose vectors ``memory`` lacks."""
    missing: list[str] = []
    after = ""
    while True:
        ids = embedded_ids_after(repo, encoder_id, after, PAGE)
        if not ids:
            return missing
        present = memory.existing_ids(ids) if _collection_exists(memory) else set()
        missing.extend(i for i in ids if i not in present)
        after = ids[-1]


def _collection_exists(memory: VectorMemory) -> bool:
    try:
        memory.count()
    except Exception:  # noqa: BLE001 - a collection that is gone holds nothing
        return False
    return True


def live_encoder(settings: Settings, repo: MetadataRepo) -> Encoder:
    """The encoder of the live version (not necessarily the configured one), else the configured one."""
    from app.encoder import create_encoder
    from app.encoder_identity import EncoderId
    from app.services.reembed import encoder_for, live_version

    live = live_version(repo)
    configured = create_encoder(settings)
    if live is None or live.encoder_id == configured.encoder_id:
        return configured
    return encoder_for(settings, EncoderId.of_version(live))


def restore_lost_vectors(
    settings: Settings, *, encoder: Encoder | None = None, repo: MetadataRepo | None = None,
    store: MemoryStore | None = None, on_batch: Callable[[int, int], None] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Re-embed exactly the items whose vectors are missing; ``{missing, restored, failed, encoder_id}``."""
    from app.services.reembed import ReembedService

    repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
    service = ReembedService(settings, encoder or live_encoder(settings, repo), repo=repo, store=store)
    lost = missing_vector_ids(repo, service.memory, service.encoder_id)
    out: dict[str, Any] = {"encoder_id": service.encoder_id, "collection": service.memory.collection,
                           "missing": len(lost), "restored": 0, "failed": 0}
    if dry_run or not lost:
        return out
    log.warning("%d items marked embedded have no vectors in %s: re-embedding them", len(lost),
                service.memory.collection)
    size = max(1, settings.reembed_batch_size)
    for start in range(0, len(lost), size):
        items = repo.get_items(lost[start:start + size])
        done = service.embed_items(items)
        out["restored"] += done
        out["failed"] += len(items) - done
        if on_batch is not None:
            on_batch(done, len(items))
    if service.store.live_collection(settings.memory_alias) is None:
        service.store.swap_alias(settings.memory_alias, service.memory.collection)  # a store that lost its alias
    return out
