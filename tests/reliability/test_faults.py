"""Injected faults, each with a count check: submitted = embedded + failed, nothing lost, nothing stored twice
(Qdrant points and DB rows), and the failure of a bad row recorded exactly once whatever was redone.

The SIGKILL, Redis-restart and re-embed-kill tests of ``tests/integration/test_workers*.py`` run clean
Flickr rows through the workers; these add bad rows beside them (failures must be recorded once across
redeliveries), a PostgreSQL restart, a second process on the local Qdrant store, a killed ``reco reembed``
run, a full data disk and a refine worker restarted under a client's queries.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import subprocess
import threading
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.config import Settings, get_settings
from app.db.models import Embedding
from app.db.repo import MetadataRepo
from app.memory.store import close_stores, encoder_memory, open_store
from app.schemas import EmbedStatus
from app.services.ingest import IngestService, prepare_storage
from ingestion.dispatch import dispatch_source, wait_for_job
from ingestion.pipeline import ingest_source
from tests.conftest import SHARED_DATA
from tests.integration.test_workers import _done, _ledger, _pending, _sender
from tests.integration.workers_support import (
    RECO,
    ROOT,
    PrivateRedis,
    Stack,
    flickr_manifest,
    make_stack,
    shared_redis_broker,
    wait_until,
)
from tests.reliability.conftest import ReliabilitySummary
from tests.reliability.reliability_support import (
    check_async_counts,
    ensure_postgres_running,
    fill,
    memory_counts,
    mixed_manifest,
    restart_postgres,
    small_disk,
    temp_leftovers,
)

pytestmark = pytest.mark.slow

SMALL_BATCHES = {"RECO_EMBED_MAX_BATCH": "16"}  # the embed worker's micro-batches, for faults mid-ingestion


def _safely(fn: Any, default: int = -1) -> Any:
    """For polling while a service is down: an error reads as ``default``."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - the database is restarting
        return default


@pytest.mark.postgres
@pytest.mark.redis
def test_embed_worker_sigkill_and_redis_restart_with_bad_rows(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, reliability: ReliabilitySummary
) -> None:
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    # More, smaller batches: both faults land mid-ingestion.
    stack = make_stack(tmp_path, postgres_url, redis_server.url, monkeypatch, SMALL_BATCHES)
    try:
        settings = get_settings()
        ledger = _ledger(settings)
        manifest, expected = mixed_manifest(tmp_path / "mixed", 150)
        worker = stack.worker("embed,maintenance", "embed")
        stack.beat()  # resends the rows whose messages died with the worker or the broker
        job_id = dispatch_source(manifest, settings, _sender(settings), progress=False)["job_id"]
        wait_until(lambda: _done(ledger, job_id) >= 32, 120, "two batches done")
        wait_until(lambda: _pending(ledger) > 0, 60, "a batch between 'pending' and 'embedded'", poll_s=0.01)
        worker.kill()  # SIGKILL, main process and pool child
        at_kill = _done(ledger, job_id)
        stack.procs.remove(worker)
        stack.worker("embed,maintenance", "embed-restarted")
        wait_until(lambda: _done(ledger, job_id) >= at_kill + 16, 120, "embedding again after the restart")
        at_restart = _done(ledger, job_id)
        redis_server.restart()  # no persistence: every queued message is lost
        assert at_kill < at_restart < len(expected), "both faults must land mid-ingestion"
        wait_for_job(ledger, job_id, timeout_s=180, poll_s=0.5)
        stack.stop_all()
        check_async_counts(settings, job_id, expected, reliability, "async: SIGKILL + Redis restart",
                            ["SIGKILL embed worker mid-batch", "Redis restart mid-ingestion"],
                            {"done_at_kill": at_kill, "done_at_redis_restart": at_restart})
    finally:
        stack.stop_all()
        redis_server.stop()
        close_stores()


