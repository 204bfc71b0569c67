"""``reco train`` / ``reco eval`` / ``reco predict`` services end to end on real images (CC0 Clothing-10),
a Qdrant Edge memory and a SQLite metadata DB. The encoder is the tiny random one: this proves
the plumbing (manifests, caching, near-duplicates, checkpoints, DB rows, JSON), not accuracy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.config import Settings
from app.db.runs import eval_runs, newest_checkpoint
from app.db.session import make_session_factory
from app.evaluation import METRICS
from app.imaging import open_image_safely
from app.manifest import read_manifest
from app.memory.base import ItemPayload, MemoryRecord, VectorMemory, image_hash, item_id_for
from app.memory.edge import EdgeStore
from app.schemas import RefineMode
from app.services.evaluate import EvalRequest, run_evaluation
from app.services.predict import PredictRequest, predict_image
from app.services.train import TrainRequest, run_training

N_MEMORY = 48


@pytest.fixture
def memory(tiny_encoder, shared_data: Path, tmp_path: Path) -> Iterator[VectorMemory]:  # type: ignore[no-untyped-def]
    """The first Clothing-10 training rows as memory pairs (embedded here, not through ingestion)."""
    rows = [r for r in read_manifest(shared_data / "clothing10" / "manifest.csv") if r.split == "train"]
    rows = rows[:N_MEMORY]
    data = [r.path.read_bytes() for r in rows if r.path]
    images = tiny_encoder.encode_images([open_image_safely(b) for b in data])
    texts = tiny_encoder.encode_texts([r.caption for r in rows])
    store = EdgeStore(tmp_path / "memory")
    mem = store.ensure_collection(f"reco__{tiny_encoder.encoder_id.replace('/', '_')}", tiny_encoder.dim)
    records = []
    for row, raw, v, t in zip(rows, data, images, texts, strict=True):
        sha = image_hash(raw)
        payload = ItemPayload(item_id=item_id_for(sha, row.caption), image_hash=sha, caption=row.caption,
                              dataset="clothing10", split="train", label=row.label, source=str(row.path))
        records.append(MemoryRecord(payload, v, t))
    mem.upsert(records)
    yield mem
    store.close()


@pytest.mark.slow
def test_train_evaluate_predict(settings: Settings, memory: VectorMemory, tiny_encoder, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    train = run_training(settings, TrainRequest(dataset="clothing10", split="train", epochs=2, batch_size=16, k=4,
                                                progress=False), encoder=tiny_encoder, memory=memory)
    assert Path(train.checkpoint).is_file() and train.pairs == N_MEMORY and train.memory_size == N_MEMORY
    factory = make_session_factory(settings.resolved_database_url)
    record = newest_checkpoint(factory, tiny_encoder.encoder_id)
    assert record is not None and record.id == train.checkpoint_id and record.sha256 == train.sha256
    assert (settings.data_dir / "cache" / "memory").is_dir()  # the export is cached for the next run

    zeroshot = run_evaluation(settings, EvalRequest(dataset=str(shared_data / "clothing10"), split="val", limit=24,
                                                    k=4, progress=False), encoder=tiny_encoder, memory=memory)
    report = zeroshot.to_json_dict()
    assert {(r["metric"], r["mode"]) for r in report["results"]} == {
        (m, mode) for m in ("top1", "top5") for mode in ("clip", "image", "text", "both")}
    assert report["encoder_id"] == tiny_encoder.encoder_id and report["checkpoint"].startswith(f"{record.id}:")
    assert all(0 <= r["value"] <= 1 and r["dataset"] == "clothing10" for r in report["results"])

    # Evaluating on the memory's own images: every one of them is an exact duplicate and must go.
    retrieval = run_evaluation(settings, EvalRequest(dataset="clothing10", split="train", task="retrieval",
                                                     modes=[RefineMode.CLIP, RefineMode.TEXT], k=4, limit=60,
                                                     progress=False), encoder=tiny_encoder, memory=memory)
    assert retrieval.near_duplicates_removed == N_MEMORY and retrieval.memory_size == 0
    assert {r.metric for r in retrieval.results} == set(METRICS[2:])
    assert [r["task"] for r in eval_runs(factory)] == ["retrieval", "zeroshot"]

    image = (shared_data / "clothing10" / "manifest.csv").parent
    first = next(r for r in read_manifest(image / "manifest.csv") if r.split == "val" and r.path)
    classes = (image / "classes.txt").read_text().split("\n")[:10]
    answer = predict_image(settings, PredictRequest(image_bytes=first.path.read_bytes(), classes=classes, k=4),
                           encoder=tiny_encoder, memory=memory)
    assert len(answer.predictions) == 5 and len(answer.neighbours) == 4 and answer.checkpoint is not None
    assert answer.self_attention is not None


def test_cli_train_and_eval_synthetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from app.cli import cli

    monkeypatch.setenv("RECO_DATA_DIR", str(tmp_path / "d"))
    runner = CliRunner()
    trained = runner.invoke(cli, ["train", "--dataset", "synthetic", "--epochs", "2", "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout.strip().splitlines()[-1])["encoder_id"] == "synthetic/d64/s0"
    evaluated = runner.invoke(cli, ["eval", "--dataset", "synthetic", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert {"results", "memory_size", "k", "encoder_id", "checkpoint", "near_duplicates_removed"} == set(report)
    assert {r["dataset"] for r in report["results"]} == {"synthetic", "synthetic/mean-fusion",
                                                         "synthetic/shuffled-memory"}
    assert runner.invoke(cli, ["eval", "--help"]).exit_code == 0
