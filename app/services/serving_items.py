"""Items in the serving service: the memory's map, reading and browsing items, an item's image and its
neighbours, and takedown."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast

from app.imaging import ImageRejected, open_image_safely, read_image_file
from app.schemas import Modality
from app.services.memory_map import MapQuery, MemoryMap, memory_map
from app.services.serving_live import ServingBase
from app.services.serving_models import (
    DeleteOut,
    EmbeddingOut,
    ItemDetail,
    ItemsPage,
    NeighbourOut,
    item_out,
    neighbour_of,
)

log = logging.getLogger("app.services.serving")  # the service logs under one name, whichever part


class ItemServing(ServingBase):
    """The memory's items (see :class:`app.services.serving.ServingService`)."""

    # --- the memory's map -------------------------------------------------------------------------------------
    def memory_map(self, query: MapQuery, image_bytes: bytes | None = None) -> MemoryMap:
        """A 2-D PCA map of the image vectors (one point per image) with class names; an item or an uploaded
        image marked as the query, with its nearest images."""
        self.last_request = time.monotonic()
        live = self.live()
        if live.memory is None:
            raise LookupError("the memory is empty: ingest something first (reco ingest SOURCE)")
        vector = None
        if image_bytes is not None:
            vector = live.encoder.encode_images([open_image_safely(image_bytes, self.limits)])[0]
        answer = memory_map(live.memory, query, query_vector=vector)
        named = self._named([NeighbourOut(item_id=p.item_id, caption=p.caption, score=0.0, dataset=p.dataset,
                                          label=p.label) for p in answer.points])
        for point, n in zip(answer.points, named, strict=True):
            point.label_name = n.label_name
        if answer.query is not None and answer.query.label is not None:
            answer.query.label_name = self._named([NeighbourOut(item_id="q", score=0.0, dataset=answer.query.dataset,
                                                                label=answer.query.label)])[0].label_name
        return answer

    # --- items ---------------------------------------------------------------------------------------------
    def list_items(self, *, filters: dict[str, Any] | None = None, offset: int = 0, limit: int = 50,
                   caption_contains: str | None = None) -> ItemsPage:
        rows, total = self.repo.list_items(filters=filters, offset=offset, limit=limit,
                                           caption_contains=caption_contains)
        return ItemsPage(items=[item_out(r) for r in rows], total=total, offset=offset, limit=limit)

    def get_item(self, item_id: str) -> ItemDetail:
        found = self.repo.get_items([item_id])
        if not found or found[0].deleted_at is not None:
            raise LookupError(f"no item {item_id}")
        item = found[0]
        versions = {v.encoder_id: v for v in self.repo.versions()}
        embeddings = [EmbeddingOut(encoder_id=e.encoder_id,
                                   collection=versions[e.encoder_id].collection if e.encoder_id in versions else None,
                                   live=bool(e.encoder_id in versions and versions[e.encoder_id].is_live),
                                   status=e.status, reason=e.reason, detail=e.detail, attempts=e.attempts,
                                   updated_at=e.updated_at) for e in self.repo.item_embeddings(item_id)]
        memory = self.live().memory
        in_memory = bool(memory is not None and memory.existing_ids([item_id]))
        return cast(ItemDetail, item_out(item, ItemDetail, embeddings=embeddings, in_memory=in_memory))

    def item_image(self, item_id: str) -> tuple[bytes, str]:
        """The item's image bytes (read from its source, checked against its hash) and a media type."""
        import hashlib

        found = self.repo.get_items([item_id])
        if not found or found[0].deleted_at is not None:
            raise LookupError(f"no item {item_id}")
        item = found[0]
        path = Path(item.source_uri)
        if not path.is_file():
            raise LookupError(f"the image of item {item_id} is no longer at {item.source_uri}")

        try:
            data = read_image_file(path, self.settings.max_image_bytes)
        except ImageRejected as exc:
            raise LookupError(f"the image of item {item_id} cannot be read: {exc.detail}") from exc
        if hashlib.sha256(data).hexdigest() != item.image_hash:
            raise LookupError(f"the image of item {item_id} changed since it was ingested")
        import io

        from PIL import Image

        open_image_safely(data, self.limits)  # the same checks as ingestion before anything is served
        with Image.open(io.BytesIO(data)) as header:  # the format from the header only
            media = Image.MIME.get((header.format or "").upper(), "application/octet-stream")
        return data, media

    def neighbours_of_item(self, item_id: str, k: int | None = None) -> list[NeighbourOut]:
        """The item's own neighbours in the live memory (image->image, other images only); with a fusion
        checkpoint, the attention the fusion gives each when it refines this item's image (k' as configured,
        unless ``k`` says otherwise)."""
        live = self.live()
        memory = live.memory
        if memory is None:
            return []
        points = memory.retrieve([item_id], with_vectors=True)
        if not points:
            return []
        own = points[0].payload.image_hash if points[0].payload else None
        vector = points[0].vector(Modality.IMAGE)
        others = [p.item_id for p in (memory.search(vector, Modality.IMAGE, 20, filters={"image_hash": own})
                                      if own else [])]  # its other captions: the same image
        if live.refiner is not None:
            refined = live.refiner.with_k(k).refine_image(vector, exclude_ids=tuple({item_id, *others}))
            return self._with_metadata([NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score,
                                                     attention=n.attention, image_hash=n.image_hash)
                                        for n in refined.neighbours])
        n = k or self.settings.k_infer
        hits = memory.search(vector, Modality.IMAGE, n, exclude_ids=[item_id, *others], distinct_images=True)
        return self._named([neighbour_of(h) for h in hits][:n])

    def delete_item(self, item_id: str, reason: str) -> DeleteOut:
        """Takedown: vectors removed from every collection, the row marked deleted (time, reason), caches
        that may hold it dropped; ingesting the same content again is refused."""
        reason = reason.strip() or "deleted"
        found = self.repo.get_items([item_id])
        if not found:
            raise LookupError(f"no item {item_id}")
        removed = []
        for name in self.store.list_collections():
            memory = self.store.collection(name)
            if memory.existing_ids([item_id]):
                memory.delete([item_id])
                removed.append(name)
        item = self.repo.mark_deleted(item_id, reason)
        assert item is not None and item.deleted_at is not None
        self.class_cache.clear()  # refined class embeddings may have used it (their key has the memory size too)
        with self._lock:
            self._checked_at = 0.0
        log.warning("item %s taken down (%s): vectors removed from %s", item_id, reason, removed or "no collection")
        return DeleteOut(id=item_id, deleted_at=item.deleted_at, reason=item.deleted_reason or reason,
                         vectors_removed_from=removed)
