"""Ingest jobs in the serving service: queued in this process one at a time, with progress, cancel and
their failures."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.schemas import JobStatus
from app.services.serving_live import ServingBase
from app.services.serving_models import FailureOut, JobOut

log = logging.getLogger("app.services.serving")  # the service logs under one name, whichever part


class JobServing(ServingBase):
    """Ingest jobs (see :class:`app.services.serving.ServingService`)."""

    def start_ingest(self, source: Path, *, kind: str, total: int | None = None,
                     cleanup: Callable[[], None] | None = None, dataset: str | None = None,
                     caption_template: str | None = None) -> JobOut:
        """Queue an ingestion of ``source`` (one job at a time, in this process); returns the job at once.

        ``total`` (rows to go through) is counted in the job's thread when not given, so every job has a
        progress; ``dataset`` names the items; ``caption_template`` captions class-folder trees."""
        if self._ingest_runner is None:
            raise RuntimeError("this serving service was built without an ingest runner")
        from app.services.ingest import IngestService

        live = self.live(max_age_s=0)
        ingest = IngestService(self.settings, encoder=live.encoder, repo=self.repo)
        job_id = ingest.start_job(str(source), kind)
        self._job_totals[job_id] = total
        cancel = self._job_cancel[job_id] = threading.Event()
        runner = self._ingest_runner
        options: dict[str, Any] = {k: v for k, v in (("dataset", dataset), ("caption_template", caption_template))
                                   if v}

        def work() -> dict[str, Any]:
            try:
                if cancel.is_set():  # cancelled while it waited for the job before it
                    ingest.finish_job(job_id, JobStatus.CANCELLED, "cancelled before it started")
                    return {"job_id": job_id, "status": JobStatus.CANCELLED}
                if self._job_totals.get(job_id) is None:  # the runner counts the rows first
                    options["on_total"] = lambda n: self._job_totals.__setitem__(job_id, n)
                return runner(source, self.settings, service=ingest, job_id=job_id, progress=False,
                              cancelled=cancel.is_set, **options)
            except Exception as exc:
                log.exception("ingest job %d failed", job_id)
                ingest.finish_job(job_id, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if cleanup is not None:
                    cleanup()

        self._job_futures[job_id] = self._jobs.submit(work)
        return self.get_job(job_id)

    def cancel_job(self, job_id: int) -> JobOut:
        """Ask a job to stop: between two batches it ends as *cancelled*; what it stored stays. A job that
        already ended is returned as it is."""
        job = self.get_job(job_id, failures=0)
        event = self._job_cancel.get(job_id)
        if job.status == JobStatus.RUNNING and event is not None:
            event.set()
            log.warning("ingest job %d: cancel requested", job_id)
        elif job.status == JobStatus.RUNNING:
            raise LookupError(f"ingest job {job_id} is not run by this process (an embed worker's job)")
        return self.get_job(job_id)

    def get_job(self, job_id: int, *, failures: int = 200) -> JobOut:
        job = self.repo.get_job(job_id)
        if job is None:
            raise LookupError(f"no ingest job {job_id}")
        return JobOut(id=job.id, source=job.source, kind=job.kind, status=job.status, seen=job.seen,
                      ingested=job.ingested, duplicates=job.duplicates, failed=job.failed,
                      total=self._job_totals.get(job_id),
                      cancel_requested=bool(job_id in self._job_cancel and self._job_cancel[job_id].is_set()),
                      error=job.error, started_at=job.started_at,
                      finished_at=job.finished_at,
                      failures=[FailureOut(source=f.source, reason=f.reason, detail=f.detail)
                                for f in self.repo.job_failures(job_id, limit=failures)])

    def recent_jobs(self, limit: int = 20) -> list[JobOut]:
        return [self.get_job(j.id, failures=0) for j in self.repo.recent_jobs(limit)]

    def wait_for_job(self, job_id: int, timeout_s: float | None = None) -> JobOut:
        future = self._job_futures.get(job_id)
        if future is not None:
            future.exception(timeout=timeout_s)
        return self.get_job(job_id)

    def queue_depth(self) -> int:
        return sum(1 for f in self._job_futures.values() if not f.done())
