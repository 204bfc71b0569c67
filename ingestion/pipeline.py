"""Synchronous, in-process ingestion: source rows → safe decode → batched writes through the app service."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.config import Settings
from app.imaging import ImageLimits
from app.manifest import InputRow
from app.schemas import JobStatus
from app.services.ingest import FailedInput, IngestService, PreparedItem, job_summary
from ingestion.decode import Decoded, Rejected, decode_rows
from ingestion.sources import iter_source, source_kind

log = logging.getLogger(__name__)


def to_service_input(outcome: Decoded | Rejected) -> PreparedItem | FailedInput:
    if isinstance(outcome, Rejected):
        return FailedInput(outcome.source, outcome.reason, outcome.detail)
    return PreparedItem(row=outcome.row, image_hash=outcome.image_hash, size_bytes=outcome.size_bytes,
                        image=outcome.image)


def batched(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def ingest_source(
    source: str | Path,
    settings: Settings,
    *,
    limit: int | None = None,
    service: IngestService | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest every row of a folder or manifest; returns the job summary (counts + failures)."""
    path = Path(source).expanduser()
    rows: Iterator[InputRow] = iter_source(path, settings)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    service = service or IngestService(settings)
    job_id = service.start_job(str(path.resolve()), source_kind(path))
    limits = ImageLimits.from_settings(settings)
    try:
        with tqdm(total=limit, unit="item", desc="ingest", disable=not progress, dynamic_ncols=True) as bar:
            for chunk in batched(rows, settings.ingest_batch_size):
                outcomes = decode_rows(chunk, limits, workers=settings.decode_workers)
                result = service.write_batch(job_id, [to_service_input(o) for o in outcomes])
                bar.update(len(chunk))
                bar.set_postfix(new=result.ingested, dup=result.duplicates, failed=result.failed, refresh=False)
    except BaseException as exc:
        service.finish_job(job_id, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    service.finish_job(job_id, JobStatus.COMPLETED)
    return job_summary(service.repo, job_id)
