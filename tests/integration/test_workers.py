"""Embed workers for real: worker processes, the Redis broker, PostgreSQL, Qdrant local mode.

Exactly-once is checked by counts: every submitted row ends embedded or failed (ledger), each item is
one DB row and one Qdrant point, nothing is pending, and the job's counts equal the ledger's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.config import Settings, get_settings
from app.db.models import Embedding, IngestFailure, IngestTask, Item
from app.memory.store import close_stores, open_store
from app.services.ingest_ledger import IngestLedger
from ingestion.dispatch import dispatch_source, wait_for_job
from tests.integration.workers_support import (  # noqa: F401 - fixtures
    ARTIFACTS,
    N_ITEMS,
    PrivateRedis,
    Stack,
    make_stack,
    manifest_500_fixture,
    stack_fixture,
    wait_until,
)
from workers.celery_app import create_celery_app
from workers.client import CeleryTaskSender

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def _sender(settings: Settings) -> CeleryTaskSender:
    return CeleryTaskSender(create_celery_app(settings))


def _ledger(settings: Settings) -> IngestLedger:
    return IngestLedger.from_url(settings.resolved_database_url)


def _done(ledger: IngestLedger, job_id: int) -> int:
    states = ledger.task_states(job_id)
    return states.get("embedded", 0) + states.get("failed", 0)


def _pending(ledger: IngestLedger) -> int:
    return sum(counts.get("pending", 0) for counts in ledger.repo.status_counts().values())


def exactly_once_counts(settings: Settings, job_id: int) -> dict[str, Any]:
    """Counts from the ledger, the DB and Qdrant (workers stopped: the local store is ours now)."""
    ledger = _ledger(settings)
    with ledger.repo.session() as s:
        rows = s.execute(select(IngestTask.state, IngestTask.item_id, IngestTask.sends)
                         .where(IngestTask.job_id == job_id)).all()
        item_ids = set(s.scalars(select(Item.id)))
        statuses = dict(s.execute(select(Embedding.status, func.count()).group_by(Embedding.status)).all())
        reprocessed = s.scalar(select(func.count()).select_from(Embedding).where(Embedding.attempts > 1)) or 0
        failures = s.scalar(select(func.count()).select_from(IngestFailure).where(IngestFailure.job_id == job_id))
    store = open_store(settings)
    memory = store.collection(store.live_collection(settings.memory_alias) or "")
    points = [p.item_id for page in memory.scroll(limit=1000) for p in page]
    embedded = [r for r in rows if r.state == "embedded"]
    failed = [r for r in rows if r.state == "failed"]
    return {
        "submitted": len(rows), "embedded": len(embedded), "failed": len(failed),
        "lost": len(rows) - len(embedded) - len(failed),
        "duplicated": (len(points) - len(set(points))) + (sum(statuses.values()) - len(item_ids)),
        "distinct_items": len({r.item_id for r in embedded}), "qdrant_points": len(points),
        "db_items": len(item_ids), "db_status": {str(k): int(v) for k, v in statuses.items()},
        "points_equal_items": set(points) == item_ids, "failure_records": int(failures or 0),
        "rows_sent_more_than_once": sum(1 for r in rows if r.sends > 1), "items_reprocessed": int(reprocessed),
        "job": {k: v for k, v in ledger.refresh_job(job_id).items()},
    }


def assert_exactly_once(counts: dict[str, Any], n: int) -> None:
    assert counts["submitted"] == n
    assert (counts["embedded"], counts["failed"], counts["lost"], counts["duplicated"]) == (n, 0, 0, 0), counts
    assert counts["distinct_items"] == counts["qdrant_points"] == counts["db_items"] == n, counts
    assert counts["points_equal_items"] and counts["db_status"] == {"embedded": n}, counts
    assert counts["job"] == {"seen": n, "ingested": n, "duplicates": 0, "failed": 0, "queued": 0}, counts


def record(name: str, counts: dict[str, Any]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "worker_fault_counts.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = counts
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(name, json.dumps(counts, default=str))


def test_500_items_through_the_async_path_end_embedded_once(stack: Stack, manifest_500: Path) -> None:
    settings = get_settings()
    stack.worker("embed,maintenance", "embed")
    summary = dispatch_source(manifest_500, settings, _sender(settings), progress=False)
    assert summary["submitted"] == N_ITEMS
    done = wait_for_job(_ledger(settings), summary["job_id"], timeout_s=180, poll_s=0.5)
    assert done["status"] == "completed"
    stack.stop_all()
    counts = exactly_once_counts(settings, summary["job_id"])
    record("async_500", counts)
    assert_exactly_once(counts, N_ITEMS)
    assert counts["items_reprocessed"] == 0 and counts["rows_sent_more_than_once"] == 0  # no fault: once each


def test_sigkill_of_the_embed_worker_mid_batch_loses_and_duplicates_nothing(
    stack: Stack, manifest_500: Path
) -> None:
    settings = get_settings()
    ledger = _ledger(settings)
    worker = stack.worker("embed,maintenance", "embed")
    stack.beat()  # as deployed: a message popped from Redis but not yet recorded as unacked dies with the worker
    summary = dispatch_source(manifest_500, settings, _sender(settings), progress=False)
    job_id = summary["job_id"]
    wait_until(lambda: _done(ledger, job_id) >= 64, 120, "two batches done")
    # mid-batch: a batch's items are committed as pending and its vectors are being computed or written
    wait_until(lambda: _pending(ledger) > 0, 60, "a batch between 'pending' and 'embedded'", poll_s=0.01)
    worker.kill_pool_child()  # the main process sees WorkerLostError and requeues the batch
    at_child_kill = _done(ledger, job_id)
    wait_until(lambda: _done(ledger, job_id) >= at_child_kill + 64, 120, "a new pool process embedding")
    wait_until(lambda: _pending(ledger) > 0, 60, "a batch between 'pending' and 'embedded'", poll_s=0.01)
    worker.kill()  # SIGKILL main process and pool child at once
    at_kill = {"done_at_child_kill": at_child_kill, "done": _done(ledger, job_id),
               "db_status": ledger.repo.status_counts()}
    assert 0 < at_kill["done"] < N_ITEMS and _pending(ledger) > 0, at_kill
    assert "requeued" in worker.text()  # the lost batch went back to the queue (CrashSafeBatches)
    stack.procs.remove(worker)
    stack.worker("embed,maintenance", "embed-restarted")  # unacked messages come back after the visibility timeout
    wait_for_job(ledger, job_id, timeout_s=180, poll_s=0.5)
    stack.stop_all()
    counts = exactly_once_counts(settings, job_id) | {"at_kill": at_kill}
    record("sigkill_mid_batch", counts)
    assert_exactly_once(counts, N_ITEMS)
    assert counts["items_reprocessed"] > 0  # the killed batch's items were done again, and stored once


def test_redis_restart_during_ingestion_completes(
    tmp_path: Path, postgres_url: str, manifest_500: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    stack = make_stack(tmp_path, postgres_url, redis_server.url, monkeypatch)
    try:
        settings = get_settings()
        ledger = _ledger(settings)
        stack.worker("embed,maintenance", "embed")
        stack.beat()  # resends rows whose messages the restart lost
        summary = dispatch_source(manifest_500, settings, _sender(settings), progress=False)
        job_id = summary["job_id"]
        wait_until(lambda: _done(ledger, job_id) >= 64, 120, "two batches done")
        at_restart = _done(ledger, job_id)
        redis_server.restart()  # no persistence: every message still queued is gone
        wait_for_job(ledger, job_id, timeout_s=240, poll_s=0.5)
        stack.stop_all()
        counts = exactly_once_counts(settings, job_id) | {"done_at_restart": at_restart}
    finally:
        stack.stop_all()
        redis_server.stop()
        close_stores()
    record("redis_restart", counts)
    assert at_restart < N_ITEMS
    assert_exactly_once(counts, N_ITEMS)
