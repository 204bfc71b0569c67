"""The embedded memory: Qdrant's own engine in this process (Qdrant Edge, PyPI ``qdrant-edge-py``).

Layout of a store folder (default ``<data dir>/memory``)::

    OWNER                 lock file: the process that has the store open (pid, command)
    aliases.json          alias -> collection (the live version), replaced atomically
    collections/<name>/   one Edge shard per embedding version (segments, HNSW, WAL, payload indexes)
    collections/<name>.json  its vector size and the layout it was created with

One process opens a store (Edge keeps a write-ahead log per shard and locks it). That process owns the
memory; on one machine everything else reaches it through ``reco serve``.

Indexing. Edge builds HNSW only when asked (:meth:`EdgeShard.optimize`), and the call holds the
interpreter until it is done (the binding does not release the GIL). New points are searched exactly
(brute force over the unindexed segment: a few ms at 20k points) until ``indexing_threshold`` of them
have piled up; then the owner indexes them — at the end of a CLI ingestion, or when a long-lived owner
(``reco serve``, a worker) has been idle for a moment (:class:`app.memory.indexer.BackgroundIndexer`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import qdrant_edge as qe

from app.memory.base import (
    FILTER_FIELDS,
    NIL_ID,
    Filters,
    ItemPayload,
    MemoryHeldElsewhere,
    MemoryMatrices,
    MemoryRecord,
    MemoryStoreError,
    SearchHit,
    StoredPoint,
    is_item_id,
    matrices_from_points,
    parse_filters,
    search_distinct,
    sorted_hits,
    vectors_of,
)
from app.memory.layout import MemoryLayout
from app.schemas import Modality

log = logging.getLogger(__name__)

STORE_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
_SCHEMA = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer}
VECTOR_NAMES = ("image", "text")
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


class _OwnerLock:
    """An exclusive lock on the store folder, held for the life of the process that opened it.

    Edge locks each shard's WAL too; this lock also covers ``aliases.json`` and says *who* holds the store.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "OWNER"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(self._fd)
            who = f"process {holder.get('pid')} ({holder.get('command', '?')})" if holder else "another process"
            raise MemoryHeldElsewhere(
                f"the memory at {root} is open in {who}. An embedded memory has one owner: start `reco serve` "
                "once and let every other command, the UI and the workers go through it, or stop that process."
            ) from None
        info = {"pid": os.getpid(), "command": " ".join(sys.argv)[:300], "since": time.time()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def holder(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_text() or "{}"))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = -1


