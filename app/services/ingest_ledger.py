"""The exactly-once ledger of asynchronous ingestion (table ``ingest_tasks``).

Every submitted row gets a ledger row (state ``queued``) committed *before* its message is sent. A
worker claims the rows of a micro-batch, and moves each to ``embedded`` or ``failed`` with a conditional
update (``WHERE state = 'queued'``): a redelivered message, or a row sent twice, changes nothing the
second time. Job counts are recounted from the ledger, never incremented, so they cannot drift.

Rows whose message was lost (a broker restarted without persistence, a message dropped after its
retries ran out) stay ``queued``: :meth:`IngestLedger.lost_tasks` finds them and the maintenance task
sends them again. A job is complete when its source was fully dispatched and no row is still queued.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from app.db.ingest_ledger import QUEUED, LedgerQueries
from app.db.models import IngestJob, utcnow
from app.db.repo import MetadataRepo
from app.manifest import InputRow
from app.schemas import EmbedStatus, JobStatus, RejectReason

__all__ = ["QUEUED", "ClaimedTask", "IngestLedger", "JobCursor", "TaskOutcome", "TaskRef", "row_from_json",
           "row_to_json"]


@dataclass(frozen=True, order=True)
class TaskRef:
    """What a message carries: ids only."""

    job_id: int
    seq: int


@dataclass(frozen=True)
class ClaimedTask:
    ref: TaskRef
    row: InputRow


@dataclass(frozen=True)
class TaskOutcome:
    ref: TaskRef
    state: EmbedStatus  # EMBEDDED or FAILED
    source: str
    item_id: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class JobCursor:
    job_id: int
    next_seq: int  # first row number not yet dispatched
    resumed: bool
    state: dict[str, Any]  # the job's cursor JSON (watch folders keep their scan state here)


# --- InputRow <-> JSON -----------------------------------------------------------------------------
def row_to_json(row: InputRow) -> dict[str, Any]:
    return {
        "source": row.source, "path": None if row.path is None else str(row.path), "url": row.url,
        "caption": row.caption, "label": row.label, "split": row.split, "dataset": row.dataset,
        "extra": dict(row.extra), "problem": None if row.problem is None else [str(row.problem[0]), row.problem[1]],
    }


def row_from_json(data: dict[str, Any]) -> InputRow:
    problem = data.get("problem")
    return InputRow(
        source=data["source"], path=None if data.get("path") is None else Path(data["path"]), url=data.get("url"),
        caption=data.get("caption", ""), label=data.get("label"), split=data.get("split"),
        dataset=data.get("dataset"), extra=dict(data.get("extra") or {}),
        problem=None if problem is None else (RejectReason(problem[0]), str(problem[1])),
    )


class IngestLedger:
    """Constructor arguments: explicit, or built from a database URL (:meth:`from_url`)."""

    def __init__(self, repo: MetadataRepo) -> None:
        self.repo = repo
        self.queries = LedgerQueries(repo)

    @classmethod
    def from_url(cls, url: str) -> IngestLedger:
        return cls(MetadataRepo.from_url(url))

    # --- jobs ---------------------------------------------------------------------------------
    def open_job(self, source: str, kind: str, encoder_id: str, *, resume: bool = True) -> JobCursor:
        """The unfinished job of this source and kind (a dispatcher that crashed), or a new one."""
        found = self.queries.running_job(source, kind) if resume else None
        if found is not None and not found[1].get("dispatched"):
            job_id, state = found
            return JobCursor(job_id, int(state.get("next_seq", 0)), True, state)
        return JobCursor(self.queries.create_job(source, kind, encoder_id, {"next_seq": 0}), 0, False, {"next_seq": 0})

    def save_cursor(self, job_id: int, state: dict[str, Any]) -> None:
        """The dispatcher's resume point; ``dispatched: true`` once the whole source was sent."""
        self.queries.set_cursor(job_id, state)
        if state.get("dispatched"):
            self.refresh_job(job_id)

    def jobs(self, *, kind: str | None = None, status: JobStatus | None = None) -> list[IngestJob]:
        return self.queries.jobs(kind=kind, status=status)

    # --- submitting -----------------------------------------------------------------------------
    def submit(self, job_id: int, start_seq: int, rows: Sequence[InputRow],
               keys: Sequence[str] | None = None) -> list[TaskRef]:
        """Ledger rows ``start_seq …`` (idempotent); returns the refs still queued, to be sent.

        ``keys``: a content key per row (watch folders: image hash + caption), kept with the row."""
        if not rows:
            return []
        values = [(start_seq + n, row.source, row_to_json(row) | ({"watch_key": keys[n]} if keys is not None else {}))
                  for n, row in enumerate(rows)]
        return [TaskRef(job_id, seq) for seq in self.queries.insert_queued(job_id, values)]

    def lost_tasks(self, older_than_s: float, limit: int = 5_000) -> list[TaskRef]:
        """Rows queued (and not claimed) for longer than ``older_than_s``: their message is presumed lost."""
        ceiling = utcnow() - timedelta(seconds=older_than_s)
        return [TaskRef(j, q) for j, q in self.queries.queued_before(ceiling, limit)]

    def mark_resent(self, refs: Sequence[TaskRef]) -> None:
        self.queries.mark_resent(_by_job(refs))

    # --- a worker's side --------------------------------------------------------------------------
    def claim(self, refs: Sequence[TaskRef]) -> list[ClaimedTask]:
        """The rows among ``refs`` still queued (others were finished by an earlier delivery)."""
        claimed = [ClaimedTask(TaskRef(j, q), row_from_json(row)) for j, q, row in self.queries.claim(_by_job(refs))]
        return sorted(claimed, key=lambda c: c.ref)

    def finish(self, outcomes: Iterable[TaskOutcome]) -> int:
        """Each row leaves ``queued`` once; failures are recorded once. Returns how many rows moved."""
        outcomes = list(outcomes)
        moved = self.queries.finish(
            [(o.ref.job_id, o.ref.seq, o.item_id) for o in outcomes if o.state == EmbedStatus.EMBEDDED],
            [(o.ref.job_id, o.ref.seq, o.source, o.item_id, o.reason, o.detail)
             for o in outcomes if o.state == EmbedStatus.FAILED])
        for job_id in sorted({o.ref.job_id for o in outcomes}):
            self.refresh_job(job_id)
        return moved

    # --- counts -----------------------------------------------------------------------------------
    def refresh_job(self, job_id: int) -> dict[str, int]:
        """Recount the job from its ledger (under a row lock) and complete it when nothing is left.

        ingested = distinct items this job embedded that did not exist before it started; every other
        embedded row is a duplicate (of an earlier item, or of an earlier row of the same job).
        """
        return self.queries.recount(job_id)

    def task_states(self, job_id: int) -> dict[str, int]:
        return self.queries.task_states(job_id)


def _by_job(refs: Iterable[TaskRef]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ref in refs:
        out.setdefault(ref.job_id, []).append(ref.seq)
    return out
