"""Asynchronous ingestion: source rows → ledger rows → one message per row for the embed workers.

``reco ingest SOURCE --async`` calls :func:`dispatch_source`. Each chunk of rows is committed to the
ledger (:class:`~app.services.ingest_ledger.IngestLedger`) *before* its messages are sent, and the job's
cursor is advanced after, so a dispatcher that dies anywhere is resumed by running the same command
again: rows already in the ledger are sent again (harmless: a worker skips rows already finished) and the
walk continues from the cursor. Before each chunk the embed queue's depth is checked (backpressure):
above ``embed_queue_high_water`` the dispatcher waits.

The worker side is :func:`make_decoder`: rows decoded in a thread pool and preprocessed to the encoder's
input tensor there, off the encoding path.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from app.db.repo import MetadataRepo
from app.encoder_identity import EncoderId
from app.imaging import ImageLimits
from app.manifest import InputRow, ManifestError
from app.schemas import JobStatus
from app.services.ingest_ledger import IngestLedger, TaskRef
from ingestion.decode import Decoded, Rejected, decode_row
from ingestion.sources import SourceError, iter_source, source_kind

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from app.config import Settings
    from app.encoder import Encoder
    from app.services.ingest import FailedInput, PreparedItem

log = logging.getLogger(__name__)

ASYNC_KIND_SUFFIX = "+async"
BACKPRESSURE_POLL_S = 0.5


class TaskSender(Protocol):
    """Sends embed messages (ids only) and tells how long the embed queue is."""

    def send(self, refs: Sequence[TaskRef]) -> None: ...

    def queue_depth(self) -> int: ...


def wait_for_capacity(sender: TaskSender, high_water: int, *, poll_s: float = BACKPRESSURE_POLL_S,
                      sleep: Callable[[float], None] = time.sleep) -> float:
    """Block while the embed queue holds more than ``high_water`` messages; returns seconds waited."""
    waited = 0.0
    while sender.queue_depth() > high_water:
        sleep(poll_s)
        waited += poll_s
    return waited


def job_encoder_label(settings: Settings, repo: MetadataRepo) -> str:
    """The encoder id a job is recorded under (the live one: the dispatcher never loads a model)."""
    live = next((v for v in repo.versions() if v.is_live), None)
    if live is not None:
        return live.encoder_id
    return EncoderId(settings.clip_model, settings.clip_pretrained).label


def dispatch_source(
    source: str | Path,
    settings: Settings,
    sender: TaskSender,
    *,
    limit: int | None = None,
    progress: bool = True,
    ledger: IngestLedger | None = None,
) -> dict[str, Any]:
    """Submit every row of ``source`` to the embed queue; resumes an unfinished job of the same source."""
    path = Path(source).expanduser()
    rows: Iterator[InputRow] = iter_source(path, settings)
    ledger = ledger or IngestLedger.from_url(settings.resolved_database_url)
    kind = source_kind(path) + ASYNC_KIND_SUFFIX
    cursor = ledger.open_job(str(path.resolve()), kind, job_encoder_label(settings, ledger.repo))
    total = limit
    if limit is not None:
        rows = itertools.islice(rows, limit)
    rows = itertools.islice(rows, cursor.next_seq, None)  # rows before the cursor are in the ledger already
    next_seq, waited = cursor.next_seq, 0.0
    chunk_size = max(1, settings.ingest_batch_size)
    try:
        with tqdm(total=total, initial=next_seq, unit="row", desc="enqueue", disable=not progress,
                  dynamic_ncols=True) as bar:
            while chunk := list(itertools.islice(rows, chunk_size)):
                waited += wait_for_capacity(sender, settings.embed_queue_high_water)
                refs = ledger.submit(cursor.job_id, next_seq, chunk)
                sender.send(refs)
                next_seq += len(chunk)
                ledger.save_cursor(cursor.job_id, {"next_seq": next_seq})
                bar.update(len(chunk))
    except (SourceError, ManifestError) as exc:
        # The source itself is unusable (no 'image' column, unreadable file): rerunning will not help, so
        # the job ends failed with the reason instead of staying "running" for ever.
        ledger.repo.finish_job(cursor.job_id, JobStatus.FAILED, error=str(exc))
        raise
    except BaseException as exc:
        log.error("dispatch of %s stopped at row %d (%s): run the same command to resume", path, next_seq, exc)
        raise
    ledger.save_cursor(cursor.job_id, {"next_seq": next_seq, "dispatched": True})
    from app.services.ingest import job_summary

    summary = job_summary(ledger.repo, cursor.job_id)
    return summary | {"submitted": next_seq, "resumed": cursor.resumed, "backpressure_wait_s": round(waited, 3)}


def resend_lost(settings: Settings, sender: TaskSender, *, ledger: IngestLedger | None = None) -> int:
    """Send again the rows whose message was lost; run by the beat schedule.

    Only when the embed queue is drained: a row whose message still waits in the queue is not lost, and
    re-sending under a backlog would only grow it. Rows are lost when they are older than
    ``ingest_stale_after_s`` and no worker claimed them within that time.
    """
    ledger = ledger or IngestLedger.from_url(settings.resolved_database_url)
    if sender.queue_depth() > 0:
        return 0
    refs = ledger.lost_tasks(settings.ingest_stale_after_s)
    if refs:
        ledger.mark_resent(refs)
        sender.send(refs)
        log.warning("re-sent %d ingest rows whose messages were lost", len(refs))
    return len(refs)


def wait_for_job(ledger: IngestLedger, job_id: int, *, timeout_s: float | None = None,
                 poll_s: float = 1.0) -> dict[str, Any]:
    """Poll until the job completed (every row embedded or failed); returns its summary."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = ledger.repo.get_job(job_id)
        if job is not None and job.status != JobStatus.RUNNING:
            from app.services.ingest import job_summary

            return job_summary(ledger.repo, job_id)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"ingest job {job_id} still running after {timeout_s} s: {ledger.task_states(job_id)}")
        time.sleep(poll_s)


