"""Helpers of the reliability tests: count checks, temp-file checks, service restarts, a password-protected
Redis. Worker processes and the private Redis come from :mod:`tests.integration.workers_support`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import Embedding, IngestFailure, IngestTask, Item
from app.db.repo import MetadataRepo
from app.memory.base import VectorMemory
from tests.conftest import IN_CI, SHARED_DATA
from tests.fixtures.bad_inputs import make_corpus, manifest_cases, write_manifest
from tests.integration.workers_support import PrivateRedis, flickr_manifest, wait_until

# What a writer leaves when it dies between "write the temp file" and "rename it into place".
TEMP_MARKERS = (".incoming-", ".part", ".tmp", "tmp.npz")


def temp_leftovers(*roots: Path) -> list[str]:
    """Files or folders under ``roots`` whose names say they are half-written temporaries."""
    found = []
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if any(marker in path.name for marker in TEMP_MARKERS):
                found.append(str(path))
    return sorted(found)


@contextmanager
def private_tmpdir(base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tempfile`` (and subprocesses, through TMPDIR) write under a folder of our own, checked empty after:
    the machine's /tmp is shared with other test runs, so it cannot be compared before and after."""
    folder = base / "private-tmp"
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    assert files_in(folder) == [], "temporary files left behind"


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (empty folders are not leftovers: torch creates its inductor cache folder)."""
    return sorted(str(p) for p in folder.rglob("*") if not p.is_dir())


def memory_counts(repo: MetadataRepo, memory: VectorMemory, *, submitted: int, failed: int) -> dict[str, Any]:
    """Items in the memory, checked in both stores: one DB row and one Qdrant point per item, the same ids,
    every embedding row final. ``submitted``/``failed``: rows given / rows refused with a reason.

    ``embedded`` counts rows whose item is in the memory (new or a duplicate of one already there), so
    ``lost`` = submitted - embedded - failed must be 0.
    """
    with repo.session() as s:
        item_ids = list(s.scalars(select(Item.id)))
        statuses = dict(s.execute(select(Embedding.status, func.count()).group_by(Embedding.status)).all())
        per_item = s.scalar(select(func.count()).select_from(Embedding)) or 0
    points = [p.item_id for page in memory.scroll(limit=1000) for p in page]
    duplicated = (len(points) - len(set(points))) + (len(item_ids) - len(set(item_ids))) + (per_item - len(item_ids))
    return {"items": len(item_ids), "points": len(points), "same_ids": set(points) == set(item_ids),
            "db_status": {str(k): int(v) for k, v in statuses.items()}, "duplicated": duplicated,
            "submitted": submitted, "failed": failed}


def ledger_outcomes(repo: MetadataRepo, job_id: int) -> list[tuple[int, str, str | None]]:
    """(seq, state, reason) of every row of an asynchronous job, in submission order."""
    with repo.session() as s:
        rows = s.execute(select(IngestTask.seq, IngestTask.state, IngestTask.reason)
                         .where(IngestTask.job_id == job_id).order_by(IngestTask.seq)).all()
    return [(int(seq), str(state), reason) for seq, state, reason in rows]


def failure_records(repo: MetadataRepo, job_id: int) -> int:
    with repo.session() as s:
        return int(s.scalar(select(func.count()).select_from(IngestFailure).where(IngestFailure.job_id == job_id))
                   or 0)


# --- services --------------------------------------------------------------------------------------------
def require_tool(name: str) -> str:
    """A binary the fault needs: a failure under CI (the CI image has it), else a skip with the reason."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: this fault cannot be injected here"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def restart_postgres(down_s: float = 1.0) -> float:
    """Restart the machine's PostgreSQL cluster (``pg_ctlcluster … restart``); returns seconds it took.

    Every connection of every client is cut. The caller must call :func:`ensure_postgres_running` in a
    ``finally`` (other engineers' tests share this server).
    """
    tool = require_tool("pg_ctlcluster")
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    started = time.monotonic()
    subprocess.run([tool, "--skip-systemctl-redirect", version, "main", "stop", "-m", "fast"], check=True,
                   capture_output=True, timeout=60)
    time.sleep(down_s)
    subprocess.run([tool, "--skip-systemctl-redirect", version, "main", "start"], check=True,
                   capture_output=True, timeout=60)
    return time.monotonic() - started


