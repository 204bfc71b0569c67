"""Asynchronous ingestion, the app side: one micro-batch of ledger rows through the ingest service.

The embed worker hands a batch of :class:`~app.services.ingest_ledger.TaskRef` (ids only) to
:meth:`EmbedBatchService.process`: the rows still queued are claimed, decoded (the caller's decoder,
a thread pool), written by :class:`~app.services.ingest.IngestService` (DB pending → Qdrant upsert →
DB embedded) and every row leaves the ledger once, embedded or failed with a reason.

Errors: a *transient* error (database, Qdrant or broker unreachable) propagates, so the worker retries
the whole batch later — nothing was marked, and the writes are idempotent. Any other error is taken to
be the input's: the batch is split and retried item by item, and the item that still fails is recorded
as failed with the error as detail, so one poison item never blocks the others.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.db.repo import MetadataRepo
from app.memory.base import item_id_for
from app.schemas import EmbedStatus, RejectReason
from app.services.ingest import FailedInput, IngestService, PreparedItem, clean_caption, row_problem
from app.services.ingest_ledger import ClaimedTask, IngestLedger, TaskOutcome, TaskRef

if TYPE_CHECKING:
    from app.manifest import InputRow

log = logging.getLogger(__name__)

# Rows → decoded inputs, same length and order (the worker passes ingestion's thread-pool decoder).
Decoder = Callable[[Sequence["InputRow"]], list[PreparedItem | FailedInput]]

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later: a service was unreachable or busy, not a problem with the input."""
    from sqlalchemy import exc as sa_exc

    from app.memory.base import MemoryHeldElsewhere

    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MemoryHeldElsewhere):
        return True  # the old owner is still shutting down
    if _is_transient_qdrant(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def _is_transient_qdrant(exc: BaseException) -> bool:
    try:
        import httpx
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
    except ImportError:  # pragma: no cover - both ship with qdrant-client
        return False
    if isinstance(exc, ResponseHandlingException | httpx.TransportError):
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in {429, 500, 502, 503, 504}
    try:
        import grpc

        if isinstance(exc, grpc.RpcError):
            return exc.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    except ImportError:
        pass
    return False


@dataclass
class BatchReport:
    received: int = 0
    claimed: int = 0  # still queued when the batch started (the rest: an earlier delivery did them)
    embedded: int = 0
    failed: int = 0
    moved: int = 0  # ledger rows this call moved out of ``queued``
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


class EmbedBatchService:
    """Constructor arguments: the ingest service (encoder, memory, repo) and the decoder."""

    def __init__(self, ingest: IngestService, decode: Decoder, *, ledger: IngestLedger | None = None) -> None:
        self.ingest = ingest
        self.decode = decode
        self.ledger = ledger or IngestLedger(ingest.repo)

    def process(self, refs: Sequence[TaskRef]) -> BatchReport:
        started = time.perf_counter()
        report = BatchReport(received=len(refs))
        claimed = self.ledger.claim(sorted(set(refs)))
        report.claimed = len(claimed)
        if claimed:
            inputs = self.decode([c.row for c in claimed])
            try:
                outcomes = self._write(claimed, inputs)
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.exception("batch of %d failed; retrying item by item", len(claimed))
                outcomes = [self._write_one(c, i) for c, i in zip(claimed, inputs, strict=True)]
            report.moved = self.ledger.finish(outcomes)
            for o in outcomes:
                if o.state == EmbedStatus.EMBEDDED:
                    report.embedded += 1
                else:
                    report.failed += 1
                    report.reasons[o.reason or "?"] = report.reasons.get(o.reason or "?", 0) + 1
        report.seconds = time.perf_counter() - started
        return report

    def _write_one(self, task: ClaimedTask, prepared: PreparedItem | FailedInput) -> TaskOutcome:
        try:
            return self._write([task], [prepared])[0]
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("item %s failed", task.row.source)
            return TaskOutcome(task.ref, EmbedStatus.FAILED, task.row.source, reason=RejectReason.STORE_ERROR,
                               detail=f"{type(exc).__name__}: {exc}")

    def _write(self, tasks: Sequence[ClaimedTask], inputs: Sequence[PreparedItem | FailedInput]) -> list[TaskOutcome]:
        """Decode failures and caption problems are outcomes at once; the rest go through write_batch."""
        settings = self.ingest.settings
        outcomes: dict[TaskRef, TaskOutcome] = {}
        expected: dict[TaskRef, str] = {}
        to_write: list[PreparedItem] = []
        for task, item in zip(tasks, inputs, strict=True):
            if isinstance(item, FailedInput):
                outcomes[task.ref] = TaskOutcome(task.ref, EmbedStatus.FAILED, task.row.source,
                                                 reason=str(item.reason), detail=item.detail)
                continue
            caption, problem = clean_caption(item.row.caption, max_chars=settings.max_caption_chars,
                                             required=settings.require_caption)
            problem = row_problem(item.row) or problem
            if problem is not None:
                outcomes[task.ref] = TaskOutcome(task.ref, EmbedStatus.FAILED, task.row.source,
                                                 reason=str(problem.reason), detail=problem.detail)
                continue
            expected[task.ref] = item_id_for(item.image_hash, caption)
            to_write.append(item)
        if to_write:
            self.ingest.write_batch(None, to_write)  # transient store errors propagate from here
        states = self.ledger.embedding_outcomes(sorted(set(expected.values())), self.ingest.encoder_id)
        if len(to_write) > 1:  # write_batch fails a whole batch on an encoder error: find the one item at fault
            by_ref = dict(zip((t.ref for t in tasks), zip(tasks, inputs, strict=True), strict=True))
            for ref, item_id in expected.items():
                if states.get(item_id, ("",))[0] == EmbedStatus.FAILED:
                    outcomes[ref] = self._write([by_ref[ref][0]], [by_ref[ref][1]])[0]
        for task in tasks:
            if task.ref in outcomes:
                continue
            item_id = expected[task.ref]
            status, reason, detail = states.get(item_id, (EmbedStatus.PENDING, None, None))
            if status == EmbedStatus.EMBEDDED:
                outcomes[task.ref] = TaskOutcome(task.ref, EmbedStatus.EMBEDDED, task.row.source, item_id=item_id)
            elif status == EmbedStatus.FAILED:
                outcomes[task.ref] = TaskOutcome(task.ref, EmbedStatus.FAILED, task.row.source, item_id=item_id,
                                                 reason=reason or RejectReason.ENCODE_ERROR, detail=detail)
            else:
                raise RuntimeError(f"item {item_id} ({task.row.source}) is still {status} after its batch")
        return [outcomes[t.ref] for t in tasks]


def retry_delay_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Exponential backoff for transient errors: 1, 2, 4 … seconds, capped."""
    return float(min(cap_s, base_s * (2 ** max(0, attempt))))


def stale_pending_rows(
    repo: MetadataRepo, encoder_id: str, older_than_s: float, limit: int = 5_000
) -> list[InputRow]:
    """Items left *pending* longer than ``older_than_s`` (a crash mid-batch, or reconcile found their vectors
    missing), as rows to ingest again from their source file; their ids do not change."""
    from datetime import timedelta

    from sqlalchemy import select

    from app.db.models import Embedding, Item, utcnow
    from app.manifest import InputRow

    ceiling = utcnow() - timedelta(seconds=older_than_s)
    stmt = (select(Item).join(Embedding, Embedding.item_id == Item.id)
            .where(Embedding.encoder_id == encoder_id, Embedding.status == EmbedStatus.PENDING,
                   Embedding.updated_at < ceiling).order_by(Item.id).limit(limit))
    with repo.session() as s:
        items = list(s.scalars(stmt))
    rows = []
    for item in items:
        path = Path(item.source_uri)
        problem = None if path.is_absolute() else (RejectReason.MISSING, f"no local file to re-read: {item.source_uri}")
        rows.append(InputRow(source=item.source_uri, path=path if problem is None else None, url=None,
                             caption=item.caption, label=item.label, split=item.split, dataset=item.dataset,
                             extra=dict(item.extra or {}), problem=problem))
    return rows
