"""The memory on a Qdrant server or cluster, through qdrant-client (``RECO_QDRANT_URL``).

One collection per embedding version (encoder id), named vectors ``image`` and ``text`` (cosine),
payload indexes on the filter fields, and an alias (``memory`` by default) that points at the live
version. Every process may reach a server directly, so workers scale out over machines. The embedded
default is Qdrant Edge (:mod:`app.memory.edge`); both serve the same ``VectorMemory`` interface.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from app.memory.base import (
    FILTER_FIELDS,
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

log = logging.getLogger(__name__)

_SCHEMA = {"keyword": models.PayloadSchemaType.KEYWORD, "integer": models.PayloadSchemaType.INTEGER}


def build_filter(filters: Filters | None, exclude_ids: Sequence[str] = ()) -> models.Filter | None:
    """Filters go through Qdrant's filter models, never through string building."""
    must: list[Any] = []
    for cond in parse_filters(filters):
        if cond.key == "item_id":  # ids that are no UUID cannot be stored: they match nothing
            must.append(models.HasIdCondition(has_id=[v for v in cond.values if is_item_id(str(v))] or [NIL_ID]))
        elif len(cond.values) == 1:
            must.append(models.FieldCondition(key=cond.key, match=models.MatchValue(value=cond.values[0])))
        else:
            must.append(models.FieldCondition(key=cond.key, match=models.MatchAny(any=list(cond.values))))
    ids = [i for i in exclude_ids if is_item_id(i)]
    must_not: list[Any] = [models.HasIdCondition(has_id=ids)] if ids else []
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def _point(p: Any, with_vectors: bool) -> StoredPoint:
    vec = p.vector if with_vectors else None
    return StoredPoint(
        item_id=str(p.id), payload=ItemPayload.model_validate(p.payload) if p.payload else None,
        image_vector=np.asarray(vec["image"], np.float32) if vec else None,
        text_vector=np.asarray(vec["text"], np.float32) if vec else None)


class QdrantServerStore:
    """The collections and aliases of one Qdrant server (or cluster)."""

    backend = "qdrant-server"

    def __init__(self, client: QdrantClient, layout: MemoryLayout | None = None, *, location: str = "") -> None:
        self.client = client
        self.layout = layout or MemoryLayout()
        self._location = location

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, layout: MemoryLayout | None = None) -> QdrantServerStore:
        return cls(QdrantClient(url=url, api_key=api_key), layout, location=url)

    @property
    def location(self) -> str:
        return self._location

    def collection(self, name: str) -> QdrantMemory:
        return QdrantMemory(self, name)

    def collection_exists(self, name: str) -> bool:
        if self.client.collection_exists(name):
            return True
        return self.live_collection(name) is not None

    def ensure_collection(self, name: str, dim: int) -> QdrantMemory:
        if self.client.collection_exists(name):
            info = self.client.get_collection(name)
            vectors = info.config.params.vectors
            size = vectors["image"].size if isinstance(vectors, dict) else None
            if size != dim:
                raise MemoryStoreError(f"collection {name} holds {size}-d vectors, encoder gives {dim}")
            return self.collection(name)
        lay = self.layout
        params = models.VectorParams(size=dim, distance=models.Distance.COSINE, on_disk=lay.on_disk or None)
        quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True)) if lay.int8 else None
        self.client.create_collection(
            name, vectors_config={"image": params, "text": params}, shard_number=lay.shards,
            replication_factor=lay.replication, quantization_config=quantization,
            hnsw_config=models.HnswConfigDiff(m=lay.hnsw_m, ef_construct=lay.hnsw_ef_construct),
            on_disk_payload=lay.on_disk or None)
        for field, kind in FILTER_FIELDS.items():
            self.client.create_payload_index(name, field, _SCHEMA[kind])
        log.info("created collection %s (%d-d) on %s", name, dim, self._location)
        return self.collection(name)

    def list_collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def live_collection(self, alias: str) -> str | None:
        for a in self.client.get_aliases().aliases:
            if a.alias_name == alias:
                return str(a.collection_name)
        return None

    def swap_alias(self, alias: str, collection: str) -> None:
        """Point the alias at ``collection`` in one request (atomic on the server)."""
        ops: list[Any] = []
        if self.live_collection(alias) is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
        self.client.update_collection_aliases(change_aliases_operations=ops)

    def drop_collection(self, name: str) -> None:
        self.client.delete_collection(name)

    def index_pending(self, **_: Any) -> int:
        return 0  # a server indexes in its own background threads

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "url": self._location,
                "collections": {n: {"points": self.collection(n).count()} for n in self.list_collections()},
                "aliases": {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}}

    def close(self) -> None:
        self.client.close()


