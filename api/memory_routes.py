"""``/v1/memory``: the memory's own operations for processes that reach it through this server
(:class:`app.memory.remote.RemoteStore`: the CLI, the UI, the workers). Internal; documented in OpenAPI."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from api.auth import require
from app.memory.base import MemoryStore
from app.memory.wire import (
    AliasIn,
    CountIn,
    EnsureIn,
    HitWire,
    IdsIn,
    PointWire,
    ScrollIn,
    ScrollOut,
    SearchIn,
    SearchOut,
    UpsertIn,
    decode_vector,
)

router = APIRouter(prefix="/v1/memory", tags=["memory (internal)"])
READ, WRITE, ADMIN = Depends(require("read")), Depends(require("write")), Depends(require("admin"))


def _store(request: Request) -> MemoryStore:
    store: MemoryStore = request.app.state.service.store
    request.app.state.service.last_request = time.monotonic()  # the background indexer waits for quiet
    return store


@router.get("/collections", dependencies=[READ])
def collections(request: Request) -> dict[str, Any]:
    return {"collections": _store(request).list_collections()}


@router.get("/aliases/{alias}", dependencies=[READ])
def alias_target(alias: str, request: Request) -> dict[str, Any]:
    return {"alias": alias, "collection": _store(request).live_collection(alias)}


@router.get("/collections/{name}", dependencies=[READ])
def collection_exists(name: str, request: Request) -> dict[str, Any]:
    return {"exists": _store(request).collection(name).exists()}  # an alias counts when it points somewhere


@router.put("/collections/{name}", dependencies=[WRITE])
def ensure_collection(name: str, body: EnsureIn, request: Request) -> dict[str, Any]:
    _store(request).ensure_collection(name, body.dim)
    return {"collection": name, "dim": body.dim}


@router.delete("/collections/{name}", dependencies=[ADMIN])
def drop_collection(name: str, request: Request) -> dict[str, Any]:
    _store(request).drop_collection(name)
    return {"dropped": name}


@router.put("/aliases/{alias}", dependencies=[WRITE])
def swap_alias(alias: str, body: AliasIn, request: Request) -> dict[str, Any]:
    _store(request).swap_alias(alias, body.collection)
    return {"alias": alias, "collection": body.collection}


@router.post("/collections/{name}/count", dependencies=[READ])
def count(name: str, body: CountIn, request: Request) -> dict[str, Any]:
    return {"count": _store(request).collection(name).count(body.filters)}


@router.post("/collections/{name}/points", dependencies=[WRITE])
def upsert(name: str, body: UpsertIn, request: Request) -> dict[str, Any]:
    _store(request).collection(name).upsert([r.record() for r in body.records])
    return {"upserted": len(body.records)}


@router.post("/collections/{name}/points/delete", dependencies=[WRITE])
def delete(name: str, body: IdsIn, request: Request) -> dict[str, Any]:
    _store(request).collection(name).delete(body.ids)
    return {"deleted": len(body.ids)}


@router.post("/collections/{name}/points/retrieve", dependencies=[READ])
def retrieve(name: str, body: IdsIn, request: Request) -> dict[str, Any]:
    points = _store(request).collection(name).retrieve(body.ids, with_vectors=body.with_vectors)
    return {"points": [PointWire.of(p).model_dump() for p in points]}


@router.post("/collections/{name}/scroll", dependencies=[READ])
def scroll(name: str, body: ScrollIn, request: Request) -> ScrollOut:
    points, following = _store(request).collection(name).page(body.offset, body.limit, filters=body.filters,
                                                              with_vectors=body.with_vectors)
    return ScrollOut(points=[PointWire.of(p) for p in points], next_offset=following)


@router.post("/collections/{name}/search", dependencies=[READ])
def search(name: str, body: SearchIn, request: Request) -> SearchOut:
    memory = _store(request).collection(name)
    vectors = [decode_vector(v) for v in body.vectors]
    if body.distinct_images or len(vectors) == 1:
        results = [memory.search(v, body.modality, body.k, filters=body.filters,
                                 exclude_ids=body.exclude_ids[i] if body.exclude_ids else (),
                                 score_threshold=body.score_threshold, distinct_images=body.distinct_images)
                   for i, v in enumerate(vectors)]
    else:
        results = memory.search_batch(np.stack(vectors), body.modality, body.k, filters=body.filters,
                                      exclude_ids=body.exclude_ids, score_threshold=body.score_threshold)
    return SearchOut(hits=[[HitWire(item_id=h.item_id, score=h.score, payload=h.payload) for h in hits]
                           for hits in results])


@router.post("/index", dependencies=[WRITE])
def index(request: Request, body: dict[str, Any] | None = None) -> dict[str, Any]:
    force = bool((body or {}).get("force", False))
    return {"indexed_points": _store(request).index_pending(force=force)}


@router.get("/describe", dependencies=[READ])
def describe(request: Request) -> dict[str, Any]:
    return _store(request).describe()
