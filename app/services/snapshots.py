"""Published copies of the live memory for readers that cannot open the Qdrant store.

Qdrant *local mode* is single-process: the folder is locked by the process that opens it. The
process that owns the memory (the embed/maintenance worker) therefore publishes the live collection
as an exact-index snapshot (memory-mapped ``.npy`` matrices + payload JSON lines, :class:`ExactIndex`
format) in ``<data_dir>/snapshots/``, and other processes (the refine worker) serve from it. The same
code runs unchanged against a Qdrant server.

A snapshot is immutable once written; ``LIVE.json`` names the current one and is replaced atomically
(write + rename), so a reader sees the old snapshot or the new one, never half of one. A reader polls
:func:`live_snapshot` (one small file read) and reloads when the name changed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.db.repo import MetadataRepo
from app.memory.base import Filters, SearchHit, VectorMemory
from app.memory.exact import ExactIndex
from app.memory.store import open_store
from app.schemas import Modality
from app.services.reembed import live_version, seed_of

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

POINTER = "LIVE.json"
KEEP = 3  # snapshots kept per collection (a reader may still hold the previous one mapped)


@dataclass(frozen=True)
class SnapshotInfo:
    name: str  # unique: <collection>/<count>-<unix ms>
    path: str
    collection: str
    encoder_id: str
    model: str
    pretrained: str
    seed: int | None
    count: int
    published_at: float
    export_s: float = 0.0  # how long the export took (publishing is throttled to ~10% of the owner's time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def snapshot_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "snapshots"


def live_snapshot(settings: Settings) -> SnapshotInfo | None:
    pointer = snapshot_root(settings) / POINTER
    try:
        data = json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # never half-written (rename), so this is damage: say so
        raise RuntimeError(f"{pointer} is not valid JSON: {exc}") from exc
    return SnapshotInfo(**data)


def load_snapshot(info: SnapshotInfo, settings: Settings) -> ExactIndex:
    return ExactIndex.load(Path(info.path), mmap=True, chunk=settings.exact_index_chunk)


def publish_snapshot(
    settings: Settings, *, repo: MetadataRepo | None = None, memory: VectorMemory | None = None, force: bool = False
) -> SnapshotInfo | None:
    """Export the live collection when it changed since the last snapshot; returns the new one or None.

    "Changed" = another collection behind the alias, or another point count (points are keyed by
    content, written once, removed only with their collection). While the same collection keeps
    growing, a new export waits ten times as long as the last one took.
    """
    repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
    store = open_store(settings)
    collection = store.live_collection(settings.memory_alias)
    version = live_version(repo)
    if collection is None or version is None:
        return None
    live = store.collection(collection)
    count = live.count()
    current = live_snapshot(settings)
    if not force and current is not None:
        if (current.collection, current.count) == (collection, count):
            return None
        if current.collection == collection and time.time() - current.published_at < 10 * current.export_s:
            return None  # a big memory changing fast: export at most ~10% of the time
    started = time.perf_counter()
    index = ExactIndex.from_matrices(live.export_matrices(), dtype=settings.exact_index_dtype, normalise=False)
    stamp = int(time.time() * 1000)
    folder = snapshot_root(settings) / collection / f"{len(index)}-{stamp}"
    try:
        index.save(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a full disk leaves no half-written snapshot behind
        raise
    info = SnapshotInfo(
        name=f"{collection}/{folder.name}", path=str(folder.resolve()), collection=collection,
        encoder_id=version.encoder_id, model=version.model, pretrained=version.pretrained,
        seed=seed_of(version.encoder_id), count=len(index), published_at=time.time(),
        export_s=round(time.perf_counter() - started, 3))
    _write_atomically(snapshot_root(settings) / POINTER, info.to_json())
    _prune(folder.parent, keep=KEEP)
    log.info("published memory snapshot %s (%d items)", info.name, info.count)
    return info


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _prune(folder: Path, keep: int) -> None:
    snapshots = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in snapshots[:-keep]:
        shutil.rmtree(old, ignore_errors=True)  # a reader that mapped it keeps its pages (unlinked inode)


class SnapshotMemory:
    """A loaded snapshot behind the interface :class:`~app.services.search.SearchService` uses."""

    def __init__(self, index: ExactIndex, collection: str) -> None:
        self.index = index
        self.collection = collection

    def exists(self) -> bool:
        return len(self.index) > 0

    def count(self) -> int:
        return len(self.index)

    def search(
        self, vector: np.ndarray, modality: Modality, k: int, *, filters: Filters | None = None,
        exclude_ids: Sequence[str] = (), distinct_images: bool = False,
    ) -> list[SearchHit]:
        """Exact top-k; ``distinct_images``: the best row per image (over-fetch by the most rows an image has)."""
        if not distinct_images:
            return self.index.search(vector, modality, k, filters=filters, exclude_ids=exclude_ids)
        fetch = k * self.index.max_rows_per_image
        hits = self.index.search(vector, modality, fetch, filters=filters, exclude_ids=exclude_ids)
        seen: set[str] = set()
        kept: list[SearchHit] = []
        for hit in hits:
            image = hit.payload.image_hash if hit.payload is not None else hit.item_id
            if image not in seen:
                seen.add(image)
                kept.append(hit)
        return kept[:k]
