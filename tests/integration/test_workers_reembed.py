"""Re-embedding for real: the maintenance worker is SIGKILLed halfway, restarted, and finishes; searches
served by the refine worker meanwhile never fail, and switch to the new encoder when the alias swaps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from app.config import get_settings
from app.memory.store import close_stores, open_store
from app.services.ingest import IngestService
from app.services.reembed import drop_old_versions, fusion_status
from ingestion.pipeline import ingest_source
from tests.conftest import SHARED_DATA
from tests.integration.reembed_support import NEW, OLD, embedded, start_searching
from tests.integration.workers_support import (  # noqa: F401 - fixtures
    ARTIFACTS,
    Stack,
    flickr_manifest,
    stack_fixture,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

N_ITEMS = 250  # 50 Flickr8k images x 5 captions: 5 re-embedding batches of 50


def test_reembed_killed_halfway_resumes_and_searches_never_fail(stack: Stack, tmp_path: Path) -> None:
    settings = get_settings()
    service = IngestService(settings)  # the memory to re-embed, written in this process
    ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "flickr", N_ITEMS), settings, service=service,
                  progress=False)
    repo = service.repo
    close_stores()  # hand the memory over to reco serve: the workers (and this process) go through it
    stack.serve()
    owner = stack.worker("embed,maintenance", "owner")
    stack.worker("refine", "refine")
    app, searcher = start_searching(settings, "the re-embed")
    app.send_task("reco.maintenance.reembed", args=("reco-tiny", "", 1, True, 2.0))  # 2-second slices
    wait_until(lambda: embedded(repo, NEW) >= 100, 120, "two batches re-embedded")
    owner.kill()
    at_kill = embedded(repo, NEW)
    assert 0 < at_kill < N_ITEMS
    stack.procs.remove(owner)
    time.sleep(2)  # searches while no owner process is running at all
    stack.worker("embed,maintenance", "owner-restarted")  # the unacked slice comes back: resumes
    wait_until(lambda: any(v.is_live and v.encoder_id == NEW for v in repo.versions()), 180, "alias swapped")
    wait_until(lambda: NEW in searcher.answers[-3:], 60, "searches answered with the new encoder")
    searcher.stop.set()
    searcher.join(timeout=60)
    stack.stop_all()

    store = open_store(settings)
    versions = {v.encoder_id: v for v in repo.versions()}
    counts: dict[str, Any] = {
        "done_at_kill": at_kill, "searches": len(searcher.answers), "search_errors": len(searcher.errors),
        "answered_by_old": searcher.answers.count(OLD), "answered_by_new": searcher.answers.count(NEW),
        "alias": store.live_collection(settings.memory_alias),
        "new_points": store.collection(versions[NEW].collection).count(),
        "old_points_kept": store.collection(versions[OLD].collection).count(),
        "status": {k: v.status for k, v in versions.items()}, "new_embedded_rows": embedded(repo, NEW),
        "fusion": fusion_status(repo),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "reembed_kill.json").write_text(json.dumps(counts, indent=2, default=str) + "\n")
    print("reembed", json.dumps(counts, default=str))
    assert searcher.errors == [], searcher.errors[:5]
    assert counts["answered_by_old"] > 0 and counts["answered_by_new"] > 0
    assert counts["alias"] == versions[NEW].collection
    assert counts["new_points"] == counts["new_embedded_rows"] == counts["old_points_kept"] == N_ITEMS
    assert counts["status"] == {OLD: "ready", NEW: "live"}
    assert counts["fusion"]["retraining_required"] and counts["fusion"]["live_encoder_id"] == NEW
    assert drop_old_versions(settings, repo=repo, store=store) == [versions[OLD].collection]
    assert not store.collection_exists(versions[OLD].collection)