@pytest.mark.postgres
@pytest.mark.redis
def test_postgres_restart_mid_ingestion(
    tmp_path: Path, restartable_postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch,
    reliability: ReliabilitySummary,
) -> None:
    # Small batches and enough rows that ingestion outlasts the restart by seconds: with 64-row batches the
    # worker once finished all 147 rows before the cluster went down (a restart that tested nothing).
    stack = make_stack(tmp_path, restartable_postgres_url, shared_redis_broker(redis_url), monkeypatch,
                       SMALL_BATCHES)
    try:
        _postgres_restart_mid_ingestion(stack, tmp_path, reliability)
    finally:
        stack.stop_all()
        close_stores()


def _postgres_restart_mid_ingestion(stack: Stack, tmp_path: Path, reliability: ReliabilitySummary) -> None:
    settings = get_settings()
    ledger = _ledger(settings)
    manifest, expected = mixed_manifest(tmp_path / "mixed", 250)
    stack.worker("embed,maintenance", "embed")
    stack.beat()
    job_id = dispatch_source(manifest, settings, _sender(settings), progress=False)["job_id"]
    try:
        wait_until(lambda: _done(ledger, job_id) >= 32, 120, "two batches done")
        at_restart = _done(ledger, job_id)
        assert at_restart < len(expected) - 100, "the restart must land mid-ingestion (rows left to do)"
        outage_s = restart_postgres()  # cuts every connection: the worker's batch fails mid-way, is retried
    finally:
        ensure_postgres_running()
    wait_until(lambda: _safely(lambda: _done(ledger, job_id)) >= 0, 60, "the database answering again")
    after = _done(ledger, job_id)
    assert at_restart <= after, "rows recorded done before the restart stay done"
    wait_until(lambda: _safely(lambda: ledger.repo.get_job(job_id).status) == "completed", 240, "job completed")
    stack.stop_all()
    worker_log = "".join(p.read_text(errors="replace") for p in stack.logs.glob("embed-*.log"))
    assert "transient OperationalError" in worker_log, "the worker must have met the outage mid-ingestion"
    check_async_counts(settings, job_id, expected, reliability, "async: PostgreSQL restart",
                       ["PostgreSQL restart mid-ingestion"],
                       {"done_at_restart": at_restart, "done_after": after, "restart_s": round(outage_s, 1)})


def _reco(args: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RECO, *args], cwd=ROOT, env=os.environ | env, capture_output=True, text=True,
                          timeout=timeout_s)


def test_embedded_memory_opened_by_a_second_process(
    settings: Settings, tiny_encoder, tmp_path: Path, reliability: ReliabilitySummary,  # type: ignore[no-untyped-def]
) -> None:
    """An embedded memory has one owner: a second process gets a clear error naming the owner and what to do
    (no traceback) and changes nothing; the first keeps working, and the store reopens intact."""
    prepare_storage(settings)
    service = IngestService(settings, encoder=tiny_encoder)
    first = ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "a", 20), settings, service=service,
                          progress=False)
    env = {"RECO_DATA_DIR": str(settings.data_dir), "RECO_CLIP_MODEL": "reco-tiny",
           "RECO_CLIP_PRETRAINED": "", "HF_HUB_OFFLINE": "1"}
    second = flickr_manifest(SHARED_DATA, tmp_path / "b", 40)
    result = _reco(["ingest", str(second), "--json"], env)  # a second process tries to write
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"is open in process {os.getpid()}" in result.stderr and "reco serve" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    again = ingest_source(second, settings, service=service, progress=False)  # the first process still works
    hits = service.memory.search(service.encoder.encode_texts(["a dog"])[0], "text", 5)
    assert len(hits) == 5
    expected_ids = set(service.repo.item_ids_with_status(service.encoder_id, EmbedStatus.EMBEDDED, 10_000))
    close_stores()  # reopen from disk: nothing the refused process did (or half did) shows
    reopened = encoder_memory(settings, service.encoder_id, service.encoder.dim)
    submitted = first["seen"] + again["seen"]
    counts = memory_counts(service.repo, reopened, submitted=submitted, failed=first["failed"] + again["failed"])
    embedded = first["ingested"] + first["duplicates"] + again["ingested"] + again["duplicates"]
    reliability.scenario("embedded memory held by another process", submitted=submitted, embedded=embedded,
                         failed=counts["failed"], lost=submitted - embedded - counts["failed"],
                         duplicated=counts["duplicated"], faults=["embedded memory opened by a 2nd process"])
    assert counts["same_ids"] and counts["points"] == counts["items"] == len(expected_ids) == 40, counts
    assert counts["duplicated"] == 0 and embedded == submitted == 60