def ensure_postgres_running() -> None:
    """Start the cluster if it is down (idempotent): the ``finally`` of every test that restarts it."""
    tool = shutil.which("pg_ctlcluster")
    if tool is None or not os.path.isdir("/etc/postgresql"):
        return
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    status = subprocess.run([tool, "--skip-systemctl-redirect", version, "main", "status"], capture_output=True,
                            timeout=30)
    if status.returncode != 0:
        subprocess.run([tool, "--skip-systemctl-redirect", version, "main", "start"], capture_output=True,
                       timeout=60)


class PasswordRedis(PrivateRedis):
    """The private Redis of the worker tests, with ``requirepass``: a broker URL that carries a secret."""

    def __init__(self, workdir: Path, password: str) -> None:
        super().__init__(workdir)
        self.password = password

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.popen = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--requirepass", self.password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, "password redis up")


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


# --- asynchronous ingestion under faults -------------------------------------------------------------
def mixed_manifest(folder: Path, n_flickr: int) -> tuple[Path, list[str]]:
    """``n_flickr`` good Flickr8k rows, then the bad-input corpus's CSV rows; and each row's expected outcome
    in the ledger ("embedded" or the reason it fails with)."""
    flickr = flickr_manifest(SHARED_DATA, folder, n_flickr)
    cases = make_corpus(folder)
    corpus = write_manifest(folder, cases, name="corpus.csv")
    mixed = folder / "mixed.csv"
    body = flickr.read_bytes().split(b"\r\n", 1)[1] + corpus.read_bytes().split(b"\r\n", 1)[1]
    mixed.write_bytes(b"image,caption,label,split\r\n" + body)
    expected = ["embedded"] * n_flickr + [
        "embedded" if c.expected in ("accepted", "duplicate") else str(c.expected) for c in manifest_cases(cases)]
    return mixed, expected


def check_async_counts(settings: Settings, job_id: int, expected: list[str], reliability: Any,
                        scenario: str, faults: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The worker tests' exactly-once counts, each row's outcome as expected, each failure recorded once."""
    from tests.integration.test_workers import _ledger, exactly_once_counts

    counts = exactly_once_counts(settings, job_id) | extra
    ledger = _ledger(settings)
    reliability.scenario(scenario, submitted=counts["submitted"], embedded=counts["embedded"],
                         failed=counts["failed"], lost=counts["lost"], duplicated=counts["duplicated"], faults=faults)
    observed = ["embedded" if state == "embedded" else str(reason) for _, state, reason in
                ledger_outcomes(ledger.repo, job_id)]
    assert observed == expected, counts
    assert counts["submitted"] == len(expected) == counts["embedded"] + counts["failed"], counts
    assert (counts["lost"], counts["duplicated"]) == (0, 0), counts
    assert counts["points_equal_items"] and counts["db_status"] == {"embedded": counts["db_items"]}, counts
    assert failure_records(ledger.repo, job_id) == counts["failed"], "a failure recorded once, not per delivery"
    return counts


# --- a small disk ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[bool]:
    """A tmpfs mounted on ``folder`` with ``options`` (True) when this machine lets us mount one (root,
    CAP_SYS_ADMIN), else False; unmounted on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def small_disk(folder: Path, size: str = "8m") -> contextlib.AbstractContextManager[bool]:
    """A tmpfs of ``size`` on ``folder`` (True) when this machine lets us mount one, else False."""
    return tmpfs(folder, f"size={size}")


def read_only_folder(folder: Path) -> contextlib.AbstractContextManager[bool]:
    """A read-only tmpfs on ``folder`` when this machine lets us mount one, else False."""
    return tmpfs(folder, "ro,size=1m")


def fill(disk: Path) -> Path:
    """Write zeros until the file system is full; removing the returned file frees the space again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(bytes(1 << 16))
    return filler