class QdrantMemory(PagedPoints):
    """One collection on a server (or the alias in front of one)."""

    def __init__(self, store: QdrantServerStore, name: str, layout: MemoryLayout | None = None) -> None:
        self.store = store
        self.client = store.client
        self.name = name
        self.layout = layout or store.layout

    def tuned(self, **search_changes: Any) -> QdrantMemory:
        return QdrantMemory(self.store, self.name, replace(self.layout, **search_changes))

    @property
    def collection(self) -> str:
        return self.store.live_collection(self.name) or self.name

    def exists(self) -> bool:
        return self.store.collection_exists(self.name)

    def count(self, filters: Filters | None = None) -> int:
        if not self.exists():
            return 0
        return self.client.count(self.name, count_filter=build_filter(filters), exact=True).count

    # --- writes -----------------------------------------------------------------------------
    def upsert(self, records: Sequence[MemoryRecord]) -> None:
        """Idempotent: item ids are derived from content, so a second write overwrites the first."""
        if not records:
            return
        points = [
            models.PointStruct(
                id=r.item_id,
                vector={"image": r.image_vector.astype(np.float32).tolist(),
                        "text": r.text_vector.astype(np.float32).tolist()},
                payload=r.payload.model_dump(),
            )
            for r in records
        ]
        self.client.upsert(self.name, points=points, wait=True)

    def delete(self, item_ids: Sequence[str]) -> None:
        ids = [i for i in item_ids if is_item_id(i)]
        if ids and self.exists():
            self.client.delete(self.name, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    # --- reads ------------------------------------------------------------------------------
    def _params(self) -> models.SearchParams:
        lay = self.layout
        quantization = (models.QuantizationSearchParams(rescore=True, oversampling=lay.oversampling)
                        if lay.int8 else None)
        return models.SearchParams(hnsw_ef=lay.hnsw_ef, exact=lay.exact, quantization=quantization)

    @staticmethod
    def _hits(points: Sequence[Any]) -> list[SearchHit]:
        return sorted_hits([SearchHit(str(p.id), float(p.score),
                                      ItemPayload.model_validate(p.payload) if p.payload else None) for p in points])

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
        """Top-k by cosine. ``distinct_images``: best row per image (one image may carry five captions)."""
        query = np.asarray(vector, np.float32).reshape(-1).tolist()
        flt = build_filter(filters, exclude_ids)

        def run(n: int) -> list[SearchHit]:
            result = self.client.query_points(
                self.name, query=query, using=str(Modality(modality)), limit=n, query_filter=flt,
                score_threshold=score_threshold, with_payload=True, search_params=self._params())
            return self._hits(result.points)

        return search_distinct(run, k) if distinct_images else run(k)

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
        requests = [
            models.QueryRequest(query=v.tolist(), using=str(Modality(modality)), limit=k,
                                filter=build_filter(filters, exclude_ids[i] if exclude_ids is not None else ()),
                                score_threshold=score_threshold, with_payload=True, params=self._params())
            for i, v in enumerate(vectors)
        ]
        responses = self.client.query_batch_points(self.name, requests=requests)
        return [self._hits(r.points) for r in responses]

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        ids = [i for i in item_ids if is_item_id(i)]
        if not ids:
            return []
        return [_point(p, with_vectors) for p in self.client.retrieve(self.name, ids=ids, with_vectors=with_vectors)]

    def existing_ids(self, item_ids: Sequence[str]) -> set[str]:
        ids = [i for i in item_ids if is_item_id(i)]
        if not ids or not self.exists():
            return set()
        return {str(p.id) for p in self.client.retrieve(self.name, ids=ids, with_payload=False)}

    def page(
        self, offset: str | None, limit: int, *, filters: Filters | None = None, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        if not self.exists():
            return [], None
        points, following = self.client.scroll(
            self.name, scroll_filter=build_filter(filters), limit=limit, offset=offset, with_payload=True,
            with_vectors=with_vectors)
        return [_point(p, with_vectors) for p in points], None if following is None else str(following)

    def export_matrices(self, *, filters: Filters | None = None) -> MemoryMatrices:
        return matrices_from_points(self.scroll(filters=filters, limit=2048, with_vectors=True))
