"""Checkpoints and evaluation runs in the metadata DB (SQLite file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Base, EvalRun
from app.db.runs import (
    checkpoint_by_sha256,
    checkpoints_newest_first,
    eval_runs,
    newest_checkpoint,
    register_checkpoint,
    store_eval_run,
)


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    Base.metadata.create_all(engine)
    return sessionmaker(bind=engine, expire_on_commit=False)


def _register(factory: sessionmaker[Session], sha: str, encoder: str = "enc") -> int:
    return register_checkpoint(factory, path=f"/c/{sha}.safetensors", sha256=sha, encoder_id=encoder,
                               memory_version="m1", config={"heads": 8}, metrics={"final_loss": 1.0}).id


def test_register_is_idempotent_and_newest_wins(factory: sessionmaker[Session]) -> None:
    first = _register(factory, "a" * 64)
    assert _register(factory, "a" * 64) == first
    second = _register(factory, "b" * 64)
    _register(factory, "c" * 64, encoder="other")
    newest = newest_checkpoint(factory, "enc")
    assert newest is not None and newest.id == second and newest.config == {"heads": 8}
    assert newest_checkpoint(factory, "nobody") is None
    found = checkpoint_by_sha256(factory, "a" * 64)
    assert found is not None and found.id == first
    assert [r.id for r in checkpoints_newest_first(factory, "enc")] == [second, first]
    assert checkpoints_newest_first(factory, "nobody") == []


def test_store_eval_run_one_row_per_dataset_and_task(factory: sessionmaker[Session]) -> None:
    ckpt = _register(factory, "d" * 64)
    report = {
        "results": [
            {"dataset": "cub100", "task": "zeroshot", "metric": "top1", "mode": "clip", "value": 0.2},
            {"dataset": "cub100", "task": "zeroshot", "metric": "top5", "mode": "clip", "value": 0.6},
            {"dataset": "cub100", "task": "zeroshot", "metric": "top1", "mode": "both", "value": 0.4},
            {"dataset": "flickr8k", "task": "retrieval", "metric": "i2t_r@1", "mode": "text", "value": 0.1},
        ],
        "memory_size": 100, "k": 10, "encoder_id": "enc", "checkpoint": "1:x", "near_duplicates_removed": 3,
    }
    ids = store_eval_run(factory, report, checkpoint_id=ckpt, options={"split": "test"})
    assert len(ids) == 2
    with factory() as s:
        runs = {r.dataset: r for r in s.scalars(select(EvalRun))}
    assert runs["cub100"].best_value == pytest.approx(0.4) and runs["cub100"].near_duplicates_removed == 3
    assert runs["cub100"].checkpoint_id == ckpt and len(runs["cub100"].results["rows"]) == 3
    assert [r["dataset"] for r in eval_runs(factory, dataset="flickr8k")] == ["flickr8k"]
