"""The queries of the ingest ledger (tables ``ingest_tasks``, ``ingest_jobs``, ``ingest_failures``).

:class:`~app.services.ingest_ledger.IngestLedger` holds the rules (what a row carries, when a row is lost);
this module holds the statements. A row leaves ``queued`` by a conditional update (``WHERE state = 'queued'``),
so a redelivered message changes nothing the second time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update

from app.db.models import IngestFailure, IngestJob, IngestTask, Item, utcnow
from app.db.repo import MetadataRepo, _insert_ignore
from app.schemas import EmbedStatus, JobStatus

QUEUED = "queued"


def job_cursor_state(job: IngestJob) -> dict[str, Any]:
    """A job's cursor JSON as a dict (empty when missing or unreadable)."""
    try:
        data = json.loads(job.cursor or "{}")
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


class LedgerQueries:
    """Constructor argument: the metadata repo whose sessions the statements run in."""

    def __init__(self, repo: MetadataRepo) -> None:
        self.repo = repo

    # --- jobs ---------------------------------------------------------------------------------
    def running_job(self, source: str, kind: str) -> tuple[int, dict[str, Any]] | None:
        """The newest running job of this source and kind, with its cursor."""
        with self.repo.session() as s:
            job = s.scalars(select(IngestJob).where(
                IngestJob.source == source, IngestJob.kind == kind, IngestJob.status == JobStatus.RUNNING,
            ).order_by(IngestJob.id.desc()).limit(1)).first()
            return None if job is None else (job.id, job_cursor_state(job))

    def create_job(self, source: str, kind: str, encoder_id: str, cursor: dict[str, Any]) -> int:
        with self.repo.session() as s:
            job = IngestJob(source=source, kind=kind, encoder_id=encoder_id, status=JobStatus.RUNNING,
                            seen=0, ingested=0, duplicates=0, failed=0, cursor=json.dumps(cursor))
            s.add(job)
            s.flush()
            return int(job.id)

    def set_cursor(self, job_id: int, state: dict[str, Any]) -> None:
        with self.repo.session() as s:
            s.execute(update(IngestJob).where(IngestJob.id == job_id).values(cursor=json.dumps(state)))

    def jobs(self, *, kind: str | None = None, status: JobStatus | None = None) -> list[IngestJob]:
        stmt = select(IngestJob).order_by(IngestJob.id)
        if kind is not None:
            stmt = stmt.where(IngestJob.kind == kind)
        if status is not None:
            stmt = stmt.where(IngestJob.status == status)
        with self.repo.session() as s:
            return list(s.scalars(stmt))

    # --- tasks --------------------------------------------------------------------------------
    def insert_queued(self, job_id: int, rows: Sequence[tuple[int, str, dict[str, Any]]]) -> list[int]:
        """Rows ``(seq, source, row JSON)`` inserted once (queued); returns the seqs among them still queued."""
        now = utcnow()
        values = [{"job_id": job_id, "seq": seq, "source": source, "row": row, "state": QUEUED, "sends": 1,
                   "enqueued_at": now} for seq, source, row in rows]
        seqs = [v["seq"] for v in values]
        with self.repo.session() as s:
            _insert_ignore(s, IngestTask, values, ["job_id", "seq"])
            queued = s.scalars(select(IngestTask.seq).where(
                IngestTask.job_id == job_id, IngestTask.seq.in_(seqs), IngestTask.state == QUEUED))
            return sorted(queued)

    def queued_before(self, ceiling: datetime, limit: int) -> list[tuple[int, int]]:
        """(job id, seq) of rows queued, and not claimed, since before ``ceiling``."""
        stmt = (select(IngestTask.job_id, IngestTask.seq)
                .where(IngestTask.state == QUEUED, IngestTask.enqueued_at < ceiling,
                       or_(IngestTask.claimed_at.is_(None), IngestTask.claimed_at < ceiling))
                .order_by(IngestTask.job_id, IngestTask.seq).limit(limit))
        with self.repo.session() as s:
            return [(int(j), int(q)) for j, q in s.execute(stmt)]

    def mark_resent(self, by_job: dict[int, list[int]]) -> None:
        with self.repo.session() as s:
            for job_id, seqs in by_job.items():
                s.execute(update(IngestTask)
                          .where(IngestTask.job_id == job_id, IngestTask.seq.in_(seqs), IngestTask.state == QUEUED)
                          .values(sends=IngestTask.sends + 1, enqueued_at=utcnow(), claimed_at=None))

    def claim(self, by_job: dict[int, list[int]]) -> list[tuple[int, int, dict[str, Any]]]:
        """(job id, seq, row JSON) of the rows still queued, stamped claimed."""
        claimed: list[tuple[int, int, dict[str, Any]]] = []
        with self.repo.session() as s:
            for job_id, seqs in by_job.items():
                cond = and_(IngestTask.job_id == job_id, IngestTask.seq.in_(seqs), IngestTask.state == QUEUED)
                s.execute(update(IngestTask).where(cond).values(claimed_at=utcnow()))
                for seq, row in s.execute(select(IngestTask.seq, IngestTask.row).where(cond)):
                    claimed.append((job_id, int(seq), row))
        return claimed

    def finish(self, embedded: Sequence[tuple[int, int, str | None]],
               failed: Sequence[tuple[int, int, str, str | None, str | None, str | None]]) -> int:
        """Rows out of ``queued``: embedded ``(job, seq, item id)``, failed ``(job, seq, source, item id, reason,
        detail)`` (each failure recorded once, by the update that moved its row). Returns how many rows moved."""
        moved = 0
        with self.repo.session() as s:
            if embedded:  # one executemany: no side effect depends on which delivery moved a row
                stmt = (update(IngestTask)
                        .where(IngestTask.job_id == bindparam("j"), IngestTask.seq == bindparam("q"),
                               IngestTask.state == QUEUED)
                        .values(state=str(EmbedStatus.EMBEDDED), item_id=bindparam("i"), finished_at=utcnow()))
                params = [{"j": j, "q": q, "i": i} for j, q, i in embedded]
                moved += int(s.connection().execute(stmt, params).rowcount or 0)
            for job_id, seq, source, item_id, reason, detail in failed:
                result = s.execute(
                    update(IngestTask)
                    .where(IngestTask.job_id == job_id, IngestTask.seq == seq, IngestTask.state == QUEUED)
                    .values(state=str(EmbedStatus.FAILED), item_id=item_id, reason=reason, detail=detail,
                            finished_at=utcnow()))
                if getattr(result, "rowcount", 0) == 1:  # else: another delivery recorded it
                    moved += 1
                    s.add(IngestFailure(job_id=job_id, source=source, reason=reason or "", detail=detail))
        return moved

    def recount(self, job_id: int) -> dict[str, int]:
        """The job's counts from its rows (under a row lock); completed when dispatched and nothing is queued.

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
            if job_cursor_state(job).get("dispatched") and queued == 0 and job.status == JobStatus.RUNNING:
                job.status, job.finished_at = JobStatus.COMPLETED, utcnow()
            return {"seen": job.seen, "ingested": job.ingested, "duplicates": job.duplicates, "failed": failed,
                    "queued": queued}

    def task_states(self, job_id: int) -> dict[str, int]:
        with self.repo.session() as s:
            rows = s.execute(select(IngestTask.state, func.count()).where(IngestTask.job_id == job_id)
                             .group_by(IngestTask.state))
            return {str(state): int(n) for state, n in rows}
