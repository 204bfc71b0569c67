"""The app-side pieces the workers wrap, in this process (SQLite, Qdrant local): the exactly-once ledger,
micro-batch processing with redelivery and errors, backpressure, resume, watch folders, re-embedding,
snapshots, the crash-safe batch task and the Celery configuration. Fast: no worker process here."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from app.config import Settings
from app.db.models import IngestFailure
from app.encoder import OpenClipEncoder
from app.services.ingest import IngestService, prepare_storage
from app.services.ingest_async import EmbedBatchService, is_transient, retry_delay_s
from app.services.ingest_ledger import IngestLedger, TaskRef
from app.services.reembed import ReembedService, drop_old_versions, fusion_status
from app.services.search import SearchRequest, SearchService
from ingestion.dispatch import dispatch_source, make_decoder, resend_lost, wait_for_capacity
from ingestion.pipeline import ingest_source
from ingestion.watch import scan_once
from tests.fixtures.bad_inputs import make_corpus, manifest_cases, write_manifest
from tests.integration.workers_support import flickr_manifest


class ListSender:
    """A TaskSender that keeps what it was given (a broker that never loses anything)."""

    def __init__(self, depths: Sequence[int] = (0,), fail_after: int | None = None) -> None:
        self.sent: list[TaskRef] = []
        self.depths = list(depths)
        self.fail_after = fail_after

    def send(self, refs: Sequence[TaskRef]) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("broker went away")
        self.sent.extend(refs)

    def queue_depth(self) -> int:
        return self.depths.pop(0) if len(self.depths) > 1 else self.depths[0]


@pytest.fixture
def ingest(settings: Settings, tiny_encoder: OpenClipEncoder) -> IngestService:
    prepare_storage(settings)
    return IngestService(settings, encoder=tiny_encoder)


@pytest.fixture
def batches(settings: Settings, ingest: IngestService) -> EmbedBatchService:
    return EmbedBatchService(ingest, make_decoder(settings, ingest.encoder))


def drain(service: EmbedBatchService, refs: Sequence[TaskRef], size: int = 16) -> None:
    for start in range(0, len(refs), size):
        service.process(refs[start: start + size])


def test_corpus_through_the_async_path_every_row_ends_once(
    settings: Settings, batches: EmbedBatchService, tmp_path: Path
) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    cases = manifest_cases(corpus)
    manifest = write_manifest(tmp_path / "corpus", corpus)
    sender = ListSender()
    summary = dispatch_source(manifest, settings, sender, progress=False)
    assert summary["submitted"] == len(sender.sent) == len(cases)
    drain(batches, sender.sent)
    drain(batches, sender.sent[::-1], size=7)  # every message delivered again, in another order
    ledger = batches.ledger
    job = ledger.repo.get_job(summary["job_id"])
    expected = Counter(str(c.expected) for c in cases)
    assert job is not None and job.status == "completed"
    assert (job.seen, job.ingested, job.duplicates) == (len(cases), expected["accepted"], expected["duplicate"])
    failures = ledger.repo.job_failures(summary["job_id"])
    assert Counter(f.reason for f in failures) == Counter(
        {k: v for k, v in expected.items() if k not in ("accepted", "duplicate")})
    assert job.failed == len(failures) and all(f.detail for f in failures)
    assert batches.ingest.memory.count() == expected["accepted"]


def test_transient_store_error_keeps_rows_queued_and_a_retry_embeds_them(
    settings: Settings, batches: EmbedBatchService, shared_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sender = ListSender()
    job_id = dispatch_source(flickr_manifest(shared_data, tmp_path / "f", 10), settings, sender,
                             progress=False)["job_id"]
    real_upsert = batches.ingest.memory.upsert

    def down(records: Any) -> None:
        raise httpx.ConnectError("qdrant is restarting")

    monkeypatch.setattr(batches.ingest.memory, "upsert", down)
    with pytest.raises(httpx.ConnectError) as caught:
        batches.process(sender.sent)
    assert is_transient(caught.value)
    assert batches.ledger.task_states(job_id) == {"queued": 10}  # nothing marked: the retry redoes it
    monkeypatch.setattr(batches.ingest.memory, "upsert", real_upsert)
    report = batches.process(sender.sent)
    assert (report.claimed, report.embedded, report.failed) == (10, 10, 0)
    assert batches.ledger.task_states(job_id) == {"embedded": 10}


def test_an_encoder_error_fails_only_the_item_at_fault(
    settings: Settings, batches: EmbedBatchService, shared_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = flickr_manifest(shared_data, tmp_path / "f", 10)
    rows = _rows(manifest)
    rows[3]["caption"] = "POISON " + rows[3]["caption"]
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    encoder = batches.ingest.encoder
    real = encoder.encode_texts

    def picky(texts: Sequence[str]) -> np.ndarray:
        if any("POISON" in t for t in texts):
            raise ValueError("this caption breaks the tokenizer")
        return real(texts)

    monkeypatch.setattr(encoder, "encode_texts", picky)
    sender = ListSender()
    job_id = dispatch_source(manifest, settings, sender, progress=False)["job_id"]
    report = batches.process(sender.sent)
    assert (report.embedded, report.failed, report.reasons) == (9, 1, {"encode_error": 1})
    assert batches.ledger.task_states(job_id) == {"embedded": 9, "failed": 1}


def test_lost_rows_are_resent_only_when_the_queue_drained(settings: Settings, ingest: IngestService,
                                                          shared_data: Path, tmp_path: Path) -> None:
    manifest = flickr_manifest(shared_data, tmp_path / "f", 5)
    dispatch_source(manifest, settings, ListSender(), progress=False)  # messages "lost": never processed
    quick = settings.model_copy(update={"ingest_stale_after_s": 1e-6})
    assert resend_lost(quick, ListSender(depths=[3])) == 0  # a backlog: they may still be waiting in it
    drained = ListSender(depths=[0])
    assert resend_lost(quick, drained) == 5 and len(drained.sent) == 5
    slow = settings.model_copy(update={"ingest_stale_after_s": 3600})
    assert resend_lost(slow, ListSender(depths=[0])) == 0  # young rows are not lost, just waiting


def test_backpressure_waits_while_the_queue_is_above_high_water() -> None:
    sender, naps = ListSender(depths=[9, 7, 3, 1]), []
    waited = wait_for_capacity(sender, high_water=4, poll_s=0.5, sleep=naps.append)
    assert (waited, naps) == (1.0, [0.5, 0.5])


def test_a_dispatcher_that_died_resumes_where_it_stopped(settings: Settings, ingest: IngestService,
                                                         shared_data: Path, tmp_path: Path) -> None:
    manifest = flickr_manifest(shared_data, tmp_path / "f", 40)
    small = settings.model_copy(update={"ingest_batch_size": 16})
    crashing = ListSender(fail_after=16)
    with pytest.raises(ConnectionError):
        dispatch_source(manifest, small, crashing, progress=False)
    again = ListSender()
    summary = dispatch_source(manifest, small, again, progress=False)
    assert summary["resumed"] and summary["submitted"] == 40
    assert sorted({r.seq for r in crashing.sent + again.sent}) == list(range(40))
    assert IngestLedger(ingest.repo).task_states(summary["job_id"]) == {"queued": 40}


def test_watch_folder_submits_new_files_and_appended_rows_once(settings: Settings, ingest: IngestService,
                                                               shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    manifest = flickr_manifest(shared_data, folder, 3)
    sender = ListSender()
    assert scan_once(folder, settings, sender, settle_s=0)["submitted"] == 3
    lines = (shared_data / "flickr8k" / "manifest.csv").read_text().splitlines()[4:6]
    for line in lines:
        shutil.copy(shared_data / "flickr8k" / line.split(",")[0], folder / line.split(",")[0])
    with manifest.open("a") as fh:
        fh.write(lines[0] + "\n" + lines[1])  # the last line is still being written: no newline yet
    assert scan_once(folder, settings, sender, settle_s=0)["submitted"] == 1
    with manifest.open("a") as fh:
        fh.write("\n")
    assert scan_once(folder, settings, sender, settle_s=0)["submitted"] == 1
    assert scan_once(folder, settings, sender, settle_s=0)["submitted"] == 0
    assert len({r.seq for r in sender.sent}) == len(sender.sent) == 5


def test_reembed_resumes_swaps_keeps_old_and_fails_changed_sources(
    settings: Settings, ingest: IngestService, shared_data: Path, tmp_path: Path
) -> None:
    manifest = flickr_manifest(shared_data, tmp_path / "f", 40)  # 8 images x 5 captions
    ingest_source(manifest, settings, service=ingest, progress=False)
    images = sorted((tmp_path / "f" / "images").iterdir())
    images[0].write_bytes(images[1].read_bytes())  # a source changed after ingestion: 5 captions
    small = settings.model_copy(update={"reembed_batch_size": 10})
    target = OpenClipEncoder("reco-tiny", "", seed=1)
    service = ReembedService(small, target, repo=ingest.repo, store=ingest.store)
    first = service.run(max_seconds=1e-9)  # out of time after one batch: resumes later
    assert (first.done + first.failed, first.remaining, first.swapped) == (10, 30, False)
    search = SearchService(settings, encoder=ingest.encoder)
    assert len(search.search(SearchRequest(text="a dog", k=3)).results) == 3  # old version still serves
    resumed = ReembedService(small, target, repo=ingest.repo, store=ingest.store)  # "after the kill"
    slices = [resumed.run(max_seconds=1e-9) for _ in range(3)]  # the slice that does the last batch swaps
    done = slices[-1]
    assert [s.swapped for s in slices] == [False, False, True]
    assert (done.done, done.failed, done.remaining) == (35, 5, 0)
    store = ingest.store
    assert store.live_collection(settings.memory_alias) == target.collection_name
    assert store.collection(ingest.memory.collection).count() == 40  # old version kept
    assert SearchService(settings, encoder=target).search(SearchRequest(text="a dog", k=3)).results
    assert fusion_status(ingest.repo)["retraining_required"]
    assert drop_old_versions(settings, repo=ingest.repo, store=store) == [ingest.memory.collection]


def test_reembed_cli_schedules_and_reports(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli import cli

    monkeypatch.setenv("RECO_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    scheduled = runner.invoke(cli, ["reembed", "--model", "reco-tiny", "--seed", "7", "--schedule", "--json"])
    assert scheduled.exit_code == 0, scheduled.output
    assert json.loads(scheduled.stdout.splitlines()[-1])["scheduled"] == "reco-tiny/random/s7"
    report = runner.invoke(cli, ["reembed", "--json"])
    versions = json.loads(report.stdout.splitlines()[-1])["versions"]
    assert [(v["encoder_id"], v["status"]) for v in versions] == [("reco-tiny/random/s7", "building")]


def test_retry_delay_backs_off_exponentially_with_a_cap() -> None:
    assert [retry_delay_s(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_failure_records_are_written_once_per_row(settings: Settings, batches: EmbedBatchService,
                                                  tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg at all")
    (folder / "a.txt").write_text("a caption")
    sender = ListSender()
    job_id = dispatch_source(folder, settings, sender, progress=False)["job_id"]
    for _ in range(3):
        batches.process(sender.sent)
    with batches.ledger.repo.session() as s:
        assert s.query(IngestFailure).filter_by(job_id=job_id).count() == 1


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --- the Celery side, without a broker ---------------------------------------------------------------
class _Request:
    def __init__(self, n: int) -> None:
        from types import SimpleNamespace

        self.task = SimpleNamespace(acks_late=True)
        self.id, self.name, self.args, self.kwargs = f"r{n}", "reco.embed.items", (1, n), {}
        self.delivery_info, self.hostname, self.reply_to, self.correlation_id = {}, "h", None, None
        self.request_dict: dict[str, Any] = {}
        self._payload = (self.args, self.kwargs, {})
        self.events: list[str] = []

    def acknowledge(self) -> None:
        self.events.append("ack")

    def reject(self, requeue: bool = False) -> None:
        self.events.append(f"reject(requeue={requeue})")


class _Pool:
    def apply_async(self, fn: Any, args: Any, **callbacks: Any) -> dict[str, Any]:
        return callbacks


def test_a_lost_pool_process_requeues_its_batch_and_a_returned_batch_is_acked() -> None:
    from billiard.einfo import ExceptionInfo
    from billiard.exceptions import WorkerLostError

    from workers.tasks import embed_items

    embed_items._pool = _Pool()
    lost, done = [_Request(n) for n in range(3)], [_Request(n) for n in range(2)]
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")
    except WorkerLostError:
        embed_items.flush(lost)["error_callback"](ExceptionInfo())
    embed_items.flush(done)["callback"](None)
    assert [r.events for r in lost] == [["reject(requeue=True)"]] * 3
    assert [r.events for r in done] == [["ack"]] * 2


def test_celery_app_routes_acks_late_and_prefetch(settings: Settings) -> None:
    from workers.celery_app import beat_schedule, create_celery_app, prefetch_multiplier

    app = create_celery_app(settings.model_copy(update={"embed_max_batch": 48}))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert {q.name for q in conf.task_queues} == {"embed", "refine", "maintenance"}
    for task, queue in [("reco.embed.items", "embed"), ("reco.refine.search", "refine"),
                        ("reco.maintenance.reembed", "maintenance")]:
        assert app.amqp.router.route({}, task)["queue"].name == queue
    assert prefetch_multiplier(app.reco_settings, ["embed", "maintenance"]) == 96  # two micro-batches
    assert prefetch_multiplier(app.reco_settings, ["refine"]) == 1
    from workers.tasks import app as task_app

    scheduled = {entry["task"] for entry in beat_schedule(settings).values()}
    assert scheduled <= set(task_app.tasks), scheduled - set(task_app.tasks)


def test_transient_errors_are_told_apart_from_bad_input() -> None:
    import redis
    from kombu.exceptions import OperationalError as BrokerDown
    from sqlalchemy.exc import OperationalError

    from app.memory.base import MemoryHeldElsewhere, MemoryStoreError
    from app.remote import ServerUnreachable
    from workers.runtime import is_transient_error

    transient = [OperationalError("SELECT 1", {}, Exception("server closed the connection")),
                 httpx.ConnectError("refused"), ConnectionRefusedError(), BrokerDown("redis down"),
                 redis.exceptions.ConnectionError("reset"),
                 MemoryHeldElsewhere("the memory at x is open in process 1 (an owner shutting down)"),
                 ServerUnreachable("reco serve at http://127.0.0.1:1 did not answer (restarting)")]
    permanent = [ValueError("bad caption"), KeyError("x"), MemoryStoreError("collection holds 512-d vectors")]
    assert [is_transient_error(e) for e in transient] == [True] * len(transient)
    assert [is_transient_error(e) for e in permanent] == [False] * len(permanent)


def test_items_left_pending_or_lost_from_qdrant_are_repaired(
    settings: Settings, batches: EmbedBatchService, shared_data: Path, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from app.schemas import EmbedStatus
    from workers.maintenance import repair_pending

    ingest = batches.ingest
    ingest_source(flickr_manifest(shared_data, tmp_path / "f", 10), settings, service=ingest, progress=False)
    ids = sorted(ingest.repo.item_ids_with_status(ingest.encoder_id, EmbedStatus.EMBEDDED))
    ingest.memory.delete(ids[:3])  # Qdrant lost two points: reconcile puts them back to pending
    ingest.repo.set_status(ids[2:4], ingest.encoder_id, EmbedStatus.PENDING)  # died before / after the upsert
    sender = ListSender()
    runtime = SimpleNamespace(ingest_service=lambda: ingest, sender=sender,
                              settings=settings.model_copy(update={"ingest_stale_after_s": 1e-6}))
    report = repair_pending(runtime)  # type: ignore[arg-type]
    assert (report["reset_to_pending"], report["marked_embedded"], report["resubmitted"]) == (2, 1, 3)
    batches.process(sender.sent)
    assert ingest.repo.status_counts() == {ingest.encoder_id: {"embedded": 10}} and ingest.memory.count() == 10


def test_workers_use_fp16_on_cuda_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings
    from workers.runtime import worker_settings

    assert worker_settings(get_settings(device="cuda")).precision == "fp16"
    assert worker_settings(get_settings(device="cpu")).precision == "auto"  # per image-tower family
    monkeypatch.setenv("RECO_PRECISION", "bf16")
    assert worker_settings(get_settings(device="cuda")).precision == "bf16"


def test_an_unusable_manifest_ends_its_async_job_failed_with_the_reason(settings: Settings, tmp_path: Path) -> None:
    """A manifest without an 'image' column cannot be resumed into anything: its job must not stay running."""
    from app.db.repo import MetadataRepo
    from app.db.session import upgrade_database
    from app.manifest import ManifestError
    from app.schemas import JobStatus
    from ingestion.sources import SourceError

    upgrade_database(settings.resolved_database_url)
    manifest = tmp_path / "no_image_column.csv"
    manifest.write_text("picture,caption\na.jpg,a dog\n")
    sender = ListSender()
    with pytest.raises((ManifestError, SourceError)):
        dispatch_source(manifest, settings, sender, progress=False)
    job = MetadataRepo.from_url(settings.resolved_database_url).latest_job()
    assert job is not None and job.status == JobStatus.FAILED and "image" in (job.error or "")
    assert sender.sent == []