# --- the worker's decoder ------------------------------------------------------------------------
def make_decoder(
    settings: Settings, encoder: Encoder, pool: ThreadPoolExecutor | None = None
) -> Callable[[Sequence[InputRow]], list[PreparedItem | FailedInput]]:
    """Rows → decoded, preprocessed inputs, in ``pool`` (``decode_workers`` threads) when given."""
    from app.imaging import PixelBudget

    limits = ImageLimits.from_settings(settings)
    budget = PixelBudget(settings.ingest_max_rss_mb * 1024 * 1024 // 4)  # as in ingestion.pipeline
    fit = getattr(encoder, "image_size", None)

    def one(row: InputRow) -> PreparedItem | FailedInput:
        outcome = decode_row(row, limits, fit=fit, budget=budget)  # downscaled right after decoding
        if isinstance(outcome, Rejected):
            return outcome  # the same type: a decode failure is an ingest failure as it is
        return _prepared(outcome, encoder)

    def decode(rows: Sequence[InputRow]) -> list[PreparedItem | FailedInput]:
        if pool is None or len(rows) <= 1:
            return [one(row) for row in rows]
        return list(pool.map(one, rows))

    return decode


def _prepared(decoded: Decoded, encoder: Encoder) -> PreparedItem | FailedInput:
    from app.services.ingest import FailedInput, PreparedItem

    try:
        pixels = encoder.preprocess(decoded.image)
    except Exception as exc:  # noqa: BLE001 - an image the transform cannot take is that item's failure
        from app.schemas import RejectReason

        return FailedInput(decoded.source, RejectReason.CORRUPT, f"preprocess: {type(exc).__name__}: {exc}")
    width, height = decoded.image.info.get("original_size", decoded.image.size)
    return PreparedItem(row=decoded.row, image_hash=decoded.image_hash, size_bytes=decoded.size_bytes,
                        pixels=pixels, width=width, height=height)
