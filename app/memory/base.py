"""The memory's records, hits, filters and the one interface every backend serves.

Backends (``VectorMemory``): Qdrant Edge (embedded, :mod:`app.memory.edge`), a Qdrant server or
cluster (:mod:`app.memory.qdrant`) and the exact in-RAM index (:mod:`app.memory.exact`, training and
evaluation). A ``MemoryStore`` holds the collections of one location (one per embedding version) and the
alias that names the live one; :func:`app.memory.store.open_store` opens the store the settings name.
Every backend must return the same neighbours on the same memory (tests/congruence).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.memory.per_image import first_per_image
from app.schemas import Modality

# Fixed namespace: the same (image bytes, caption) gives the same item id on every machine.
ITEM_NAMESPACE = uuid.UUID("6f1c9a52-3c4b-4d8e-9f6a-2b7e1d0c5a93")

# Payload fields users filter on; every backend that can index gets a payload index on each.
FILTER_FIELDS: dict[str, str] = {
    "dataset": "keyword",
    "split": "keyword",
    "source": "keyword",
    "label": "integer",
    "image_hash": "keyword",
}
# Besides those: the item id, and a manifest's extra columns as ``extra.<column>``.
_EXTRA_FIELD = re.compile(r"^extra\.[A-Za-z0-9_][A-Za-z0-9_ -]{0,63}$")
FILTERABLE = (*FILTER_FIELDS, "item_id")
NIL_ID = "00000000-0000-0000-0000-000000000000"  # never an item id (those are UUIDv5): "match nothing"


class MemoryStoreError(RuntimeError):
    """The memory cannot be opened or used (held by another process, unknown collection, ...)."""


class MemoryHeldElsewhere(MemoryStoreError):
    """The embedded memory is open in another process (its one owner)."""


class UnknownFilterField(ValueError):
    """A filter names a field the memory does not have (an error, never silently 0 results)."""


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(image_sha256: str, caption: str) -> str:
    return hashlib.sha256(f"{image_sha256}\n{caption}".encode()).hexdigest()


def item_id_for(image_sha256: str, caption: str) -> str:
    """Deterministic item id: one image with five captions gives five items."""
    return str(uuid.uuid5(ITEM_NAMESPACE, content_hash(image_sha256, caption)))


def is_item_id(value: str) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


class ItemPayload(BaseModel):
    """What the store keeps beside the two vectors (and what search returns)."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    image_hash: str
    caption: str
    dataset: str | None = None
    split: str | None = None
    source: str | None = None
    label: int | None = None
    extra: dict[str, Any] = {}

    def value_of(self, key: str) -> Any:
        """A filterable field's value (``extra.<column>`` reads the manifest's extra columns)."""
        if key.startswith("extra."):
            return self.extra.get(key[len("extra."):])
        return getattr(self, key)


@dataclass(frozen=True)
class MemoryRecord:
    payload: ItemPayload
    image_vector: np.ndarray
    text_vector: np.ndarray

    @property
    def item_id(self) -> str:
        return self.payload.item_id


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    score: float
    payload: ItemPayload | None = None


@dataclass(frozen=True)
class StoredPoint:
    """One stored item as read back by id or by scrolling (vectors only when asked for)."""

    item_id: str
    payload: ItemPayload | None
    image_vector: np.ndarray | None = None
    text_vector: np.ndarray | None = None

    def vector(self, modality: Modality) -> np.ndarray:
        found = self.image_vector if Modality(modality) is Modality.IMAGE else self.text_vector
        if found is None:
            raise ValueError(f"point {self.item_id} was read without its {modality} vector")
        return found


@dataclass
class MemoryMatrices:
    """The whole memory as row-aligned arrays, for the exact index and for training."""

    ids: list[str]
    image: np.ndarray  # (n, d) float32, L2-normalised
    text: np.ndarray  # (n, d)
    image_hashes: list[str]
    payloads: list[ItemPayload] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


Filters = Mapping[str, str | int | Sequence[str | int]]


@dataclass(frozen=True)
class FieldMatch:
    """One validated filter condition: ``key`` equals one of ``values``."""

    key: str
    values: tuple[str | int | bool, ...]

    def accepts(self, payload: ItemPayload) -> bool:
        return payload.value_of(self.key) in self.values


def parse_filters(filters: Filters | None) -> list[FieldMatch]:
    """Filters as conditions every backend can translate; unknown fields are refused, never 0 results."""
    out: list[FieldMatch] = []
    for key, raw in (filters or {}).items():
        if key not in FILTERABLE and not _EXTRA_FIELD.match(key):
            raise UnknownFilterField(
                f"unknown filter field {key!r}: use one of {', '.join(FILTERABLE)}, or extra.<column> for a "
                "manifest's extra columns")
        values: list[Any] = list(raw) if isinstance(raw, list | tuple | set | frozenset) else [raw]
        if not values:
            raise ValueError(f"filter {key!r} has no values")
        if key == "label":
            try:
                values = [int(v) for v in values]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"filter label must be an integer, got {raw!r}") from exc
        elif key in FILTERABLE:
            values = [str(v) for v in values]
        for v in values:
            if not isinstance(v, str | int | bool):
                raise ValueError(f"filter {key!r}: values must be strings or integers, got {v!r}")
        out.append(FieldMatch(key, tuple(values)))
    return out


