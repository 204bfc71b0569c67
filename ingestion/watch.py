"""Continuous ingestion from a folder: new image files and new manifest rows are submitted as they appear.

One long-lived ingest job (kind ``watch``) per folder holds the state in the database, so a scan picks
up exactly what the previous scans (of any process: ``reco ingest --watch``, the beat-scheduled scan)
have not submitted yet, and a crash loses nothing:

- a folder holding manifests (``*.csv``, ``*.jsonl`` …) is followed through them: rows appended to a
  manifest are new rows; its images are found through it (so they are not taken twice);
- a folder without manifests is followed file by file (images + same-name ``.txt`` captions).

Every candidate row is keyed by its ``source`` (a file path, or ``manifest:line``); a row whose source
the job's ledger already holds is never submitted again. Files younger than ``settle_s`` are left for
the next scan (a copy still in progress), and so is a manifest's last line until it ends with a newline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from app.db.models import IngestTask
from app.manifest import MANIFEST_SUFFIXES, InputRow, read_manifest
from app.services.ingest_ledger import IngestLedger
from ingestion.dispatch import TaskSender, job_encoder_label, wait_for_capacity
from ingestion.sources import iter_folder

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

WATCH_KIND = "watch"
SETTLE_S = 2.0


def _manifests(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES)


def _settled(path: Path, settle_s: float, now: float) -> bool:
    try:
        return now - path.stat().st_mtime >= settle_s
    except OSError:
        return False


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return True
        fh.seek(size - 1)
        return fh.read(1) in (b"\n", b"\r")


def _manifest_rows(manifest: Path, settings: Settings) -> Iterator[InputRow]:
    """Rows of complete lines only: an unterminated last line may still be being written."""
    complete = _ends_with_newline(manifest)
    rows = read_manifest(manifest, allowed_roots=tuple(settings.allowed_roots), allow_urls=settings.allow_url_sources)
    last: InputRow | None = None
    for row in rows:
        if last is not None:
            yield last
        last = row
    if last is not None and complete:
        yield last


def candidate_rows(folder: Path, settings: Settings, *, settle_s: float = SETTLE_S) -> Iterator[InputRow]:
    now = time.time()
    manifests = _manifests(folder)
    if manifests:
        for manifest in manifests:
            if _settled(manifest, settle_s, now) or settle_s <= 0:
                yield from _manifest_rows(manifest, settings)
        return
    for row in iter_folder(folder, allowed_roots=tuple(settings.allowed_roots)):
        if row.path is None or _settled(row.path, settle_s, now):
            yield row


def scan_once(
    folder: str | Path, settings: Settings, sender: TaskSender, *, ledger: IngestLedger | None = None,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """Submit what appeared in ``folder`` since the last scan; returns the watch job id and counts."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"watch folder {root} does not exist or is not a folder")
    ledger = ledger or IngestLedger.from_url(settings.resolved_database_url)
    cursor = ledger.open_job(str(root), WATCH_KIND, job_encoder_label(settings, ledger.repo))
    with ledger.repo.session() as s:
        known = set(s.scalars(select(IngestTask.source).where(IngestTask.job_id == cursor.job_id)))
        next_seq = int(s.scalar(select(func.max(IngestTask.seq)).where(IngestTask.job_id == cursor.job_id))
                       or -1) + 1
    new_rows = [row for row in candidate_rows(root, settings, settle_s=settle_s) if row.source not in known]
    submitted = 0
    for start in range(0, len(new_rows), max(1, settings.ingest_batch_size)):
        chunk = new_rows[start: start + settings.ingest_batch_size]
        wait_for_capacity(sender, settings.embed_queue_high_water)
        sender.send(ledger.submit(cursor.job_id, next_seq, chunk))
        next_seq += len(chunk)
        submitted += len(chunk)
    ledger.save_cursor(cursor.job_id, {"next_seq": next_seq, "scanned_at": time.time()})
    if submitted:
        log.info("watch %s: submitted %d new rows", root, submitted)
    return {"job_id": cursor.job_id, "folder": str(root), "submitted": submitted, "known": len(known)}


def watched_folders(settings: Settings, ledger: IngestLedger) -> list[Path]:
    """Folders from ``RECO_WATCH_DIRS`` plus those of running watch jobs (``reco ingest --watch``)."""
    from app.schemas import JobStatus

    folders = {Path(p).expanduser().resolve() for p in settings.watch_dirs}
    folders |= {Path(job.source) for job in ledger.jobs(kind=WATCH_KIND, status=JobStatus.RUNNING)}
    return sorted(folders)


def watch(
    folder: str | Path, settings: Settings, sender: TaskSender, *, stop: threading.Event | None = None,
    interval_s: float | None = None, max_scans: int | None = None,
) -> int:
    """Scan every ``interval_s`` (default ``watch_interval_s``) until ``stop`` is set; returns rows submitted."""
    stop = stop or threading.Event()
    interval = settings.watch_interval_s if interval_s is None else interval_s
    ledger = IngestLedger.from_url(settings.resolved_database_url)
    total, scans = 0, 0
    while not stop.is_set():
        try:
            total += scan_once(folder, settings, sender, ledger=ledger)["submitted"]
        except NotADirectoryError:
            raise
        except Exception:  # noqa: BLE001 - a broker or DB blip must not end the watch; the next scan retries
            log.exception("watch scan of %s failed; retrying in %.1f s", folder, interval)
        scans += 1
        if max_scans is not None and scans >= max_scans:
            break
        stop.wait(interval)
    return total
