"""One collection of the embedded memory (:mod:`app.memory.edge`): :class:`EdgeMemory`, the ``VectorMemory``
of Qdrant Edge — writes in batches, reads by id and in pages, and searches (one query, a batch, distinct
images) with the layout's HNSW and quantization parameters."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from uuid import UUID

import numpy as np
import qdrant_edge as qe

from app.memory.base import (
    NIL_ID,
    Filters,
    ItemPayload,
    MemoryMatrices,
    MemoryRecord,
    MemoryStoreError,
    PagedPoints,
    SearchHit,
    StoredPoint,
    is_item_id,
    matrices_from_points,
    parse_filters,
    search_distinct,
    sorted_hits,
)
from app.memory.layout import MemoryLayout
from app.schemas import Modality

if TYPE_CHECKING:
    from app.memory.edge import EdgeStore


WRITE_BATCH = 1024  # points per Edge update call


def _edge_filter(filters: Filters | None, exclude_ids: Sequence[str] = ()) -> qe.Filter | None:
    must: list[Any] = []
    for cond in parse_filters(filters):
        if cond.key == "item_id":  # ids that are no UUID cannot be stored: they match nothing
            must.append(qe.HasIdCondition({v for v in cond.values if is_item_id(str(v))} or {NIL_ID}))
            continue
        match = (qe.MatchValue(cond.values[0]) if len(cond.values) == 1
                 else qe.MatchAny(list(cond.values)))  # type: ignore[arg-type]
        must.append(qe.FieldCondition(key=cond.key, match=match))
    ids: set[int | UUID | str] = {i for i in exclude_ids if is_item_id(i)}
    must_not: list[Any] = [qe.HasIdCondition(ids)] if ids else []
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


def _payload(raw: Any) -> ItemPayload | None:
    return ItemPayload.model_validate(raw) if raw else None


def _point(record: Any, with_vectors: bool) -> StoredPoint:
    vectors = record.vector if with_vectors else None
    return StoredPoint(
        item_id=str(record.id), payload=_payload(record.payload),
        image_vector=np.asarray(vectors["image"], np.float32) if vectors else None,
        text_vector=np.asarray(vectors["text"], np.float32) if vectors else None,
    )


class EdgeMemory(PagedPoints):
    """One Edge collection (or the alias in front of one): the ``VectorMemory`` of the embedded engine."""

    def __init__(self, store: EdgeStore, name: str, layout: MemoryLayout | None = None) -> None:
        self.store = store
        self.name = name
        self.layout = layout or store.layout

    def tuned(self, **search_changes: Any) -> EdgeMemory:
        """The same collection searched with other parameters (``hnsw_ef``, ``exact``, ``oversampling``)."""
        return EdgeMemory(self.store, self.name, replace(self.layout, **search_changes))

    @property
    def collection(self) -> str:
        return self.store.resolve(self.name)

    def _shard(self) -> qe.EdgeShard:
        return self.store.shard(self.collection)

    def exists(self) -> bool:
        return self.store.collection_exists(self.collection)

    def count(self, filters: Filters | None = None) -> int:
        if not self.exists():
            return 0
        return int(self._shard().count(qe.CountRequest(exact=True, filter=_edge_filter(filters))))

    # --- writes --------------------------------------------------------------------------------------
    def upsert(self, records: Sequence[MemoryRecord]) -> None:
        """Idempotent: item ids are derived from content, so a second write overwrites the first."""
        if not records:
            return
        shard = self._shard()
        self.store.ensure_space(f"writing {len(records)} points")
        for start in range(0, len(records), WRITE_BATCH):
            chunk = records[start: start + WRITE_BATCH]
            images = np.stack([r.image_vector for r in chunk]).astype(np.float32).tolist()
            texts = np.stack([r.text_vector for r in chunk]).astype(np.float32).tolist()
            points = [qe.Point(r.item_id, {"image": img, "text": txt}, r.payload.model_dump())
                      for r, img, txt in zip(chunk, images, texts, strict=True)]
            shard.update(qe.UpdateOperation.upsert_points(points))
        self.store.last_write = time.monotonic()

    def delete(self, item_ids: Sequence[str]) -> None:
        ids: list[int | UUID | str] = [i for i in item_ids if is_item_id(i)]
        if ids and self.exists():
            self.store.ensure_space(f"deleting {len(ids)} points")
            self._shard().update(qe.UpdateOperation.delete_points(ids))
            self.store.last_write = time.monotonic()

    # --- reads ---------------------------------------------------------------------------------------
    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        ids = [i for i in item_ids if is_item_id(i)]
        if not ids or not self.exists():
            return []
        records = self._shard().retrieve(point_ids=list(ids), with_payload=True, with_vector=with_vectors)
        return [_point(r, with_vectors) for r in records]

    def existing_ids(self, item_ids: Sequence[str]) -> set[str]:
        ids: list[int | UUID | str] = [i for i in item_ids if is_item_id(i)]
        if not ids or not self.exists():
            return set()
        return {str(r.id) for r in self._shard().retrieve(point_ids=ids, with_payload=False, with_vector=False)}

    def page(
        self, offset: str | None, limit: int, *, filters: Filters | None = None, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        if not self.exists():
            return [], None
        records, following = self._shard().scroll(qe.ScrollRequest(
            offset=offset, limit=limit, filter=_edge_filter(filters), with_payload=True, with_vector=with_vectors))
        return [_point(r, with_vectors) for r in records], None if following is None else str(following)

    def export_matrices(self, *, filters: Filters | None = None) -> MemoryMatrices:
        return matrices_from_points(self.scroll(filters=filters, limit=2048, with_vectors=True))

    # --- search --------------------------------------------------------------------------------------
    def _params(self) -> qe.SearchParams:
        lay = self.layout
        quantization = (qe.QuantizationSearchParams(rescore=True, oversampling=lay.oversampling)
                        if lay.int8 else None)
        return qe.SearchParams(hnsw_ef=lay.hnsw_ef, exact=lay.exact, quantization=quantization)

    def _request(self, vector: np.ndarray, modality: Modality, k: int, flt: qe.Filter | None,
                 score_threshold: float | None) -> qe.QueryRequest:
        query = qe.Query.Nearest(np.asarray(vector, np.float32).reshape(-1).tolist(), using=str(Modality(modality)))
        return qe.QueryRequest(query=query, limit=k, filter=flt, score_threshold=score_threshold,
                               with_payload=True, params=self._params())

    @staticmethod
    def _hits(points: Sequence[Any]) -> list[SearchHit]:
        return sorted_hits([SearchHit(str(p.id), float(p.score), _payload(p.payload)) for p in points])

    def search(
        self,
        vector: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
        score_threshold: float | None = None,
        distinct_images: bool = False,
    ) -> list[SearchHit]:
        """Top-k by cosine. ``distinct_images``: the best row per image (over-fetching until k images)."""
        if not self.exists():
            raise MemoryStoreError(f"the memory has no collection {self.collection!r}: ingest something first")
        flt = _edge_filter(filters, exclude_ids)
        shard = self._shard()
        if not distinct_images:
            return self._hits(shard.query(self._request(vector, modality, k, flt, score_threshold)))
        return search_distinct(
            lambda n: self._hits(shard.query(self._request(vector, modality, n, flt, score_threshold))), k)

    def search_batch(
        self,
        vectors: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[Sequence[str]] | None = None,
        score_threshold: float | None = None,
    ) -> list[list[SearchHit]]:
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        if exclude_ids is not None and len(exclude_ids) != len(vectors):
            raise ValueError(f"exclude_ids: one entry per query expected ({len(vectors)}), got {len(exclude_ids)}")
        if len(vectors) == 0:
            return []
        if not self.exists():
            raise MemoryStoreError(f"the memory has no collection {self.collection!r}: ingest something first")
        shared = _edge_filter(filters) if exclude_ids is None else None
        requests = [
            self._request(v, modality, k, shared if exclude_ids is None else _edge_filter(filters, exclude_ids[i]),
                          score_threshold)
            for i, v in enumerate(vectors)
        ]
        results = self._shard().query_batch(qe.QueryBatchRequest(requests))
        return [self._hits(points) for points in results]