def _embedded_under(repo: MetadataRepo, encoder_id: str) -> int:
    with repo.session() as s:
        return int(s.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.encoder_id == encoder_id, Embedding.status == EmbedStatus.EMBEDDED)) or 0)


def test_reembed_killed_halfway_resumes(
    settings: Settings, tiny_encoder, tmp_path: Path, reliability: ReliabilitySummary,  # type: ignore[no-untyped-def]
) -> None:
    """``reco reembed`` SIGKILLed halfway, then run again (``reembed_now``, what the command calls): it resumes
    (only the batch in flight is redone), swaps the alias, keeps the old version."""
    from app.services.reembed import reembed_now

    n = 100
    prepare_storage(settings)
    service = IngestService(settings, encoder=tiny_encoder)
    ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "f", n), settings, service=service, progress=False)
    repo, old = service.repo, service.encoder_id
    close_stores()  # the store is the re-embedding process's now
    env = {"RECO_DATA_DIR": str(settings.data_dir), "RECO_CLIP_MODEL": "reco-tiny",
           "RECO_CLIP_PRETRAINED": "", "HF_HUB_OFFLINE": "1",
           "RECO_REEMBED_BATCH_SIZE": "10", "RECO_DEVICE": "cpu"}
    new = "reco-tiny/random/s1"
    run = subprocess.Popen([*RECO, "reembed", "--model", "reco-tiny", "--pretrained", "", "--seed", "1", "--json"],
                           cwd=ROOT, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_until(lambda: _embedded_under(repo, new) >= 30 or run.poll() is not None, 120, "three batches",
                   poll_s=0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    at_kill = _embedded_under(repo, new)
    assert 0 < at_kill < n, at_kill
    out = reembed_now(settings.model_copy(update={"reembed_batch_size": 10}), "reco-tiny", "", seed=1)
    store = open_store(settings)
    versions = {v.encoder_id: v for v in repo.versions()}
    new_points = [p.item_id for page in store.collection(versions[new].collection).scroll() for p in page]
    with repo.session() as s:
        redone = s.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.encoder_id == new, Embedding.attempts > 1)) or 0
    reliability.scenario("re-embed killed halfway, resumed", submitted=n, embedded=out["done"],
                         failed=out["failed"], lost=n - out["done"] - out["failed"],
                         duplicated=len(new_points) - len(set(new_points)), faults=["SIGKILL reco reembed halfway"])
    assert out["swapped"] and (out["done"], out["failed"], out["remaining"]) == (n, 0, 0), out
    assert len(new_points) == len(set(new_points)) == _embedded_under(repo, new) == n
    assert redone <= 10, f"{redone} items embedded twice: the run restarted instead of resuming"
    assert store.live_collection(settings.memory_alias) == versions[new].collection
    assert store.collection(versions[old].collection).count() == n  # the old version is kept


