"""Faults of ``reco serve``, the memory's one owner: SIGKILLed mid-ingestion and restarted (the engine's WAL
replays, the client retries: 0 lost, 0 duplicated), a client that disconnects mid-upload (nothing half-stored,
the server keeps serving), and 20 concurrent ingest requests of overlapping data (0 duplicated)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.memory.store import close_stores, open_store
from app.schemas import EmbedStatus
from tests.conftest import SHARED_DATA
from tests.integration.workers_support import flickr_manifest, wait_until
from tests.reliability.conftest import ReliabilitySummary
from tests.reliability.reliability_support import memory_counts, temp_leftovers

pytestmark = [pytest.mark.slow]


def _settings(data_dir: Path, roots: list[Path]) -> Settings:
    return Settings(data_dir=data_dir, clip_model="reco-tiny", clip_pretrained="", decode_workers=1,
                    ingest_batch_size=16, allowed_roots=roots, api_retry_s=120)


def _serve(settings: Settings, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    from api.process import start_server

    with log.open("ab") as out:
        return start_server(settings, port=0, log=out)


def _counts(settings: Settings, submitted: int, failed: int = 0) -> dict[str, Any]:
    from app.db.repo import MetadataRepo
    from app.services.reembed import live_version

    repo = MetadataRepo.from_url(settings.resolved_database_url)
    version = live_version(repo)
    assert version is not None
    store = open_store(settings)
    return memory_counts(repo, store.collection(version.collection), submitted=submitted, failed=failed)


def test_server_sigkilled_mid_ingestion_and_restarted(tmp_path: Path, reliability: ReliabilitySummary) -> None:
    """``reco ingest`` (its own process, through the server) while the server is SIGKILLed and restarted: the
    client waits and carries on; every item ends embedded exactly once, its vectors in the engine after the
    WAL replay."""
    from api.process import stop_server
    from ui.cli import settings_env

    n = 200
    manifest = flickr_manifest(SHARED_DATA, tmp_path / "flickr", n)
    settings = _settings(tmp_path / "data", [manifest.parent])
    log = tmp_path / "serve.log"
    server, _ = _serve(settings, log)
    ingest_log = tmp_path / "ingest.log"
    with ingest_log.open("wb") as out:
        ingest = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "ingest", str(manifest),
                                   "--json"], env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT)
    from app.db.repo import MetadataRepo

    repo = MetadataRepo.from_url(settings.resolved_database_url)

    def embedded() -> int:
        return sum(c.get(EmbedStatus.EMBEDDED, 0) for c in repo.status_counts().values())

    try:
        wait_until(lambda: embedded() >= 48, 240, "three batches embedded through the server")
        os.killpg(server.pid, signal.SIGKILL)  # no shutdown, no flush: the WAL is all there is
        server.wait()
        at_kill = embedded()
        time.sleep(1.0)
        assert ingest.poll() is None, "the client gave up instead of waiting for the server"
        server, _ = _serve(settings, log)  # the announcement is rewritten; the engine replays its WAL on open
        assert ingest.wait(timeout=600) == 0, ingest_log.read_text()[-3000:]
    finally:
        if ingest.poll() is None:
            ingest.kill()
        stop_server(server)
    close_stores()
    summary = json.loads(ingest_log.read_text().strip().splitlines()[-1])
    counts = _counts(settings, submitted=n)
    close_stores()
    embedded_total = counts["db_status"].get("embedded", 0)
    reliability.scenario("reco serve SIGKILLed mid-ingestion, restarted (client retried)", submitted=n,
                         embedded=embedded_total, failed=summary["failed"], lost=n - embedded_total - summary["failed"],
                         duplicated=counts["duplicated"], faults=["reco serve SIGKILLed"],
                         note=f"{at_kill} embedded at the kill")
    assert 0 < at_kill < n
    assert summary["failed"] == 0 and summary["ingested"] + summary["duplicates"] == n, summary
    assert counts["items"] == counts["points"] == n and counts["same_ids"] and counts["duplicated"] == 0, counts
    assert counts["db_status"] == {"embedded": n}, counts


@pytest.fixture
def served(tmp_path: Path) -> Any:
    from api.process import stop_server

    settings = _settings(tmp_path / "data", [tmp_path])
    server, url = _serve(settings, tmp_path / "serve.log")
    key = (settings.data_dir / "keys" / "cli.key").read_text().strip()
    try:
        yield settings, url, key
    finally:
        stop_server(server)
        close_stores()


def _zip_of(rows: list[dict[str, str]], shared: Path) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for image in dict.fromkeys(r["image"] for r in rows):  # five captions share an image: one member
            zf.write(shared / image, image)
        manifest = io.StringIO()
        writer = csv.DictWriter(manifest, fieldnames=["image", "caption", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
        zf.writestr("manifest.csv", manifest.getvalue())
    return archive.getvalue()


def test_client_disconnecting_mid_upload(served: Any, reliability: ReliabilitySummary) -> None:
    """A zip upload cut off halfway: no job, nothing stored, no temp file; the server answers the next request."""
    settings, url, key = served
    with open(SHARED_DATA / "flickr8k" / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:40]
    body_file = _zip_of(rows, SHARED_DATA / "flickr8k")
    boundary = "reco-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"part.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + body_file + tail
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((f"POST /v1/ingest HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
                     .encode() + body[: len(body) // 2])
        time.sleep(0.5)
    # the connection is gone with half the body: the server must have dropped the request
    time.sleep(1.0)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/v1/jobs").json()["jobs"] == []
        uploads = settings.data_dir / "uploads"
        assert not uploads.exists() or not any(uploads.rglob("*")), list(uploads.rglob("*"))
        assert temp_leftovers(settings.data_dir) == []
        whole = http.post("/v1/ingest", files=[("file", ("whole.zip", body_file, "application/zip"))])
        assert whole.status_code == 202, whole.text
        job_id = whole.json()["id"]
        wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] != "running", 300, "the upload ingested")
        job = http.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["ingested"]) == ("completed", 40), job
    reliability.fault("client disconnected mid-upload (half a 40-image zip sent)",
                      "no job, nothing stored, no temp file; the next upload of the same zip ingested 40 of 40")


def test_twenty_concurrent_overlapping_ingests(served: Any, tmp_path: Path, reliability: ReliabilitySummary) -> None:
    """20 ingest requests at once over overlapping slices of 60 Flickr8k rows: each row is embedded once."""
    settings, url, key = served
    manifest = flickr_manifest(SHARED_DATA, tmp_path / "pool", 60)
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    manifests = []
    for n in range(20):
        part = tmp_path / "pool" / f"part{n}.csv"
        chosen = rows[(n * 7) % 40: (n * 7) % 40 + 20]  # overlapping windows
        with part.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "split"])
            writer.writeheader()
            writer.writerows(chosen)
        manifests.append(part)
    started: list[int] = []
    errors: list[str] = []

    def submit(path: Path) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            answer = http.post("/v1/ingest", json={"path": str(path)})
            if answer.status_code == 202:
                started.append(int(answer.json()["id"]))
            else:
                errors.append(answer.text)

    threads = [threading.Thread(target=submit, args=(m,)) for m in manifests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(started) == 20, errors
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        def all_done() -> bool:
            return all(http.get(f"/v1/jobs/{j}").json()["status"] != "running" for j in started)

        wait_until(all_done, 600, "20 ingest jobs done", poll_s=1.0)
        jobs = [http.get(f"/v1/jobs/{j}").json() for j in started]
    distinct = {(r["image"], r["caption"]) for m in manifests for r in csv.DictReader(m.open(encoding="utf-8"))}
    submitted = sum(j["seen"] for j in jobs)
    assert {j["status"] for j in jobs} == {"completed"}
    assert sum(j["ingested"] for j in jobs) == len(distinct)
    assert sum(j["ingested"] + j["duplicates"] for j in jobs) == submitted == 20 * 20
    counts = _counts_via_server(settings, len(distinct))
    reliability.scenario("20 concurrent ingest requests, overlapping rows (through reco serve)",
                         submitted=len(distinct), embedded=counts["embedded"], failed=0,
                         lost=len(distinct) - counts["embedded"], duplicated=counts["duplicated"],
                         faults=["20 concurrent overlapping ingests"],
                         note=f"{submitted} rows submitted in 20 jobs, {len(distinct)} distinct")
    assert counts["points"] == counts["items"] == counts["embedded"] == len(distinct) and counts["duplicated"] == 0


def _counts_via_server(settings: Settings, expected: int) -> dict[str, Any]:
    """Counted through the server (it owns the memory): DB rows vs engine points, by id."""
    from app.db.repo import MetadataRepo

    repo = MetadataRepo.from_url(settings.resolved_database_url)
    store = open_store(settings)
    assert store.backend == "reco-serve"
    memory = store.collection(settings.memory_alias)
    points = [p.item_id for page in memory.scroll(limit=500) for p in page]
    items, _ = repo.list_items(limit=10_000)
    status = repo.status_counts()
    embedded = sum(c.get("embedded", 0) for c in status.values())
    close_stores()
    return {"points": len(set(points)), "items": len(items), "embedded": embedded,
            "duplicated": len(points) - len(set(points)) + (sum(sum(c.values()) for c in status.values()) - len(items)),
            "same_ids": set(points) == {i.id for i in items}, "expected": expected}