class EdgeStore:
    """The collections of one Edge folder, opened lazily, and the alias file."""

    backend = "edge"

    def __init__(self, root: Path | str, layout: MemoryLayout | None = None, *, temporary: bool = False) -> None:
        self.root = Path(root)
        self.layout = layout or MemoryLayout()
        self.temporary = temporary
        try:
            (self.root / "collections").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MemoryStoreError(f"cannot create the memory folder {self.root}: {exc.strerror or exc}") from exc
        self._owner = _OwnerLock(self.root)
        self._shards: dict[str, qe.EdgeShard] = {}
        self._lock = threading.RLock()
        self._closed = False
        self.last_write = 0.0  # monotonic time of the last write (the background indexer waits for quiet)

    @property
    def location(self) -> str:
        return str(self.root)

    def ensure_space(self, what: str) -> None:
        """Refuse a write (ENOSPC) while the disk is nearly full: Edge maps its WAL segments and vector files
        into memory, and growing a mapping on a full disk kills the process with SIGBUS instead of an error."""
        free = shutil.disk_usage(self.root).free
        if free < self.layout.min_free_mb * 1024 * 1024:
            raise OSError(errno.ENOSPC, f"the memory's disk is full: {free / 2**20:.0f} MB free at {self.root}, the "
                          f"engine writes only with {self.layout.min_free_mb} MB free (RECO_MEMORY_MIN_FREE_MB); "
                          f"{what} refused — free some space and retry")

    # --- collections -------------------------------------------------------------------------------
    def _folder(self, name: str) -> Path:
        if not _NAME.match(name):
            raise MemoryStoreError(f"invalid collection name {name!r}")
        return self.root / "collections" / name

    def _meta(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.root / "collections" / f"{name}.json").read_text()))
        except FileNotFoundError:
            return {}

    def collection_exists(self, name: str) -> bool:
        return (self._folder(name) / "wal").exists() or self._meta(name) != {}

    def list_collections(self) -> list[str]:
        folder = self.root / "collections"
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name))

    def shard(self, name: str) -> qe.EdgeShard:
        """The open shard of ``name`` (opened on first use)."""
        with self._lock:
            if self._closed:
                raise MemoryStoreError(f"the memory at {self.root} was closed")
            shard = self._shards.get(name)
            if shard is None:
                if not self.collection_exists(name):
                    raise MemoryStoreError(f"no collection {name!r} in the memory at {self.root}")
                self.ensure_space(f"opening collection {name}")  # opening may start a new WAL segment
                try:
                    shard = qe.EdgeShard.load(str(self._folder(name)))
                except Exception as exc:  # the binding raises plain Exception with the engine's message
                    if "WouldBlock" in str(exc):
                        raise MemoryHeldElsewhere(
                            f"cannot open collection {name} at {self._folder(name)}: {exc}") from exc
                    engine = " ".join(str(exc).split())
                    raise MemoryStoreError(
                        f"the memory collection {name} is damaged and cannot be opened: move "
                        f"{self._folder(name)} away (or restore a backup), then run `reco memory reconcile` to "
                        f"re-embed its items from the metadata (engine: {engine[:240]})") from exc
                self._shards[name] = shard
            return shard

    def ensure_collection(self, name: str, dim: int) -> EdgeMemory:
        with self._lock:
            meta = self._meta(name)
            if meta:
                if int(meta["dim"]) != dim:
                    raise MemoryStoreError(f"collection {name} holds {meta['dim']}-d vectors, encoder gives {dim}")
                return self.collection(name)
            self._create(name, dim)
            return self.collection(name)

    def _create(self, name: str, dim: int) -> None:
        lay = self.layout
        memory = qe.Memory.Cold if lay.on_disk else None
        quantization = (qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
                        if lay.int8 else None)
        vectors = {n: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, memory=memory) for n in VECTOR_NAMES}
        threshold_kb = max(1, lay.indexing_threshold * dim * 4 // 1024)
        config = qe.EdgeConfig(
            vectors=vectors,
            hnsw_config=qe.HnswIndexConfig(m=lay.hnsw_m, ef_construct=lay.hnsw_ef_construct,
                                           full_scan_threshold=10_000),
            quantization_config=quantization,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=threshold_kb),
            wal_enabled=True,
        )
        folder = self._folder(name)
        self.ensure_space(f"creating collection {name}")
        try:
            shard = qe.EdgeShard.create(str(folder), config)
            for field, kind in FILTER_FIELDS.items():
                shard.update(qe.UpdateOperation.create_field_index(field, _SCHEMA[kind]))
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise MemoryStoreError(f"cannot create collection {name} at {folder}: {exc}") from exc
        meta = {"dim": dim, "created_at": time.time(), "format": STORE_FORMAT,
                "layout": {"hnsw_m": lay.hnsw_m, "hnsw_ef_construct": lay.hnsw_ef_construct, "int8": lay.int8,
                           "on_disk": lay.on_disk, "indexing_threshold": lay.indexing_threshold}}
        _write_json(self.root / "collections" / f"{name}.json", meta)
        self._shards[name] = shard
        log.info("created memory collection %s (%d-d, Qdrant Edge at %s)", name, dim, folder)

    def collection(self, name: str) -> EdgeMemory:
        return EdgeMemory(self, name)

    def drop_collection(self, name: str) -> None:
        with self._lock:
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            shutil.rmtree(self._folder(name), ignore_errors=True)
            (self.root / "collections" / f"{name}.json").unlink(missing_ok=True)
            aliases = self.aliases()
            if any(target == name for target in aliases.values()):  # as on a server: its aliases go with it
                self._write_aliases({a: c for a, c in aliases.items() if c != name})

    # --- the alias -----------------------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        try:
            return dict(json.loads((self.root / "aliases.json").read_text()))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise MemoryStoreError(
                f"{self.root / 'aliases.json'} is damaged ({exc}): delete it (the next ingestion points the alias "
                "at the encoder's collection again) or restore a backup") from exc

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        _write_json(self.root / "aliases.json", aliases)

    def live_collection(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    def swap_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection``: one atomic file replace (readers see the old or the new)."""
        with self._lock:
            if not self.collection_exists(collection):
                raise MemoryStoreError(f"cannot point alias {alias} at missing collection {collection}")
            self._write_aliases(self.aliases() | {alias: collection})

    def resolve(self, name: str) -> str:
        return self.aliases().get(name, name)

    # --- upkeep --------------------------------------------------------------------------------------
    def unindexed_points(self) -> dict[str, int]:
        """Per open collection: points not yet in an HNSW index."""
        out = {}
        with self._lock:
            for name, shard in self._shards.items():
                info = shard.info()
                out[name] = max(0, info.points_count - info.indexed_vectors_count // len(VECTOR_NAMES))
        return out

    def index_pending(self, *, force: bool = False, on_start: Callable[[str, int], None] | None = None) -> int:
        """Build HNSW over the unindexed points of every open collection holding at least the threshold of
        them (all of them with ``force``). Blocks this process while it runs (see the module doc)."""
        done = 0
        for name, pending in self.unindexed_points().items():
            if pending and (force or pending >= self.layout.indexing_threshold):
                if on_start is not None:
                    on_start(name, pending)
                started = time.perf_counter()
                with self._lock:
                    self._shards[name].optimize()
                log.info("indexed %d new points of %s in %.1f s", pending, name, time.perf_counter() - started)
                done += pending
        return done

    def flush(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.flush()

    def describe(self) -> dict[str, Any]:
        collections = {}
        for name in self.list_collections():
            entry: dict[str, Any] = {"dim": self._meta(name).get("dim")}
            try:
                info = self.shard(name).info()
                entry |= {"points": info.points_count, "segments": info.segments_count,
                          "indexed_points": info.indexed_vectors_count // len(VECTOR_NAMES)}
            except MemoryStoreError as exc:
                entry["error"] = str(exc)
            collections[name] = entry
        return {"backend": self.backend, "path": str(self.root), "collections": collections, "aliases": self.aliases(),
                "hnsw": {"m": self.layout.hnsw_m, "ef_construct": self.layout.hnsw_ef_construct,
                         "ef": self.layout.hnsw_ef}, "quantization": "int8" if self.layout.int8 else "none",
                "indexing_threshold": self.layout.indexing_threshold}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for shard in self._shards.values():
                with contextlib.suppress(Exception):
                    shard.close()
            self._shards.clear()
            self._owner.release()
            if self.temporary:
                shutil.rmtree(self.root, ignore_errors=True)


class EdgeMemory:
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

    def fetch_vectors(self, item_ids: Sequence[str], modality: Modality) -> np.ndarray:
        return vectors_of(self.retrieve(item_ids, with_vectors=True), item_ids, modality)

    def scroll(
        self, *, filters: Filters | None = None, limit: int = 256, with_vectors: bool = False
    ) -> Iterator[list[StoredPoint]]:
        """Pages of points in id order (export, re-embedding, the browser)."""
        offset: str | None = None
        while True:
            points, offset = self.page(offset, limit, filters=filters, with_vectors=with_vectors)
            if points:
                yield points
            if offset is None:
                return

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


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_store(layout: MemoryLayout | None = None) -> EdgeStore:
    """A throwaway store in a temp folder, removed when closed (tests, ``RECO_MEMORY_PATH=:memory:``)."""
    store = EdgeStore(Path(tempfile.mkdtemp(prefix="reco-memory-")), layout, temporary=True)
    atexit.register(store.close)
    return store