# --- a full data disk ----------------------------------------------------------------------------------
def _full_disk_phase(settings: Settings, service: IngestService, manifest: Path, encoder: Any) -> str:
    """Everything that writes to the data dir, on a full disk: each fails cleanly or degrades, leaves nothing
    half-written, and the memory stays consistent. Returns the ingest job's recorded error."""
    from app.services.method_common import load_matrices
    from app.services.predict import PredictRequest, predict_image
    from ingestion.uploads import UploadRejected, store_upload, upload_root

    with pytest.raises(Exception, match="disk is full|No space left"):
        ingest_source(manifest, settings, service=service, progress=False)
    job = service.repo.latest_job()
    assert job is not None and job.status == "failed" and job.error, "the failure is recorded with its reason"
    embedded = set(service.repo.item_ids_with_status(service.encoder_id, EmbedStatus.EMBEDDED, 10_000))
    assert embedded == service.memory.existing_ids(sorted(embedded | set(service.repo.item_ids_with_status(
        service.encoder_id, EmbedStatus.PENDING, 10_000)))), "embedded in the DB = present in Qdrant, exactly"

    image = next((manifest.parent / "images").iterdir()).read_bytes()
    answer = predict_image(settings, PredictRequest(image_bytes=image, classes=["a dog", "a cat"], mode="clip"),
                           encoder=encoder)  # the class-embedding cache cannot be written: still an answer
    assert len(answer.predictions) == 2
    assert len(load_matrices(settings, service.memory)) == len(embedded)  # the memory cache neither

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", image)
        zf.writestr("a.txt", "a caption")
    with pytest.raises((OSError, UploadRejected)):
        store_upload("set.zip", archive.getvalue(), settings)
    assert not any(upload_root(settings).glob("*/*")), "an upload half-stored on a full disk"
    assert temp_leftovers(settings.data_dir) == []
    return str(job.error)


@pytest.mark.postgres
def test_disk_full_on_the_data_dir(
    tmp_path: Path, postgres_url: str, tiny_encoder, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    reliability: ReliabilitySummary,
) -> None:
    """The data dir (the embedded memory, caches, uploads) is full while an ingestion runs: its first
    batch (rows already in the memory) passes, the second cannot be written. The metadata DB is PostgreSQL, so
    the failure is recorded. Then space is freed and the same ingestion succeeds, nothing lost or doubled."""
    disk = tmp_path / "disk"
    with small_disk(disk, "320m") as mounted:  # the engine's files: two 32 MB WAL segments, vectors, indexes
        settings = Settings(data_dir=disk / "data", database_url=postgres_url, clip_model="reco-tiny",
                            clip_pretrained="", decode_workers=0, ingest_batch_size=16, memory_min_free_mb=64)
        prepare_storage(settings)
        service = IngestService(settings, encoder=tiny_encoder)
        first = ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "a", 20), settings, service=service,
                              progress=False)
        manifest = flickr_manifest(SHARED_DATA, tmp_path / "b", 60)  # 20 rows already in, 40 new
        if mounted:
            filler = fill(disk)
            error = _full_disk_phase(settings, service, manifest, tiny_encoder)
            filler.unlink()  # space freed
        else:  # no mount allowed here: ENOSPC injected where vectors are written
            def no_space(records: Any) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(service.memory, "upsert", no_space)
            with pytest.raises(OSError, match="No space left"):
                ingest_source(manifest, settings, service=service, progress=False)
            error = str(service.repo.latest_job().error)  # type: ignore[union-attr]
            monkeypatch.undo()
        again = ingest_source(manifest, settings, service=service, progress=False)
        close_stores()
        reopened = encoder_memory(settings, service.encoder_id, service.encoder.dim)
        submitted = first["seen"] + again["seen"]
        counts = memory_counts(service.repo, reopened, submitted=submitted, failed=again["failed"])
        embedded = first["ingested"] + again["ingested"] + again["duplicates"]
        reliability.scenario("data disk full, then freed" + ("" if mounted else " (simulated ENOSPC)"),
                             submitted=submitted, embedded=embedded, failed=again["failed"],
                             lost=submitted - embedded - again["failed"], duplicated=counts["duplicated"],
                             faults=["data disk full" if mounted else "ENOSPC injected"], note=error)
        assert "disk is full" in error or "No space left" in error, error
        assert (again["status"], again["failed"], embedded) == ("completed", 0, 80), again
        assert counts["items"] == counts["points"] == 60 and counts["same_ids"] and counts["duplicated"] == 0
        assert counts["db_status"] == {"embedded": 60}
        close_stores()


