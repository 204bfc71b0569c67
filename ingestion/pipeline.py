"""Synchronous, in-process ingestion: source rows → safe decode → batched writes through the app service."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from app.config import Settings
from app.imaging import ImageLimits, PixelBudget
from app.manifest import InputRow
from app.schemas import JobStatus, RejectReason
from app.services.ingest import BatchOutcome, FailedInput, IngestService, PreparedItem, job_summary
from ingestion.decode import Decoded, Rejected, decode_row
from ingestion.sources import iter_source, source_kind

log = logging.getLogger(__name__)


def to_service_input(
    outcome: Decoded | Rejected,
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
    preprocess_uint8: Callable[[Image.Image], np.ndarray | None] | None = None,
) -> PreparedItem | FailedInput:
    """A decode outcome for the service; with ``preprocess``, pixels are made here, off the encode path.

    With ``preprocess_uint8`` (the encoder's PIL-only first stage) no torch op runs in the decode threads:
    the service finishes the whole batch at once (ToTensor + Normalize), so decoding never competes with
    the encoder's thread pool. The full ``preprocess`` is the fallback when the stage gives None.
    """
    if isinstance(outcome, Rejected):
        return outcome  # a decode failure is an ingest failure as it is (one type)
    image = outcome.image
    if preprocess is None and preprocess_uint8 is None:
        return PreparedItem(row=outcome.row, image_hash=outcome.image_hash, size_bytes=outcome.size_bytes,
                            image=image)
    try:
        first = preprocess_uint8(image) if preprocess_uint8 is not None else None
        pixels = preprocess(image) if first is None and preprocess is not None else None
    except Exception as exc:  # noqa: BLE001 - one odd image must not stop the batch
        return FailedInput(outcome.source, RejectReason.UNSUPPORTED, f"preprocess failed: {exc}")
    width, height = image.info.get("original_size", image.size)  # before the downscale after decoding
    return PreparedItem(row=outcome.row, image_hash=outcome.image_hash, size_bytes=outcome.size_bytes,
                        image=image if first is None and pixels is None else None, pixels=pixels,
                        pixels_uint8=first, width=width, height=height)


def batched(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


MB = 1024 * 1024


def pixel_budget_bytes(settings: Settings) -> int:
    """Decoded pixels in flight across the decode threads: a quarter of RECO_INGEST_MAX_RSS_MB."""
    return settings.ingest_max_rss_mb * MB // 4


def retained_bytes(item: PreparedItem | FailedInput) -> int:
    """What a prepared item keeps until its batch is encoded."""
    if isinstance(item, FailedInput):
        return 0
    if item.pixels_uint8 is not None:
        return int(item.pixels_uint8.nbytes)
    if item.pixels is not None:
        return int(item.pixels.element_size() * item.pixels.nelement())
    if item.image is not None:
        return item.image.width * item.image.height * 3
    return 0


def split_by_bytes(items: list[PreparedItem | FailedInput], cap: int) -> Iterator[list[PreparedItem | FailedInput]]:
    """``items`` in consecutive runs whose retained bytes stay under ``cap`` (a run holds at least one item)."""
    run: list[PreparedItem | FailedInput] = []
    held = 0
    for item in items:
        size = retained_bytes(item)
        if run and held + size > cap:
            yield run
            run, held = [], 0
        run.append(item)
        held += size
    if run:
        yield run


def prepared_batches(
    rows: Iterator[InputRow], settings: Settings, preprocess: Callable[[Image.Image], torch.Tensor] | None,
    preprocess_uint8: Callable[[Image.Image], np.ndarray | None] | None = None, *, fit: int | None = None,
) -> Iterator[tuple[int, list[PreparedItem | FailedInput]]]:
    """Batches decoded one step ahead in a background thread, so decoding overlaps encoding.

    Memory stays bounded whatever the images (RECO_INGEST_MAX_RSS_MB): each row is decoded, downscaled to
    what the encoder needs (``fit``) and preprocessed in one go, so a batch never holds full-size images;
    the decoded bytes in flight across threads share one :class:`PixelBudget`; and a batch whose prepared
    pixels pass a quarter of the setting is cut into smaller ones (batches by bytes, not only by rows).
    """
    limits = ImageLimits.from_settings(settings)
    budget = PixelBudget(pixel_budget_bytes(settings))
    batch_cap = settings.ingest_max_rss_mb * MB // 4

    def prepare_one(row: InputRow) -> PreparedItem | FailedInput:
        return to_service_input(decode_row(row, limits, fit=fit, budget=budget), preprocess, preprocess_uint8)

    def prepare(chunk: list[InputRow]) -> list[PreparedItem | FailedInput]:
        if settings.decode_workers <= 0 or len(chunk) <= 1:
            return [prepare_one(row) for row in chunk]
        with ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="reco-decode") as pool:
            return list(pool.map(prepare_one, chunk))

    chunks = batched(rows, settings.ingest_batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        first = next(chunks, None)
        pending: Future[list[PreparedItem | FailedInput]] | None = (
            pool.submit(prepare, first) if first is not None else None)
        while pending is not None:
            nxt = next(chunks, None)
            following = pool.submit(prepare, nxt) if nxt is not None else None
            for run in split_by_bytes(pending.result(), batch_cap):
                yield len(run), run
            pending = following


class IngestCancelled(Exception):
    """The job was cancelled between two batches."""


def store_while_encoding(
    service: IngestService, job_id: int, batches: Iterable[tuple[int, list[PreparedItem | FailedInput]]], bar: tqdm,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Encode batch N+1 while a writer thread stores batch N (memory upsert, then *embedded* in the DB).

    Storing waits mostly on the database and the engine's write-ahead log, so overlapping it costs the
    encoder little CPU. Crash order per item is unchanged (pending -> vectors -> embedded); a store error
    surfaces at the next batch and fails the job.
    """

    def report(done: Future[BatchOutcome], size: int) -> None:
        result = done.result()  # re-raises a store error here
        bar.update(size)
        bar.set_postfix(new=result.ingested, dup=result.duplicates, failed=result.failed, refresh=False)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store") as writer:
        storing: tuple[Future[BatchOutcome], int] | None = None
        in_flight: set[str] = set()
        for size, inputs in batches:
            if cancelled is not None and cancelled():
                if storing is not None:
                    report(*storing)
                raise IngestCancelled(f"job {job_id} cancelled")
            encoded = service.encode_batch(job_id, inputs, in_flight=in_flight)
            if storing is not None:
                report(*storing)
            in_flight = set(encoded.item_ids)
            storing = writer.submit(service.store_batch, encoded), size
        if storing is not None:
            report(*storing)


def count_rows(path: Path, settings: Settings, *, split: str | None = None, limit: int | None = None) -> int:
    """How many rows a source has (no image is read); 0 for a source that cannot be read."""
    try:
        rows: Iterator[InputRow] = iter_source(path, settings)
        n = sum(1 for r in rows if split is None or r.split == split)
    except (ValueError, OSError):
        return 0
    return n if limit is None else min(n, limit)


def ingest_source(
    source: str | Path,
    settings: Settings,
    *,
    limit: int | None = None,
    split: str | None = None,
    service: IngestService | None = None,
    progress: bool = True,
    job_id: int | None = None,
    dataset: str | None = None,
    caption_template: str | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Ingest every row of a folder or manifest (or of one ``split``); returns the job summary.

    ``job_id``: a job already created for it (``reco serve`` answers with the job before the work starts).
    ``dataset``: the name the items are filed under (default: the folder's name, or the manifest's column).
    ``caption_template``: for a tree of class folders, ``"a photo of a {folder}."`` captions every image that
    has none from its folder's name and labels it with the folder's index (see :mod:`ingestion.classfolders`).
    ``cancelled``: asked between batches; True stops the job as *cancelled* (what was stored stays).
    ``on_total``: given the number of rows before the work starts (a walk over names only), for a progress bar."""
    path = Path(source).expanduser()
    if on_total is not None:
        on_total(count_rows(path, settings, split=split, limit=limit))
    rows: Iterator[InputRow] = iter_source(path, settings, dataset=dataset)
    if caption_template:
        from ingestion.classfolders import caption_from_folders

        rows = caption_from_folders(rows, path, settings, caption_template, dataset=dataset)
    if split is not None:  # rows of other splits are not this job's: not seen, not counted
        rows = (r for r in rows if r.split == split)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    service = service or IngestService(settings)
    if job_id is None:
        job_id = service.start_job(str(path.resolve()), source_kind(path))
    preprocess = getattr(service.encoder, "preprocess", None)
    preprocess_uint8 = getattr(service.encoder, "preprocess_uint8", None)
    try:
        with tqdm(total=limit, unit="item", desc="ingest", disable=not progress, dynamic_ncols=True) as bar:
            batches = prepared_batches(rows, settings, preprocess, preprocess_uint8,
                                       fit=getattr(service.encoder, "image_size", None))
            store_while_encoding(service, job_id, batches, bar, cancelled)
    except IngestCancelled:
        service.finish_job(job_id, JobStatus.CANCELLED, "cancelled on request")
        service.index_pending(announce=None)
        return job_summary(service.repo, job_id)
    except BaseException as exc:
        service.finish_job(job_id, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    service.finish_job(job_id, JobStatus.COMPLETED)
    service.index_pending(announce=(lambda line: tqdm.write(line)) if progress else None)
    return job_summary(service.repo, job_id)
