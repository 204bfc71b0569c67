"""The memory of a ``reco serve`` process, reached over HTTP: the same ``VectorMemory`` as in-process.

When a server owns the embedded memory, every other process opens this store instead (see
:func:`app.memory.store.open_store`): its collections, searches and writes are the server's engine's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import numpy as np

from app.memory.base import (
    Filters,
    MemoryMatrices,
    MemoryRecord,
    MemoryStoreError,
    PagedPoints,
    SearchHit,
    StoredPoint,
    matrices_from_points,
)
from app.memory.wire import (
    AliasIn,
    CountIn,
    EnsureIn,
    HitWire,
    IdsIn,
    PointWire,
    RecordWire,
    ScrollIn,
    ScrollOut,
    SearchIn,
    encode_vector,
)
from app.remote import HttpClient, ServerError
from app.schemas import Modality

UPSERT_BATCH = 512


def _filters(filters: Filters | None) -> dict[str, Any] | None:
    if not filters:
        return None
    return {k: list(v) if isinstance(v, list | tuple | set) else v for k, v in filters.items()}


class RemoteStore:
    backend = "reco-serve"

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    @property
    def location(self) -> str:
        return self.http.server.url

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self.http.json(method, f"/v1/memory{path}", **kwargs)
        except ServerError as exc:
            if exc.code in ("unknown_filter_field",):
                from app.memory.base import UnknownFilterField

                raise UnknownFilterField(exc.message) from exc
            if exc.status in (400, 422):
                raise ValueError(exc.message) from exc
            raise MemoryStoreError(f"reco serve at {self.location}: {exc}") from exc

    def collection(self, name: str) -> RemoteMemory:
        return RemoteMemory(self, name)

    def ensure_collection(self, name: str, dim: int) -> RemoteMemory:
        self._call("PUT", f"/collections/{quote(name, safe='')}", json=EnsureIn(dim=dim).model_dump())
        return self.collection(name)

    def collection_exists(self, name: str) -> bool:
        return bool(self._call("GET", f"/collections/{quote(name, safe='')}")["exists"])

    def list_collections(self) -> list[str]:
        return list(self._call("GET", "/collections")["collections"])

    def live_collection(self, alias: str) -> str | None:
        target = self._call("GET", f"/aliases/{quote(alias, safe='')}")["collection"]
        return str(target) if target else None

    def swap_alias(self, alias: str, collection: str) -> None:
        self._call("PUT", f"/aliases/{quote(alias, safe='')}", json=AliasIn(collection=collection).model_dump())

    def drop_collection(self, name: str) -> None:
        self._call("DELETE", f"/collections/{quote(name, safe='')}")

    def index_pending(self, *, force: bool = False, on_start: Callable[[str, int], None] | None = None) -> int:
        """The server indexes by itself when idle; ``force`` asks it to now."""
        if not force:
            return 0
        return int(self._call("POST", "/index", json={"force": True})["indexed_points"])

    def describe(self) -> dict[str, Any]:
        return dict(self._call("GET", "/describe")) | {"served_by": self.location}

    def close(self) -> None:
        self.http.close()


class RemoteMemory(PagedPoints):
    def __init__(self, store: RemoteStore, name: str) -> None:
        self.store = store
        self.name = name
        self._path = f"/collections/{quote(name, safe='')}"

    @property
    def collection(self) -> str:
        return self.store.live_collection(self.name) or self.name

    def exists(self) -> bool:
        return self.store.collection_exists(self.name)

    def count(self, filters: Filters | None = None) -> int:
        return int(self.store._call("POST", f"{self._path}/count", json=CountIn(filters=_filters(filters)).model_dump())
                   ["count"])

    def upsert(self, records: Sequence[MemoryRecord]) -> None:
        for start in range(0, len(records), UPSERT_BATCH):
            chunk = [RecordWire.of(r).model_dump() for r in records[start: start + UPSERT_BATCH]]
            self.store._call("POST", f"{self._path}/points", json={"records": chunk})

    def delete(self, item_ids: Sequence[str]) -> None:
        if item_ids:
            self.store._call("POST", f"{self._path}/points/delete", json=IdsIn(ids=list(item_ids)).model_dump())

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        if not item_ids:
            return []
        out = self.store._call("POST", f"{self._path}/points/retrieve",
                               json=IdsIn(ids=list(item_ids), with_vectors=with_vectors).model_dump())
        return [PointWire.model_validate(p).point() for p in out["points"]]

    def existing_ids(self, item_ids: Sequence[str]) -> set[str]:
        return {p.item_id for p in self.retrieve(item_ids)}

    def page(
        self, offset: str | None, limit: int, *, filters: Filters | None = None, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        page = ScrollOut.model_validate(self.store._call("POST", f"{self._path}/scroll", json=ScrollIn(
            filters=_filters(filters), offset=offset, limit=limit, with_vectors=with_vectors).model_dump()))
        return [p.point() for p in page.points], page.next_offset

    def export_matrices(self, *, filters: Filters | None = None) -> MemoryMatrices:
        return matrices_from_points(self.scroll(filters=filters, limit=2048, with_vectors=True))

    def _search(self, vectors: np.ndarray, modality: Modality, k: int, **kwargs: Any) -> list[list[SearchHit]]:
        body = SearchIn(vectors=[encode_vector(v) for v in np.atleast_2d(vectors)], modality=Modality(modality), k=k,
                        **kwargs)
        out = self.store._call("POST", f"{self._path}/search", json=body.model_dump(mode="json"))
        return [[HitWire.model_validate(h).hit() for h in hits] for hits in out["hits"]]

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
        return self._search(np.asarray(vector, np.float32).reshape(1, -1), modality, k, filters=_filters(filters),
                            exclude_ids=[list(exclude_ids)], score_threshold=score_threshold,
                            distinct_images=distinct_images)[0]

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
        if len(vectors) == 0:
            return []
        return self._search(vectors, modality, k, filters=_filters(filters),
                            exclude_ids=[list(e) for e in exclude_ids] if exclude_ids is not None else None,
                            score_threshold=score_threshold)
