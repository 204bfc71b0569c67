"""The metadata side of a folder watch (:mod:`ingestion.watch`): what its job's ledger already holds."""

from __future__ import annotations

from sqlalchemy import func, select

from app.db.models import IngestTask
from app.db.repo import MetadataRepo


def watch_ledger_state(repo: MetadataRepo, job_id: int) -> tuple[set[str], int]:
    """``(content keys the job's tasks carry, the next task sequence number)``, read in one transaction."""
    with repo.session() as s:
        known = {(row or {}).get("watch_key") for row in
                 s.scalars(select(IngestTask.row).where(IngestTask.job_id == job_id))}
        last_seq = s.scalar(select(func.max(IngestTask.seq)).where(IngestTask.job_id == job_id))
        next_seq = 0 if last_seq is None else int(last_seq) + 1  # (a max of 0 is a row, not "none yet")
    known.discard(None)
    return {str(k) for k in known}, next_seq
