"""Defect 7: the scheduled check re-embeds when the configured encoder is not the live one.

The memory is ingested with one encoder (reco-tiny, seed 0); the workers are started configured with another
(seed 1). The scheduled check (``reco.maintenance.reembed_check``, what beat sends every
RECO_REEMBED_CHECK_INTERVAL_S) starts the re-embedding, the alias moves when it is complete, the old version
is kept until dropped, 0 items are lost, searches answer throughout — and a second check changes nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.config import get_settings
from app.memory.store import close_stores, open_store
from app.services.ingest import IngestService, prepare_storage
from ingestion.pipeline import ingest_source
from tests.conftest import SHARED_DATA
from tests.integration.reembed_support import NEW, OLD, embedded, start_searching
from tests.integration.workers_support import (  # noqa: F401 - fixtures
    Stack,
    flickr_manifest,
    stack_fixture,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

N_ITEMS = 100


def test_changed_encoder_setting_starts_one_reembedding(stack: Stack, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if not (SHARED_DATA / "flickr8k").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: ../shared/data/flickr8k is missing (CI runs with ../shared beside the clone)")
        pytest.skip("shared Flickr8k data not here")
    settings = get_settings(random_init_seed=0)
    prepare_storage(settings)
    service = IngestService(settings)
    ingest_source(flickr_manifest(SHARED_DATA, tmp_path / "flickr", N_ITEMS), settings, service=service,
                  progress=False)
    repo = service.repo
    assert {v.encoder_id for v in repo.versions()} == {OLD}
    close_stores()
    stack.env["RECO_RANDOM_INIT_SEED"] = "1"  # the operator changed the encoder setting and restarted
    monkeypatch.setenv("RECO_RANDOM_INIT_SEED", "1")
    stack.serve()
    stack.worker("embed,maintenance", "owner")
    stack.worker("refine", "refine")
    app, searcher = start_searching(get_settings(), "the check")
    app.send_task("reco.maintenance.reembed_check")
    wait_until(lambda: any(v.is_live and v.encoder_id == NEW for v in repo.versions()), 240, "alias swapped")
    wait_until(lambda: NEW in searcher.answers[-3:], 60, "searches answered with the new encoder")
    app.send_task("reco.maintenance.reembed_check")  # again: nothing more to do
    time.sleep(5)
    searcher.stop.set()
    searcher.join(timeout=60)
    stack.stop_all()

    store = open_store(get_settings())
    versions = {v.encoder_id: v for v in repo.versions()}
    assert searcher.errors == [], searcher.errors[:5]
    assert set(versions) == {OLD, NEW}
    assert versions[NEW].is_live and versions[OLD].status == "ready"
    assert store.live_collection(settings.memory_alias) == versions[NEW].collection
    assert embedded(repo, NEW) == store.collection(versions[NEW].collection).count() == N_ITEMS
    assert store.collection(versions[OLD].collection).count() == N_ITEMS  # kept until dropped
