"""The vector memory over qdrant-client: the same code for local mode and a server URL.

One collection per embedding version (encoder id), named vectors ``image`` and ``text`` (cosine),
and an alias (``memory`` by default) that points at the live version.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qdrant_client import QdrantClient, models

from app.encoder.openclip import collection_name_for
from app.memory.base import (
    FILTER_FIELDS,
    Filters,
    ItemPayload,
    MemoryMatrices,
    MemoryRecord,
    SearchHit,
)
from app.schemas import Modality

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_SCHEMA = {"keyword": models.PayloadSchemaType.KEYWORD, "integer": models.PayloadSchemaType.INTEGER}
_clients: dict[tuple[str | None, str | None], QdrantClient] = {}
_clients_lock = threading.Lock()


class MemoryStoreError(RuntimeError):
    """The memory cannot be opened or used (locked local store, unknown collection...)."""


def get_qdrant_client(settings: Settings) -> QdrantClient:
    """One client per location per process: a local store may be opened only once."""
    key = (settings.qdrant_url, settings.resolved_qdrant_path)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if not _clients:
                atexit.register(close_qdrant_clients)  # close before interpreter teardown, not in __del__
            client = _open_client(settings)
            _clients[key] = client
        return client


def _open_client(settings: Settings) -> QdrantClient:
    if settings.qdrant_url:
        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return QdrantClient(url=settings.qdrant_url, api_key=api_key)
    path = settings.resolved_qdrant_path
    if path == ":memory:":
        return QdrantClient(location=":memory:")
    settings.ensure_dirs()
    try:
        return QdrantClient(path=path)
    except RuntimeError as exc:  # portalocker: another process holds the local store
        raise MemoryStoreError(
            f"the local Qdrant store {path} is already open in another process ({exc}). Local mode is "
            "single-process: stop the other process, or run a Qdrant server and set RECO_QDRANT_URL."
        ) from exc


def close_qdrant_clients() -> None:
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def build_filter(filters: Filters | None, exclude_ids: Sequence[str] = ()) -> models.Filter | None:
    """Filters go through Qdrant's filter models, never through string building."""
    must: list[Any] = []
    for key, value in (filters or {}).items():
        if not _FIELD_NAME.match(key):
            raise ValueError(f"invalid filter field {key!r}")
        if isinstance(value, list | tuple | set):
            must.append(models.FieldCondition(key=key, match=models.MatchAny(any=list(value))))
        else:
            must.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
    must_not: list[Any] = [models.HasIdCondition(has_id=list(exclude_ids))] if exclude_ids else []
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


@dataclass(frozen=True)
class CollectionLayout:
    """How a new collection is laid out on a server or cluster (local mode accepts and ignores it)."""

    shards: int | None = None
    replication: int | None = None
    int8: bool = False  # scalar quantization: 1 byte a dimension in RAM, originals rescored
    on_disk: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CollectionLayout:
        return cls(settings.qdrant_shard_number, settings.qdrant_replication_factor,
                   settings.qdrant_quantization == "int8", settings.qdrant_on_disk)


