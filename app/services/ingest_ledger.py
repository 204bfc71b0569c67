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

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update

from app.db.models import Embedding, IngestFailure, IngestJob, IngestTask, Item, utcnow
from app.db.repo import MetadataRepo, _insert_ignore
from app.manifest import InputRow
from app.schemas import EmbedStatus, JobStatus, RejectReason

QUEUED = "queued"


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


def _cursor(job: IngestJob) -> dict[str, Any]:
    try:
        data = json.loads(job.cursor or "{}")
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


class IngestLedger:
    """Constructor arguments: explicit, or built from a database URL (:meth:`from_url`)."""

    def __init__(self, repo: MetadataRepo) -> None:
        self.repo = repo

    @classmethod
    def from_url(cls, url: str) -> IngestLedger:
        return cls(MetadataRepo.from_url(url))

    # --- jobs ---------------------------------------------------------------------------------
    def open_job(self, source: str, kind: str, encoder_id: str, *, resume: bool = True) -> JobCursor:
        """The unfinished job of this source and kind (a dispatcher that crashed), or a new one."""
        with self.repo.session() as s:
            job = None
            if resume:
                job = s.scalars(select(IngestJob).where(
                    IngestJob.source == source, IngestJob.kind == kind, IngestJob.status == JobStatus.RUNNING,
                ).order_by(IngestJob.id.desc()).limit(1)).first()
            if job is not None and not _cursor(job).get("dispatched"):
                state = _cursor(job)
                return JobCursor(job.id, int(state.get("next_seq", 0)), True, state)
            job = IngestJob(source=source, kind=kind, encoder_id=encoder_id, status=JobStatus.RUNNING,
                            seen=0, ingested=0, duplicates=0, failed=0, cursor=json.dumps({"next_seq": 0}))
            s.add(job)
            s.flush()
            return JobCursor(job.id, 0, False, {"next_seq": 0})

    def save_cursor(self, job_id: int, state: dict[str, Any]) -> None:
        """The dispatcher's resume point; ``dispatched: true`` once the whole source was sent."""
        with self.repo.session() as s:
            s.execute(update(IngestJob).where(IngestJob.id == job_id).values(cursor=json.dumps(state)))
        if state.get("dispatched"):
            self.refresh_job(job_id)

    def jobs(self, *, kind: str | None = None, status: JobStatus | None = None) -> list[IngestJob]:
        stmt = select(IngestJob).order_by(IngestJob.id)
        if kind is not None:
            stmt = stmt.where(IngestJob.kind == kind)
        if status is not None:
            stmt = stmt.where(IngestJob.status == status)
        with self.repo.session() as s:
            return list(s.scalars(stmt))

    def job_cursor(self, job_id: int) -> dict[str, Any]:
        job = self.repo.get_job(job_id)
        if job is None:
            raise KeyError(f"no ingest job {job_id}")
        return _cursor(job)

    # --- submitting -----------------------------------------------------------------------------
    def submit(self, job_id: int, start_seq: int, rows: Sequence[InputRow],
               keys: Sequence[str] | None = None) -> list[TaskRef]:
        """Ledger rows ``start_seq …`` (idempotent); returns the refs still queued, to be sent.

        ``keys``: a content key per row (watch folders: image hash + caption), kept with the row."""
        if not rows:
            return []
        now = utcnow()
        values = [{"job_id": job_id, "seq": start_seq + n, "source": row.source,
                   "row": row_to_json(row) | ({"watch_key": keys[n]} if keys is not None else {}),
                   "state": QUEUED, "sends": 1, "enqueued_at": now} for n, row in enumerate(rows)]
        seqs = [v["seq"] for v in values]
        with self.repo.session() as s:
            _insert_ignore(s, IngestTask, values, ["job_id", "seq"])
            queued = s.scalars(select(IngestTask.seq).where(
                IngestTask.job_id == job_id, IngestTask.seq.in_(seqs), IngestTask.state == QUEUED))
            return [TaskRef(job_id, seq) for seq in sorted(queued)]

    def lost_tasks(self, older_than_s: float, limit: int = 5_000) -> list[TaskRef]:
        """Rows queued (and not claimed) for longer than ``older_than_s``: their message is presumed lost."""
        ceiling = utcnow() - timedelta(seconds=older_than_s)
        stmt = (select(IngestTask.job_id, IngestTask.seq)
                .where(IngestTask.state == QUEUED, IngestTask.enqueued_at < ceiling,
                       or_(IngestTask.claimed_at.is_(None), IngestTask.claimed_at < ceiling))
                .order_by(IngestTask.job_id, IngestTask.seq).limit(limit))
        with self.repo.session() as s:
            return [TaskRef(j, q) for j, q in s.execute(stmt)]

    def mark_resent(self, refs: Sequence[TaskRef]) -> None:
        with self.repo.session() as s:
            for job_id, seqs in _by_job(refs).items():
                s.execute(update(IngestTask)
                          .where(IngestTask.job_id == job_id, IngestTask.seq.in_(seqs), IngestTask.state == QUEUED)
                          .values(sends=IngestTask.sends + 1, enqueued_at=utcnow(), claimed_at=None))

    # --- a worker's side --------------------------------------------------------------------------
    def claim(self, refs: Sequence[TaskRef]) -> list[ClaimedTask]:
        """The rows among ``refs`` still queued (others were finished by an earlier delivery)."""
        claimed: list[ClaimedTask] = []
        with self.repo.session() as s:
            for job_id, seqs in _by_job(refs).items():
                cond = and_(IngestTask.job_id == job_id, IngestTask.seq.in_(seqs), IngestTask.state == QUEUED)
                s.execute(update(IngestTask).where(cond).values(claimed_at=utcnow()))
                for seq, row in s.execute(select(IngestTask.seq, IngestTask.row).where(cond)):
                    claimed.append(ClaimedTask(TaskRef(job_id, seq), row_from_json(row)))
        return sorted(claimed, key=lambda c: c.ref)

    def finish(self, outcomes: Iterable[TaskOutcome]) -> int:
        """Each row leaves ``queued`` once; failures are recorded once. Returns how many rows moved."""
        outcomes = list(outcomes)
        embedded = [o for o in outcomes if o.state == EmbedStatus.EMBEDDED]
        moved = 0
        with self.repo.session() as s:
            if embedded:  # one executemany: no side effect depends on which delivery moved a row
                stmt = (update(IngestTask)
                        .where(IngestTask.job_id == bindparam("j"), IngestTask.seq == bindparam("q"),
                               IngestTask.state == QUEUED)
                        .values(state=str(EmbedStatus.EMBEDDED), item_id=bindparam("i"), finished_at=utcnow()))
                params = [{"j": o.ref.job_id, "q": o.ref.seq, "i": o.item_id} for o in embedded]
                moved += int(s.connection().execute(stmt, params).rowcount or 0)
            for o in outcomes:
                if o.state != EmbedStatus.FAILED:
                    continue
                result = s.execute(
                    update(IngestTask)
                    .where(IngestTask.job_id == o.ref.job_id, IngestTask.seq == o.ref.seq, IngestTask.state == QUEUED)
                    .values(state=str(o.state), item_id=o.item_id, reason=o.reason, detail=o.detail,
                            finished_at=utcnow()))
                if getattr(result, "rowcount", 0) == 1:  # else: another delivery recorded it
                    moved += 1
                    s.add(IngestFailure(job_id=o.ref.job_id, source=o.source, reason=o.reason or "", detail=o.detail))
        for job_id in sorted({o.ref.job_id for o in outcomes}):
            self.refresh_job(job_id)
        return moved

    def embedding_outcomes(
        self, item_ids: Sequence[str], encoder_id: str
    ) -> dict[str, tuple[str, str | None, str | None]]:
        """{item id: (status, reason, detail)} under ``encoder_id``."""
        if not item_ids:
            return {}
        with self.repo.session() as s:
            rows = s.execute(select(Embedding.item_id, Embedding.status, Embedding.reason, Embedding.detail)
                             .where(Embedding.encoder_id == encoder_id, Embedding.item_id.in_(list(item_ids))))
            return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # --- counts -----------------------------------------------------------------------------------
    def refresh_job(self, job_id: int) -> dict[str, int]:
        """Recount the job from its ledger (under a row lock) and complete it when nothing is left.

        ingested = distinct items this job embedded that did not exist before it started; every other
        embedded row is a duplicate (of an earlier item, or of an earlier row of the same job).
        """
        with self.repo.session() as s:
            job = s.scalars(select(IngestJob).where(IngestJob.id == job_id).with_for_update()).first()
            if job is None:
                raise KeyError(f"no ingest job {job_id}")
            counts = dict(s.execute(select(IngestTask.state, func.count()).where(IngestTask.job_id == job_id)
                                    .group_by(IngestTask.state)).all())
            ingested = s.scalar(
                select(func.count(func.distinct(IngestTask.item_id)))
                .join(Item, Item.id == IngestTask.item_id)
                .where(IngestTask.job_id == job_id, IngestTask.state == EmbedStatus.EMBEDDED,
                       Item.created_at >= job.started_at)) or 0
            embedded, failed, queued = (
                int(counts.get(k, 0)) for k in (EmbedStatus.EMBEDDED, EmbedStatus.FAILED, QUEUED))
            job.seen = embedded + failed + queued
            job.ingested, job.duplicates, job.failed = int(ingested), embedded - int(ingested), failed
            if _cursor(job).get("dispatched") and queued == 0 and job.status == JobStatus.RUNNING:
                job.status, job.finished_at = JobStatus.COMPLETED, utcnow()
            return {"seen": job.seen, "ingested": job.ingested, "duplicates": job.duplicates, "failed": failed,
                    "queued": queued}

    def task_states(self, job_id: int) -> dict[str, int]:
        with self.repo.session() as s:
            rows = s.execute(select(IngestTask.state, func.count()).where(IngestTask.job_id == job_id)
                             .group_by(IngestTask.state))
            return {str(state): int(n) for state, n in rows}


def _by_job(refs: Iterable[TaskRef]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ref in refs:
        out.setdefault(ref.job_id, []).append(ref.seq)
    return out
