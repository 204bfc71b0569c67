"""Continuous ingestion from a folder: new image files and new manifest rows are submitted as they appear.

One long-lived ingest job (kind ``watch``) per folder holds the state in the database, so a scan picks
up exactly what the previous scans (of any process: ``reco ingest --watch``, the beat-scheduled scan)
have not submitted yet, and a crash loses nothing:

- a folder holding manifests (``*.csv``, ``*.jsonl`` …) is followed through them: rows appended to a
  manifest are new rows; its images are found through it (so they are not taken twice);
- a folder without manifests is followed file by file (images + same-name ``.txt`` captions).

Every candidate row is keyed by its content — the sha256 of the image file's bytes and the caption — so a row
whose key the job's ledger already holds is never submitted again, and every change is: a manifest overwritten
with new rows, a row inserted at the top, an image replaced under the same name, a caption edited or a ``.txt``
caption that arrives after its image (the image is then sent again, with its caption). A file pair (image and
its caption) younger than ``settle_s`` is left for the next scan (a copy still in progress), and so is a
manifest's last line until it ends with a newline. File hashes are cached by (path, size, mtime, inode).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.db.watch_queries import watch_ledger_state
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


def _pair_settled(row: InputRow, settle_s: float, now: float) -> bool:
    """The image and its same-name ``.txt`` caption (when there is one) both unchanged for ``settle_s``."""
    if row.path is None or settle_s <= 0:
        return True
    if not _settled(row.path, settle_s, now):
        return False
    caption = Path(row.source).with_suffix(".txt") if row.source else None
    return caption is None or not caption.exists() or _settled(caption, settle_s, now)


def candidate_rows(folder: Path, settings: Settings, *, settle_s: float = SETTLE_S) -> Iterator[InputRow]:
    now = time.time()
    manifests = _manifests(folder)
    if manifests:
        for manifest in manifests:
            if _settled(manifest, settle_s, now) or settle_s <= 0:
                for row in _manifest_rows(manifest, settings):
                    if row.path is None or _settled(row.path, settle_s, now) or settle_s <= 0:
                        yield row
        return
    for row in iter_folder(folder, allowed_roots=tuple(settings.allowed_roots)):
        if _pair_settled(row, settle_s, now):
            yield row


_HASHES: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
_HASHES_MAX = 100_000
_HASH_LOCK = threading.Lock()


def file_digest(path: Path, max_bytes: int) -> str:
    """sha256 of a file's bytes (cached by path, size, mtime and inode); a file over the cap is keyed by its
    stat alone (it is refused at decoding anyway)."""
    info = path.stat()
    key = (str(path), info.st_size, info.st_mtime_ns, info.st_ino)
    with _HASH_LOCK:
        if key in _HASHES:
            _HASHES.move_to_end(key)
            return _HASHES[key]
    if info.st_size > max_bytes or not path.is_file():
        digest = f"stat:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}"
    else:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
        while len(_HASHES) > _HASHES_MAX:
            _HASHES.popitem(last=False)
    return digest


def content_key(row: InputRow, max_bytes: int) -> str:
    """What makes a watched row new: its image's bytes and its caption (a row with a problem, or a URL, is
    keyed by its source, caption and problem, so it is reported once)."""
    if row.path is not None and row.problem is None:
        try:
            return f"{file_digest(row.path, max_bytes)}\x1f{row.caption}"
        except OSError as exc:  # gone or unreadable now: keyed so it is reported once until it changes
            return f"unreadable\x1f{row.source}\x1f{exc.errno}"
    return f"row\x1f{row.url or row.source}\x1f{row.caption}\x1f{row.problem}"


def scan_once(
    folder: str | Path, settings: Settings, sender: TaskSender, *, ledger: IngestLedger | None = None,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """Submit what appeared or changed in ``folder`` since the last scan; returns the watch job id and counts."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"watch folder {root} does not exist or is not a folder")
    ledger = ledger or IngestLedger.from_url(settings.resolved_database_url)
    cursor = ledger.open_job(str(root), WATCH_KIND, job_encoder_label(settings, ledger.repo))
    known, next_seq = watch_ledger_state(ledger.repo, cursor.job_id)
    new_rows: list[InputRow] = []
    new_keys: list[str] = []
    for row in candidate_rows(root, settings, settle_s=settle_s):
        key = content_key(row, settings.max_image_bytes)
        if key in known:
            continue
        known.add(key)  # the same content twice in one scan is sent once
        new_rows.append(row)
        new_keys.append(key)
    submitted = 0
    for start in range(0, len(new_rows), max(1, settings.ingest_batch_size)):
        chunk = new_rows[start: start + settings.ingest_batch_size]
        wait_for_capacity(sender, settings.embed_queue_high_water)
        sender.send(ledger.submit(cursor.job_id, next_seq, chunk, new_keys[start: start + len(chunk)]))
        next_seq += len(chunk)
        submitted += len(chunk)
    ledger.save_cursor(cursor.job_id, {"next_seq": next_seq, "scanned_at": time.time()})
    if submitted:
        log.info("watch %s: submitted %d new or changed rows", root, submitted)
    return {"job_id": cursor.job_id, "folder": str(root), "submitted": submitted,
            "known": len(known) - len(new_keys)}


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
