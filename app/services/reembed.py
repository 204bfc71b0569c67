"""Re-embedding the memory with another encoder, into a new versioned collection, then one alias swap.

Progress lives in the metadata DB: an item is done under the new encoder when its ``embeddings`` row
for that encoder is ``embedded`` (or ``failed``, with a reason), so a killed run resumes where it
stopped and a re-run is a no-op. Each batch follows the ingest order (DB pending → Qdrant upsert →
DB embedded). Searches keep using the alias, which points at the old collection until every item is
done; the swap is one alias operation, and the old collection stays until :func:`drop_old_versions`.

Images are read again from each item's ``source_uri`` and must still hash to the item's
``image_hash``: a moved or changed file fails that item (reason ``missing`` / ``corrupt``), never
embeds different pixels under the old id.

A fusion checkpoint is trained for one encoder id. After a swap the live encoder has a checkpoint or
it does not: :func:`fusion_status` says which, and the refine worker serves plain CLIP until one
exists (``retraining_required``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from app.db.ingest_queries import (
    count_embedded,
    count_waiting_for,
    items_waiting_for,
    latest_checkpoint,
    status_counts_of,
    version_of,
)
from app.db.models import EmbeddingVersion, Item
from app.db.repo import MetadataRepo
from app.encoder import Encoder, create_encoder
from app.encoder_identity import EncoderId
from app.imaging import ImageLimits, ImageRejected, open_image_safely, read_image_file
from app.memory.base import MemoryStore
from app.memory.store import encoder_memory, open_store
from app.schemas import EmbedStatus, RejectReason
from app.services.ingest_write import FailedInput, ItemWriter, PreparedItem, new_item_of, row_of_item

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

BUILDING, READY, LIVE, DROPPED = "building", "ready", "live", "dropped"


class ReembedProgress(BaseModel):
    encoder_id: str
    collection: str
    status: str
    total: int
    done: int
    failed: int
    remaining: int
    swapped: bool = False
    live_encoder_id: str | None = None
    previous_encoder_id: str | None = None
    fusion_checkpoint_id: int | None = None
    retraining_required: bool = False
    seconds: float = 0.0


def encoder_for(settings: Settings, identity: EncoderId) -> Encoder:
    """An encoder other than the configured one (same device and precision settings)."""
    return create_encoder(settings.model_copy(update=identity.settings_update()))


def live_version(repo: MetadataRepo) -> EmbeddingVersion | None:
    return next((v for v in repo.versions() if v.is_live), None)


class ReembedService:
    """Constructor arguments: the target encoder; repo and memory store explicit or from the settings."""

    def __init__(
        self, settings: Settings, encoder: Encoder, *, repo: MetadataRepo | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
        self.store = store or open_store(settings)
        self.memory = encoder_memory(settings, encoder.encoder_id, encoder.dim, store=self.store)
        self.limits = ImageLimits.from_settings(settings)
        self.writer = ItemWriter(encoder, self.memory, self.repo)
        self._register()

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def _register(self) -> None:
        model = getattr(self.encoder, "model_name", "?")
        self.repo.ensure_version(self.encoder_id, self.memory.collection, model,
                                 getattr(self.encoder, "pretrained", ""), self.encoder.dim)

    # --- what is left ---------------------------------------------------------------------------
    def next_items(self, limit: int) -> list[Item]:
        """Items embedded under another version and not yet done under the target (id order)."""
        return items_waiting_for(self.repo, self.encoder_id, limit)

    def progress(self, **extra: Any) -> ReembedProgress:
        counts = status_counts_of(self.repo, self.encoder_id)
        remaining = count_waiting_for(self.repo, self.encoder_id)
        version = version_of(self.repo, self.encoder_id)
        done, failed = int(counts.get(EmbedStatus.EMBEDDED, 0)), int(counts.get(EmbedStatus.FAILED, 0))
        live = live_version(self.repo)
        status = fusion_status(self.repo)
        return ReembedProgress(
            encoder_id=self.encoder_id, collection=self.memory.collection,
            status=version.status if version else BUILDING, total=done + failed + int(remaining), done=done,
            failed=failed, remaining=int(remaining), live_encoder_id=live.encoder_id if live else None,
            fusion_checkpoint_id=status["checkpoint_id"] if live and live.encoder_id == self.encoder_id else None,
            retraining_required=bool(live and live.encoder_id == self.encoder_id and status["retraining_required"]),
            **extra)

    # --- the work -------------------------------------------------------------------------------
    def run(self, *, max_seconds: float | None = None, swap: bool = True,
            on_batch: Callable[[int, int], None] | None = None) -> ReembedProgress:
        """Batches until nothing is left (then the swap), or until ``max_seconds`` ran out with work left
        (at least one batch per call; resume with another call).

        ``on_batch(embedded, attempted)`` is called after each batch (a progress bar)."""
        started = time.monotonic()
        self.repo.update_version_progress(self.encoder_id, status=self._status_while_running(),
                                          total=self.progress().total)
        batches = 0
        while True:
            items = self.next_items(self.settings.reembed_batch_size)
            if not items:
                break  # everything done: on to the swap, whatever time is left
            if batches and max_seconds is not None and time.monotonic() - started >= max_seconds:
                return self.progress(seconds=time.monotonic() - started)  # work left: resume later
            batches += 1
            n = self.embed_items(items)
            if on_batch is not None:
                on_batch(n, len(items))
        previous = live_version(self.repo)
        swapped = False
        if swap and (previous is None or previous.encoder_id != self.encoder_id):
            self.swap()
            swapped = True
        else:
            self.repo.update_version_progress(self.encoder_id, status=self._status_while_running(done=True))
        return self.progress(seconds=time.monotonic() - started, swapped=swapped,
                             previous_encoder_id=previous.encoder_id if previous and swapped else None)

    def _status_while_running(self, done: bool = False) -> str:
        live = live_version(self.repo)
        if live is not None and live.encoder_id == self.encoder_id:
            return LIVE
        return READY if done else BUILDING

    def embed_items(self, items: Sequence[Item]) -> int:
        """One batch through the ingest write path (pending → vectors → embedded); unreadable sources fail with
        a reason. Returns how many were embedded."""
        loaded = self._load_images(items)
        ok = [(item, pixels) for item, pixels in zip(items, loaded, strict=True) if not isinstance(pixels, FailedInput)]
        failed = [(new_item_of(item), problem) for item, problem in zip(items, loaded, strict=True)
                  if isinstance(problem, FailedInput)]
        prepared = [PreparedItem(row=row_of_item(item), image_hash=item.image_hash, size_bytes=item.size_bytes,
                                 pixels=pixels) for item, pixels in ok]
        outcomes = self.writer.write([new_item_of(item) for item, _ in ok], prepared, failed)
        self.repo.update_version_progress(self.encoder_id, done=self.count_done())
        return sum(1 for failure in outcomes.values() if failure is None)

    def count_done(self) -> int:
        return count_embedded(self.repo, self.encoder_id)

    def _load_images(self, items: Sequence[Item]) -> list[Any]:
        """Preprocessed pixels per item, or why not (:class:`FailedInput`); one read per distinct file, in threads."""
        unique = {item.image_hash: item for item in items}
        workers = max(1, self.settings.decode_workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reco-reembed") as pool:
            results = dict(zip(unique, pool.map(self._load_one, unique.values()), strict=True))
        return [results[item.image_hash] for item in items]

    def _load_one(self, item: Item) -> Any:
        path = Path(item.source_uri)
        try:
            data = read_image_file(path, self.limits.max_bytes)  # a regular file, at most the cap, never blocks
        except ImageRejected as exc:
            return FailedInput(item.source_uri, exc.reason, exc.detail)
        if hashlib.sha256(data).hexdigest() != item.image_hash:
            return FailedInput(item.source_uri, RejectReason.CORRUPT,
                               f"source {item.source_uri} changed since it was ingested")
        try:
            return self.encoder.preprocess(open_image_safely(data, self.limits))
        except ImageRejected as exc:
            return FailedInput(item.source_uri, exc.reason, exc.detail)

    def swap(self) -> None:
        """Alias → the new collection (one request), then the DB follows; the old version is kept."""
        previous = live_version(self.repo)
        self.store.swap_alias(self.settings.memory_alias, self.memory.collection)
        self.repo.set_live_version(self.encoder_id)
        if previous is not None and previous.encoder_id != self.encoder_id:
            self.repo.update_version_progress(previous.encoder_id, status=READY)
        status = fusion_status(self.repo)
        log.warning("memory alias %s now → %s (%s); fusion checkpoint: %s", self.settings.memory_alias,
                    self.memory.collection, self.encoder_id,
                    status["checkpoint_id"] or "NONE — retraining required (reco train)")


def fusion_status(repo: MetadataRepo) -> dict[str, Any]:
    """Which encoder is live, and whether a fusion checkpoint was trained for it."""
    live = live_version(repo)
    if live is None:
        return {"live_encoder_id": None, "collection": None, "checkpoint_id": None, "checkpoint_path": None,
                "retraining_required": False}
    ckpt = latest_checkpoint(repo, live.encoder_id)
    return {"live_encoder_id": live.encoder_id, "collection": live.collection,
            "checkpoint_id": ckpt.id if ckpt else None, "checkpoint_path": ckpt.path if ckpt else None,
            "retraining_required": ckpt is None}


def unfinished_versions(repo: MetadataRepo) -> list[EmbeddingVersion]:
    """Versions a re-embed was started for and that are not live yet (resumed by the beat schedule)."""
    return [v for v in repo.versions() if v.status == BUILDING and not v.is_live]


def drop_old_versions(settings: Settings, *, repo: MetadataRepo | None = None,
                      store: MemoryStore | None = None) -> list[str]:
    """Delete the collections of every version that is neither live nor being built."""
    repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
    store = store or open_store(settings)
    live = store.live_collection(settings.memory_alias)
    dropped = []
    for version in repo.versions():
        if version.is_live or version.collection == live or version.status in (BUILDING, DROPPED):
            continue
        if store.collection_exists(version.collection):
            store.drop_collection(version.collection)
        repo.update_version_progress(version.encoder_id, status=DROPPED)
        dropped.append(version.collection)
    return dropped


def missing_from_live(repo: MetadataRepo) -> int:
    """Items embedded under another version but not under the live one (ingested there during a swap)."""
    live = live_version(repo)
    if live is None:
        return 0
    return count_waiting_for(repo, live.encoder_id)


def reembed_now(
    settings: Settings, model: str, pretrained: str, *, seed: int | None = None, swap: bool = True,
    drop_old: bool = False, progress: bool = False,
) -> dict[str, Any]:
    """``reco reembed`` in this process: run to the end, swap, optionally drop old ones."""
    from tqdm import tqdm

    service = ReembedService(settings, encoder_for(settings, EncoderId(model, pretrained, seed)))
    with tqdm(total=service.progress().remaining, unit="item", desc="re-embed", disable=not progress) as bar:
        result = service.run(swap=swap, on_batch=lambda _done, tried: bar.update(tried))
    dropped = drop_old_versions(settings, repo=service.repo, store=service.store) if drop_old else []
    return result.model_dump() | {"dropped": dropped, "fusion": fusion_status(service.repo)}


def schedule_reembed(settings: Settings, model: str, pretrained: str, *, seed: int | None = None) -> dict[str, Any]:
    """Record the request only (no memory access): the maintenance worker's scheduled check runs it."""
    encoder = encoder_for(settings, EncoderId(model, pretrained, seed))
    repo = MetadataRepo.from_url(settings.resolved_database_url)
    from app.encoder import collection_name_for

    repo.ensure_version(encoder.encoder_id, collection_name_for(encoder.encoder_id), model, pretrained, encoder.dim)
    live = live_version(repo)
    if live is None or live.encoder_id != encoder.encoder_id:
        repo.update_version_progress(encoder.encoder_id, status=BUILDING)
    return {"scheduled": encoder.encoder_id, "check_every_s": settings.reembed_check_interval_s}


def versions_report(settings: Settings, repo: MetadataRepo | None = None) -> dict[str, Any]:
    """Every embedding version with its progress, and which fusion checkpoint serves the live one."""
    repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
    versions = [{"encoder_id": v.encoder_id, "collection": v.collection, "status": v.status, "live": v.is_live,
                 "total": v.total, "done": v.done} for v in repo.versions()]
    return {"versions": versions, "fusion": fusion_status(repo), "missing_from_live": missing_from_live(repo)}