@pytest.mark.postgres
@pytest.mark.redis
def test_refine_worker_restarted_while_the_ui_queries_it(
    stack: Stack, tmp_path: Path, reliability: ReliabilitySummary
) -> None:
    """The UI's worker backend asks the refine worker while it is SIGKILLed and restarted: every call returns
    within the client's timeout, with an answer (retried by the broker) or a clear error; none hangs."""
    from ui.backend import SearchQuery, WorkerBackend
    from workers.celery_app import create_celery_app
    from workers.client import RefineClient

    settings = get_settings()
    service = IngestService(settings)
    ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "f", 40), settings, service=service, progress=False)
    close_stores()
    stack.serve()  # owns the memory; the refine workers reach it through the server
    timeout_s = 10.0  # the UI's client; a request lost with the killed worker costs one timeout
    app = create_celery_app(settings)
    backend = WorkerBackend(RefineClient(app, timeout_s=timeout_s))
    patient = WorkerBackend(RefineClient(app, timeout_s=45.0))  # outlasts a restart + warm-up
    calls: list[tuple[float, float, str]] = []  # (started, seconds, "ok" or the error)

    asked_while_down: list[tuple[float, float, str]] = []
    tracebacks: list[str] = []

    def one_call(n: int, via: WorkerBackend = backend, into: list[tuple[float, float, str]] = calls) -> None:
        started = time.monotonic()
        try:
            view = via.search(SearchQuery(text=f"a dog runs {n}"), reco=False, k=3)
            outcome = "ok" if len(view.results) == 3 else f"short answer {len(view.results)}"
        except Exception as exc:  # noqa: BLE001 - counted: each must be a clear error
            outcome = f"{type(exc).__name__}: {exc}"
            tracebacks.append(traceback.format_exc())  # shown if an error is not a clear one
        into.append((started, time.monotonic() - started, outcome))

    stop = threading.Event()

    def keep_asking() -> None:
        n = 0
        while not stop.is_set():
            one_call(n)
            n += 1
            time.sleep(0.1)

    refine = stack.worker("refine", "refine")
    client = threading.Thread(target=keep_asking, daemon=True)
    client.start()
    try:
        wait_until(lambda: sum(c[2] == "ok" for c in calls) >= 3, 60, "answers before the restart")
        refine.kill()  # SIGKILL: a request it had taken is lost with it (the client must time out cleanly)
        killed_at = time.monotonic()
        stack.procs.remove(refine)
        time.sleep(0.5)
        patient_call = threading.Thread(target=one_call, args=(-1, patient, asked_while_down), daemon=True)
        patient_call.start()  # waits in the queue for the next worker: a delayed answer, not an error
        time.sleep(1.5)
        stack.worker("refine", "refine-restarted")
        back_at = time.monotonic()
        wait_until(lambda: sum(c[2] == "ok" and c[0] > back_at for c in calls) >= 3, 90, "answers after the restart")
        patient_call.join(timeout=60)
    finally:
        stop.set()
        client.join(timeout=timeout_s + 10)
    assert not client.is_alive() and not patient_call.is_alive(), "a client call hangs"
    slowest = max(seconds for _, seconds, _ in calls)
    errors = [outcome for _, _, outcome in calls if outcome != "ok"]
    across = [(round(seconds, 1), outcome) for started, seconds, outcome in calls
              if started < back_at and started + seconds > killed_at]  # in flight while the worker was gone
    reliability.fault("refine worker SIGKILLed and restarted under queries",
                      f"{len(calls)} queries, {len(errors)} errors; in flight across the outage (seconds, outcome): "
                      f"{across}; slowest {slowest:.1f} s (client timeout {timeout_s:.0f} s); one asked while "
                      f"it was down: {[(round(w, 1), o) for _, w, o in asked_while_down]}")
    (_, waited, answer), = asked_while_down
    assert answer == "ok" and waited >= 1.5, f"asked while the worker was down: {answer} after {waited:.1f} s"
    assert slowest <= timeout_s + 5, f"a call took {slowest:.1f} s"
    assert all(e.startswith("RefineTimeout: no refine worker answered") for e in errors), (errors, tracebacks)
