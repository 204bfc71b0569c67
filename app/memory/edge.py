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

This module holds the store (folder, owner lock, collections, alias, upkeep); one collection, the
``VectorMemory`` itself (:class:`EdgeMemory`), is in :mod:`app.memory.edge_collection`.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from app.memory.base import FILTER_FIELDS, MemoryHeldElsewhere, MemoryStoreError
from app.memory.edge_collection import EdgeMemory
from app.memory.layout import MemoryLayout

log = logging.getLogger(__name__)

STORE_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
_SCHEMA = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer}
VECTOR_NAMES = ("image", "text")

__all__ = ["STORE_FORMAT", "VECTOR_NAMES", "EdgeMemory", "EdgeStore", "temporary_store"]


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
