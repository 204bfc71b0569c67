"""The one path that writes items into the memory: metadata *pending* → vectors → *embedded*.

Ingestion (:class:`~app.services.ingest.IngestService`, which the asynchronous embed batches use too) and
re-embedding (:class:`~app.services.reembed.ReembedService`) both hand an :class:`ItemWriter` a batch of
items with their prepared pixels; it marks them pending (row by row when the database refuses a value, so
only that row fails), encodes them (one image encode per distinct image, one text encode per caption not
seen lately) and stores the vectors, then marks them embedded. Every item ends with one outcome.

Order matters for crash safety: an item is committed as *pending* before its vectors are written and marked
*embedded* only after the memory acknowledged them; a crash in between is repaired by reconcile.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

from app.db.ingest_errors import refused_for_data
from app.db.repo import MetadataRepo, NewItem
from app.memory.base import ItemPayload, MemoryRecord, VectorMemory
from app.schemas import EmbedStatus, RejectReason

if TYPE_CHECKING:
    import torch

    from app.db.models import Item
    from app.encoder import Encoder
    from app.manifest import InputRow

log = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 4096  # captions whose text vectors are kept (8 MiB at d=512)


@dataclass(frozen=True)
class PreparedItem:
    """A decoded input: safe RGB pixels (or the encoder's input tensor) and where they came from."""

    row: InputRow
    image_hash: str
    size_bytes: int
    image: Image.Image | None = None
    pixels: torch.Tensor | None = None  # already preprocessed (decode workers do it off the hot path)
    pixels_uint8: np.ndarray | None = None  # first preprocessing stage only (encoder.preprocess_uint8)
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class FailedInput:
    """Why one input was not written: where it came from, one reason, a detail (every path's failure)."""

    source: str
    reason: RejectReason
    detail: str


@dataclass
class Pending:
    """Items marked pending, encoded (``records``) or waiting to be; ``refused``: {item id: failure}."""

    items: list[NewItem]
    prepared: list[PreparedItem]
    refused: dict[str, FailedInput]
    records: list[MemoryRecord]


class ItemWriter:
    """Constructor arguments: the encoder, the memory its vectors go to, the metadata repo."""

    def __init__(self, encoder: Encoder, memory: VectorMemory, repo: MetadataRepo) -> None:
        self.encoder = encoder
        self.memory = memory
        self.repo = repo
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # caption -> vector, recent first out
        self._text_lock = threading.Lock()

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def write(self, items: Sequence[NewItem], prepared: Sequence[PreparedItem],
              failed: Sequence[tuple[NewItem, FailedInput]] = ()) -> dict[str, FailedInput | None]:
        """The whole path for one batch: {item id: its failure, or None when embedded}.

        ``failed``: items known to fail already (a source that can no longer be read), recorded failed with
        their reason. An error of the encoder or the memory propagates (the items stay pending)."""
        pending = self.mark_pending(items, prepared, failed)
        pending.records = self.encode(pending)
        self.store(pending.records)
        out: dict[str, FailedInput | None] = {i.id: None for i in pending.items}
        return out | {item.id: failure for item, failure in failed} | dict(pending.refused)

    def mark_pending(self, items: Sequence[NewItem], prepared: Sequence[PreparedItem],
                     failed: Sequence[tuple[NewItem, FailedInput]] = ()) -> Pending:
        """Mark the batch pending; when the database refuses it for its data (a value the checks before it
        missed), row by row, so only the rows it refuses fail — with the database's reason."""
        pending = Pending(list(items), list(prepared), {}, [])
        try:
            self.repo.add_pending([*pending.items, *(f[0] for f in failed)], self.encoder_id)
        except Exception as exc:
            if not refused_for_data(exc):
                raise  # the database is down, locked, full: the job's problem, not a row's
            self._row_by_row(pending, exc)
            if failed:
                self.repo.add_pending([f[0] for f in failed], self.encoder_id)
        for item, failure in failed:
            self.repo.set_status([item.id], self.encoder_id, EmbedStatus.FAILED, failure.reason, failure.detail)
        return pending

    def _row_by_row(self, pending: Pending, first: Exception) -> None:
        if len(pending.items) == 1:
            self._refuse(pending, 0, first)
            pending.items.clear()
            pending.prepared.clear()
            return
        kept: list[tuple[NewItem, PreparedItem]] = []
        for index, (item, prepared) in enumerate(zip(pending.items, pending.prepared, strict=True)):
            try:
                self.repo.add_pending([item], self.encoder_id)
            except Exception as exc:
                if not refused_for_data(exc):
                    raise
                self._refuse(pending, index, exc)
                continue
            kept.append((item, prepared))
        pending.items[:], pending.prepared[:] = [k[0] for k in kept], [k[1] for k in kept]

    @staticmethod
    def _refuse(pending: Pending, index: int, exc: Exception) -> None:
        orig = getattr(exc, "orig", exc)
        reason = " ".join(str(orig).split()).split("[SQL:")[0][:300]
        source = pending.prepared[index].row.source
        log.warning("database refused %s: %s", source, reason)
        pending.refused[pending.items[index].id] = FailedInput(source, RejectReason.BAD_ROW,
                                                               f"the database refused the row: {reason}")

    def fail(self, pending: Pending, exc: Exception) -> dict[str, FailedInput]:
        """The batch could not be encoded: every item of it failed with the error (recorded as such)."""
        log.exception("encoding failed for %d items", len(pending.items))
        ids = [i.id for i in pending.items]
        self.repo.set_status(ids, self.encoder_id, EmbedStatus.FAILED, RejectReason.ENCODE_ERROR, str(exc))
        failures = {i.id: FailedInput(i.source_uri, RejectReason.ENCODE_ERROR, str(exc)) for i in pending.items}
        pending.items.clear()
        pending.prepared.clear()
        return failures

    def store(self, records: Sequence[MemoryRecord]) -> None:
        """Vectors to the memory, then *embedded* in the metadata (transient store errors propagate)."""
        if records:
            self.memory.upsert(list(records))
            self.repo.set_status([r.item_id for r in records], self.encoder_id, EmbedStatus.EMBEDDED)

    # --- encoding ---------------------------------------------------------------------------------
    def encode(self, pending: Pending) -> list[MemoryRecord]:
        """One image encode per distinct image (Flickr8k: five captions share one)."""
        if not pending.items:
            return []
        first_index: dict[str, int] = {}
        for idx, p in enumerate(pending.prepared):
            first_index.setdefault(p.image_hash, idx)
        image_vectors = self._encode_images([pending.prepared[i] for i in first_index.values()])
        row_of_hash = {h: n for n, h in enumerate(first_index)}
        text_of = self.text_vectors(dict.fromkeys(i.caption for i in pending.items))
        return [MemoryRecord(payload_of(item), np.asarray(image_vectors[row_of_hash[p.image_hash]]),
                             text_of[item.caption])
                for item, p in zip(pending.items, pending.prepared, strict=True)]

    def text_vectors(self, captions: Iterable[str]) -> dict[str, np.ndarray]:
        """One text encode per caption not seen lately. Images-only sources give every item the empty
        caption: encoding it per item cost ~70 % of the image encode on CPU (ViT-B-32); now once per writer.
        """
        wanted = list(captions)
        with self._text_lock:
            missing = [c for c in wanted if c not in self._text_cache]
        fresh = dict(zip(missing, self.encoder.encode_texts(missing), strict=True)) if missing else {}
        with self._text_lock:
            self._text_cache.update(fresh)
            out = {c: self._text_cache[c] if c in self._text_cache else fresh[c] for c in wanted}
            for c in wanted:
                self._text_cache.move_to_end(c)
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return out

    def _encode_images(self, prepared: list[PreparedItem]) -> np.ndarray:
        to_pixels = getattr(self.encoder, "pixels_from_uint8", None)
        if to_pixels is not None and all(p.pixels_uint8 is not None for p in prepared):
            return self.encoder.encode_images(to_pixels(np.stack([p.pixels_uint8 for p in prepared
                                                                   if p.pixels_uint8 is not None])))
        if all(p.pixels is not None for p in prepared):
            import torch

            return self.encoder.encode_images(torch.stack([p.pixels for p in prepared]))  # type: ignore[misc]
        if any(p.pixels is not None or p.pixels_uint8 is not None for p in prepared):
            import torch

            return self.encoder.encode_images(torch.stack([self._pixels_of(p) for p in prepared]))
        images = [p.image if p.image is not None else _missing_pixels(p) for p in prepared]
        return self.encoder.encode_images(images)

    def _pixels_of(self, p: PreparedItem) -> torch.Tensor:
        """One item's model input, whichever form it came in (a batch mixing forms is rare)."""
        if p.pixels is not None:
            return p.pixels
        if p.pixels_uint8 is not None:
            return cast(torch.Tensor, self.encoder.pixels_from_uint8(  # type: ignore[attr-defined]
                p.pixels_uint8[None])[0])
        return self.encoder.preprocess(p.image if p.image is not None else _missing_pixels(p))


def row_of_item(item: Item) -> InputRow:
    """A stored item as an input row to read again from its source file (absolute paths only)."""
    from app.manifest import InputRow

    path = Path(item.source_uri)
    problem = None if path.is_absolute() else (RejectReason.MISSING, f"no local file to re-read: {item.source_uri}")
    return InputRow(source=item.source_uri, path=path if problem is None else None, url=None, caption=item.caption,
                    label=item.label, split=item.split, dataset=item.dataset, extra=dict(item.extra or {}),
                    problem=problem)


def new_item_of(item: Item) -> NewItem:
    """A stored item as the metadata the writer marks pending (re-embedding: the row exists already)."""
    return NewItem(id=item.id, content_hash=item.content_hash, image_hash=item.image_hash, caption=item.caption,
                   source_uri=item.source_uri, dataset=item.dataset, split=item.split, label=item.label,
                   size_bytes=item.size_bytes, width=item.width, height=item.height, extra=dict(item.extra or {}))


def payload_of(item: NewItem) -> ItemPayload:
    return ItemPayload(item_id=item.id, image_hash=item.image_hash, caption=item.caption, dataset=item.dataset,
                       split=item.split, source=item.source_uri, label=item.label, extra=dict(item.extra))


def _missing_pixels(p: PreparedItem) -> Image.Image:
    raise ValueError(f"{p.row.source}: neither image nor pixels given")