def sorted_hits(hits: Sequence[SearchHit]) -> list[SearchHit]:
    """Best first; equal scores by item id, so every backend orders ties the same way."""
    return sorted(hits, key=lambda h: (-h.score, h.item_id))


def image_of_hit(hit: SearchHit) -> str:
    """The image a hit shows: its payload's image hash (its own id when it has no payload)."""
    return hit.payload.image_hash if hit.payload is not None else hit.item_id


def distinct_images(hits: Sequence[SearchHit], k: int) -> list[SearchHit]:
    """The best hit of each image (one image may carry five captions), then the first ``k``."""
    return first_per_image(sorted_hits(hits), image_of_hit)[:k]


def search_distinct(search: Callable[[int], list[SearchHit]], k: int) -> list[SearchHit]:
    """k hits of distinct images: ``search(n)`` is asked for more rows until k images (or the end)."""
    fetch = k * 5
    while True:
        hits = search(fetch)
        kept = distinct_images(hits, k)
        if len(kept) >= k or len(hits) < fetch:
            return kept
        fetch *= 4


@runtime_checkable
class VectorMemory(Protocol):
    """One collection (one embedding version), or the alias in front of one. Every backend serves it."""

    @property
    def collection(self) -> str: ...

    def exists(self) -> bool: ...

    def count(self, filters: Filters | None = None) -> int: ...

    def upsert(self, records: Sequence[MemoryRecord]) -> None: ...

    def delete(self, item_ids: Sequence[str]) -> None: ...

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]: ...

    def existing_ids(self, item_ids: Sequence[str]) -> set[str]: ...

    def scroll(
        self, *, filters: Filters | None = None, limit: int = 256, with_vectors: bool = False
    ) -> Iterator[list[StoredPoint]]: ...

    def page(
        self, offset: str | None, limit: int, *, filters: Filters | None = None, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        """One page in id order from item id ``offset`` (None: the start); the next page's offset or None."""
        ...

    def export_matrices(self, *, filters: Filters | None = None) -> MemoryMatrices: ...

    def fetch_vectors(self, item_ids: Sequence[str], modality: Modality) -> np.ndarray: ...

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
    ) -> list[SearchHit]: ...

    def search_batch(
        self,
        vectors: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[Sequence[str]] | None = None,
        score_threshold: float | None = None,
    ) -> list[list[SearchHit]]: ...


class PagedPoints:
    """``scroll`` and ``fetch_vectors`` of an engine that pages and retrieves points by id (Qdrant Edge, a
    Qdrant server, reco serve's memory over HTTP): the same on each, so written once."""

    def page(
        self, offset: str | None, limit: int, *, filters: Filters | None = None, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        raise NotImplementedError

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        raise NotImplementedError

    def scroll(
        self, *, filters: Filters | None = None, limit: int = 256, with_vectors: bool = False
    ) -> Iterator[list[StoredPoint]]:
        """Pages of points in id order (export, re-embedding, the UI's browser)."""
        offset: str | None = None
        while True:
            points, offset = self.page(offset, limit, filters=filters, with_vectors=with_vectors)
            if points:
                yield points
            if offset is None:
                return

    def fetch_vectors(self, item_ids: Sequence[str], modality: Modality) -> np.ndarray:
        return vectors_of(self.retrieve(item_ids, with_vectors=True), item_ids, modality)


class MemoryStore(Protocol):
    """The collections of one location (an Edge folder, a Qdrant server) and the live alias."""

    @property
    def location(self) -> str: ...

    @property
    def backend(self) -> str: ...

    def collection(self, name: str) -> VectorMemory: ...

    def ensure_collection(self, name: str, dim: int) -> VectorMemory: ...

    def collection_exists(self, name: str) -> bool: ...

    def list_collections(self) -> list[str]: ...

    def live_collection(self, alias: str) -> str | None: ...

    def swap_alias(self, alias: str, collection: str) -> None: ...

    def drop_collection(self, name: str) -> None: ...

    def index_pending(self, *, force: bool = False, on_start: Callable[[str, int], None] | None = None) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


# --- helpers shared by the backends -----------------------------------------------------------------
def matrices_from_points(pages: Iterator[list[StoredPoint]], dim: int = 0) -> MemoryMatrices:
    ids: list[str] = []
    images: list[np.ndarray] = []
    texts: list[np.ndarray] = []
    payloads: list[ItemPayload] = []
    for page in pages:
        for p in page:
            assert p.payload is not None and p.image_vector is not None and p.text_vector is not None
            ids.append(p.item_id)
            images.append(np.asarray(p.image_vector, np.float32))
            texts.append(np.asarray(p.text_vector, np.float32))
            payloads.append(p.payload)
    dim = len(images[0]) if images else dim
    return MemoryMatrices(
        ids=ids,
        image=np.stack(images) if images else np.zeros((0, dim), np.float32),
        text=np.stack(texts) if texts else np.zeros((0, dim), np.float32),
        image_hashes=[p.image_hash for p in payloads],
        payloads=payloads,
    )


def vectors_of(points: Sequence[StoredPoint], item_ids: Sequence[str], modality: Modality) -> np.ndarray:
    """The ``modality`` vectors of ``item_ids`` in that order; KeyError names the ids not stored."""
    by_id = {p.item_id: p for p in points}
    missing = [i for i in item_ids if i not in by_id]
    if missing:
        raise KeyError(f"unknown item ids: {missing[:5]}")
    if not item_ids:
        return np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(by_id[i].vector(modality), np.float32) for i in item_ids])