class QdrantMemory:
    """One collection (or the alias in front of one)."""

    def __init__(self, client: QdrantClient, collection: str) -> None:
        self.client = client
        self.collection = collection

    @classmethod
    def for_encoder(
        cls, settings: Settings, encoder_id: str, dim: int, *, client: QdrantClient | None = None
    ) -> QdrantMemory:
        """The collection of one embedding version, created on first use."""
        memory = cls(client or get_qdrant_client(settings), collection_name_for(encoder_id))
        memory.ensure(dim, CollectionLayout.from_settings(settings))
        return memory

    @classmethod
    def live(cls, settings: Settings, *, client: QdrantClient | None = None) -> QdrantMemory:
        return cls(client or get_qdrant_client(settings), settings.memory_alias)

    # --- collection ---------------------------------------------------------------------------
    def exists(self) -> bool:
        if self.client.collection_exists(self.collection):
            return True
        return any(a.alias_name == self.collection for a in self.client.get_aliases().aliases)

    def ensure(self, dim: int, layout: CollectionLayout | None = None) -> None:
        if self.client.collection_exists(self.collection):
            info = self.client.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = vectors["image"].size if isinstance(vectors, dict) else None
            if size != dim:
                raise MemoryStoreError(f"collection {self.collection} holds {size}-d vectors, encoder gives {dim}")
            return
        layout = layout or CollectionLayout()
        params = models.VectorParams(size=dim, distance=models.Distance.COSINE, on_disk=layout.on_disk or None)
        quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True)) if layout.int8 else None
        self.client.create_collection(
            self.collection, vectors_config={"image": params, "text": params}, shard_number=layout.shards,
            replication_factor=layout.replication, quantization_config=quantization,
            on_disk_payload=layout.on_disk or None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # local mode: indexes are a no-op, says so
            for name, kind in FILTER_FIELDS.items():
                self.client.create_payload_index(self.collection, name, _SCHEMA[kind])
        log.info("created collection %s (%d-d)", self.collection, dim)

    def count(self, filters: Filters | None = None) -> int:
        return self.client.count(self.collection, count_filter=build_filter(filters), exact=True).count

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
        self.client.upsert(self.collection, points=points, wait=True)

    def delete(self, item_ids: Sequence[str]) -> None:
        if item_ids:
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=list(item_ids)))

    # --- reads ------------------------------------------------------------------------------
    def search(
        self,
        vector: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
        with_payload: bool = True,
        distinct_images: bool = False,
    ) -> list[SearchHit]:
        """Top-k by cosine. ``distinct_images``: best row per image (one image may carry five captions)."""
        query = np.asarray(vector, np.float32).tolist()
        flt = build_filter(filters, exclude_ids)
        if distinct_images:
            groups = self.client.query_points_groups(
                self.collection, query=query, using=str(modality), group_by="image_hash", limit=k,
                group_size=1, query_filter=flt, with_payload=with_payload)
            return [self._hit(g.hits[0]) for g in groups.groups if g.hits]
        result = self.client.query_points(
            self.collection, query=query, using=str(modality), limit=k, query_filter=flt,
            with_payload=with_payload)
        return [self._hit(p) for p in result.points]

    def search_batch(
        self, vectors: np.ndarray, modality: Modality, k: int, *, filters: Filters | None = None
    ) -> list[list[SearchHit]]:
        flt = build_filter(filters)
        requests = [
            models.QueryRequest(query=v.astype(np.float32).tolist(), using=str(modality), limit=k,
                                filter=flt, with_payload=True)
            for v in np.asarray(vectors)
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[self._hit(p) for p in r.points] for r in responses]

    @staticmethod
    def _hit(point: Any) -> SearchHit:
        payload = ItemPayload.model_validate(point.payload) if point.payload else None
        return SearchHit(item_id=str(point.id), score=float(point.score), payload=payload)

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[Any]:
        return list(self.client.retrieve(self.collection, ids=list(item_ids), with_vectors=with_vectors))

    def existing_ids(self, item_ids: Sequence[str]) -> set[str]:
        if not item_ids:
            return set()
        return {str(p.id) for p in self.client.retrieve(self.collection, ids=list(item_ids))}

    def scroll(
        self, *, filters: Filters | None = None, limit: int = 256, with_vectors: bool = False
    ) -> Iterable[list[Any]]:
        """Pages of points in id order (for export, re-embedding and the UI's browser)."""
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection, scroll_filter=build_filter(filters), limit=limit, offset=offset,
                with_payload=True, with_vectors=with_vectors,
            )
            if points:
                yield points
            if offset is None:
                return

    def export_matrices(self, *, filters: Filters | None = None, page: int = 2048) -> MemoryMatrices:
        ids: list[str] = []
        images: list[np.ndarray] = []
        texts: list[np.ndarray] = []
        payloads: list[ItemPayload] = []
        for points in self.scroll(filters=filters, limit=page, with_vectors=True):
            for p in points:
                ids.append(str(p.id))
                vec = p.vector
                images.append(np.asarray(vec["image"], np.float32))
                texts.append(np.asarray(vec["text"], np.float32))
                payloads.append(ItemPayload.model_validate(p.payload))
        dim = len(images[0]) if images else 0
        return MemoryMatrices(
            ids=ids,
            image=np.stack(images) if images else np.zeros((0, dim), np.float32),
            text=np.stack(texts) if texts else np.zeros((0, dim), np.float32),
            image_hashes=[p.image_hash for p in payloads],
            payloads=payloads,
        )


# --- versions and the alias ------------------------------------------------------------------
def live_collection(client: QdrantClient, alias: str) -> str | None:
    for a in client.get_aliases().aliases:
        if a.alias_name == alias:
            return str(a.collection_name)
    return None


def swap_alias(client: QdrantClient, alias: str, collection: str) -> None:
    """Point the alias at ``collection`` in one request (atomic on the server)."""
    ops: list[Any] = []
    if live_collection(client, alias) is not None:
        ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
    ops.append(models.CreateAliasOperation(
        create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
    client.update_collection_aliases(change_aliases_operations=ops)


def list_collections(client: QdrantClient) -> list[str]:
    return sorted(c.name for c in client.get_collections().collections)


def drop_collection(client: QdrantClient, collection: str) -> None:
    client.delete_collection(collection)
