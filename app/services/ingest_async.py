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
from typing import TYPE_CHECKING

from app.db.ingest_errors import transient_database_error
from app.db.ingest_queries import pending_since_before
from app.db.models import utcnow
from app.db.repo import MetadataRepo
from app.schemas import EmbedStatus, RejectReason
from app.services.ingest import FailedInput, IngestService, ItemResult, PreparedItem
from app.services.ingest_ledger import ClaimedTask, IngestLedger, TaskOutcome, TaskRef
from app.services.ingest_write import row_of_item

if TYPE_CHECKING:
    from app.manifest import InputRow

log = logging.getLogger(__name__)

# Rows → decoded inputs, same length and order (the worker passes ingestion's thread-pool decoder).
Decoder = Callable[[Sequence["InputRow"]], list[PreparedItem | FailedInput]]

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later: a service was unreachable or busy, not a problem with the input."""
    from app.memory.base import MemoryHeldElsewhere

    database = transient_database_error(exc)
    if database is not None:
        return database
    if isinstance(exc, ConnectionError | TimeoutError):
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
        """The batch through the ingest service, one outcome per row (transient store errors propagate)."""
        results = self.ingest.write_items(inputs)
        broken = [n for n, r in enumerate(results)
                  if r.failure is not None and r.failure.reason == RejectReason.ENCODE_ERROR]
        if len(broken) > 1:  # the encoder failed the whole batch: find the one item at fault
            return [self._write([task], [item])[0] if n in broken else _outcome(task, results[n])
                    for n, (task, item) in enumerate(zip(tasks, inputs, strict=True))]
        return [_outcome(task, result) for task, result in zip(tasks, results, strict=True)]


def _outcome(task: ClaimedTask, result: ItemResult) -> TaskOutcome:
    if result.failure is None:
        return TaskOutcome(task.ref, EmbedStatus.EMBEDDED, task.row.source, item_id=result.item_id)
    return TaskOutcome(task.ref, EmbedStatus.FAILED, task.row.source, item_id=result.item_id,
                       reason=str(result.failure.reason), detail=result.failure.detail)


def retry_delay_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Exponential backoff for transient errors: 1, 2, 4 … seconds, capped."""
    return float(min(cap_s, base_s * (2 ** max(0, attempt))))


def stale_pending_rows(
    repo: MetadataRepo, encoder_id: str, older_than_s: float, limit: int = 5_000
) -> list[InputRow]:
    """Items left *pending* longer than ``older_than_s`` (a crash mid-batch, or reconcile found their vectors
    missing), as rows to ingest again from their source file; their ids do not change."""
    from datetime import timedelta

    items = pending_since_before(repo, encoder_id, utcnow() - timedelta(seconds=older_than_s), limit)
    return [row_of_item(item) for item in items]

