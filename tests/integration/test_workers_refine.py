"""The refine worker for real: a worker process on the ``refine`` queue, answering through the broker.

The memory (200 distinct Flickr8k images, one caption each) is ingested and a fusion checkpoint trained
in this process; then ``reco serve`` owns the memory; the worker must answer ``predict`` and ``search``
exactly as the serving service answers in this process (both reach the memory through the server).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings, get_settings
from app.memory.store import close_stores
from app.schemas import RefineMode
from app.services.ingest import IngestService
from app.services.serving import PredictionOut, PredictQuery, SearchQuery, ServingService
from app.services.train import TrainRequest, run_training
from ingestion.pipeline import ingest_source
from tests.integration.workers_support import ARTIFACTS, Stack, make_stack, shared_redis_broker
from workers.celery_app import create_celery_app
from workers.client import RefineClient

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

CLASSES = ["dog", "child", "bicycle", "water", "street", "snow"]
N_IMAGES = 200
TOL = 1e-4


def distinct_image_manifest(shared_data: Path, out: Path, n_images: int) -> Path:
    """One caption per image: no two memory rows share an image (ties between backends are impossible)."""
    src = shared_data / "flickr8k"
    seen: set[str] = set()
    rows = []
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["image"] not in seen and row["split"] == "train":
                seen.add(row["image"])
                rows.append(row)
            if len(rows) == n_images:
                break
    (out / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(src / r["image"], out / r["image"])
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


@pytest.fixture
def refine_stack(
    tmp_path: Path, postgres_url: str, redis_url: str, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Stack, Settings, Path]]:
    stack = make_stack(tmp_path, postgres_url, shared_redis_broker(redis_url), monkeypatch)
    monkeypatch.setenv("RECO_K_INFER", "5")
    stack.env["RECO_K_INFER"] = "5"
    settings = get_settings()
    manifest = distinct_image_manifest(shared_data, tmp_path / "flickr-distinct", N_IMAGES)
    service = IngestService(settings)
    ingest_source(manifest, settings, service=service, progress=False)
    run_training(settings, TrainRequest(dataset="flickr-distinct", split="train", epochs=1, batch_size=64,
                                        progress=False), encoder=service.encoder, memory=service.memory)
    close_stores()  # the memory is the server's now: the worker and this process reach it through it
    try:
        stack.serve()
        yield stack, settings, manifest
    finally:
        stack.stop_all()
        close_stores()


def _same_predictions(worker: dict, local: PredictionOut) -> None:  # type: ignore[type-arg]
    for side in ("clip", "reco"):
        mine = getattr(local, side)
        assert [p["name"] for p in worker[side]] == [p.name for p in mine]
        assert np.allclose([p["score"] for p in worker[side]], [p.score for p in mine], atol=TOL)
    assert [n["item_id"] for n in worker["neighbours"]] == [n.item_id for n in local.neighbours]
    assert np.allclose([n["attention"] for n in worker["neighbours"]], [n.attention for n in local.neighbours],
                       atol=TOL)


def _same_results(worker: list[dict], local: list) -> None:  # type: ignore[type-arg]
    assert [r["item_id"] for r in worker] == [r.item_id for r in local]
    assert np.allclose([r["score"] for r in worker], [r.score for r in local], atol=TOL)


def test_refine_worker_answers_like_the_serving_service(refine_stack: tuple[Stack, Settings, Path]) -> None:
    """The worker wraps the one serving service and reaches the memory through reco serve: its answers equal
    the service's in this process (same engine), and a request's own k' is honoured."""
    stack, settings, manifest = refine_stack
    stack.worker("refine", "refine")
    client = RefineClient(create_celery_app(settings), timeout_s=120)
    images = sorted((manifest.parent / "images").iterdir())
    image = images[0].read_bytes()
    local_service = ServingService(settings)
    assert local_service.store.backend == "reco-serve"

    answer = client.predict(image, CLASSES, mode="both")
    assert answer["reco"] is not None and answer["reco_unavailable"] is None, answer["reco_unavailable"]
    local = local_service.predict([("image", image)], PredictQuery(labels=CLASSES, mode=RefineMode.BOTH))[0]
    _same_predictions(answer, local)
    assert len(answer["neighbours"]) == 5 and all(n["caption"] for n in answer["neighbours"])
    narrow = client.predict(image, CLASSES, mode="both", k=3)  # k' != RECO_K_INFER: the request's own
    assert len(narrow["neighbours"]) == 3 and narrow["k"] == 3

    text = "a dog runs through the grass"
    found = client.search({"text": text}, mode="clip", k=10)
    _same_results(found["results"], local_service.search(SearchQuery(text=text, k=10)).results)
    refined = client.search({"text": text}, mode="text", k=10)
    mine = local_service.search(SearchQuery(text=text, k=10, mode=RefineMode.TEXT))
    assert refined["reco"] and mine.reco
    _same_results(refined["results"], mine.results)
    assert len(refined["neighbours"]) == 5 and refined["self_attention"] is not None

    client.stats(reset=True)  # leave the cold start (encoder, checkpoint loading) out
    for n in range(40):  # latency on this CPU: p50/p99 as the worker measures them
        client.predict(images[n % len(images)].read_bytes(), CLASSES, mode="both")
        client.search({"text": f"{text} {n}"}, mode="text", k=10)
    stats = client.stats()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "refine_latency.json").write_text(json.dumps(stats, indent=2, default=str) + "\n")
    print("refine latency", json.dumps(stats["latency"]))
    assert stats["latency"]["predict"]["n"] == 40 and stats["latency"]["search"]["n"] == 40
