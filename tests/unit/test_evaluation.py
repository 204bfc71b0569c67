"""Metrics, near-duplicate removal and the report's JSON shape."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from app.evaluation import METRICS, EvalReport, ResultRow, recall_at_k, remove_near_duplicates, topk_accuracy
from app.evaluation.near_duplicates import calibrate_threshold
from app.memory.exact import ExactIndex
from app.schemas import RefineMode


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_topk_accuracy() -> None:
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.7]])
    assert topk_accuracy(logits, np.array([0, 0, 2]), (1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


def test_recall_with_several_captions_per_image() -> None:
    images = np.eye(3, 4, dtype=np.float32)
    # captions 0, 1, 4 -> image 0; 2 -> image 1; 3 -> image 2. Caption 3 looks like image 1, caption 4 like image 2.
    texts = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0.9, 0.1, 0], [0, 0, 0.5, 0]], np.float32)
    image_of_text = np.array([0, 0, 1, 2, 0])
    r = recall_at_k(images, texts, image_of_text, ks=(1, 2))
    assert r["i2t_r@1"] == pytest.approx(2 / 3) and r["i2t_r@2"] == pytest.approx(1.0)
    assert r["t2i_r@1"] == pytest.approx(3 / 5) and r["t2i_r@2"] == pytest.approx(1.0)
    sims = images @ texts.T  # brute force: is an image's best caption one of its own?
    assert r["i2t_r@1"] == np.mean([image_of_text[sims[i].argmax()] == i for i in range(3)])


def test_near_duplicates_removed_by_hash_and_by_embedding() -> None:
    rng = np.random.default_rng(0)
    memory_images = _unit(rng.normal(size=(50, 32)))
    rows = np.repeat(np.arange(50), 2)  # two captions per image
    index = ExactIndex([f"i{r}" for r in range(100)], memory_images[rows], _unit(rng.normal(size=(100, 32))),
                       [f"h{i}" for i in rows])
    eval_images = np.stack([memory_images[3],  # same hash -> removed by hash
                            _unit(memory_images[7] + 0.01 * rng.normal(size=32)),  # near copy -> by embedding
                            _unit(rng.normal(size=32))])  # unrelated
    out = remove_near_duplicates(index, eval_images, ["h3", "other", "other2"], threshold=0.95)
    assert (out.removed, out.by_hash, out.by_embedding) == (4, 2, 2)
    assert len(out.index) == 96 and not {"h3", "h7"} & set(out.index.image_hashes)
    nothing = remove_near_duplicates(index, eval_images[2:], ["x"], threshold=0.99)
    assert nothing.removed == 0 and nothing.index is index


def test_calibrated_threshold_is_a_high_nearest_neighbour_percentile() -> None:
    rng = np.random.default_rng(1)
    images = _unit(rng.normal(size=(200, 16)))
    index = ExactIndex([str(i) for i in range(200)], images, images, [f"h{i}" for i in range(200)])
    threshold = calibrate_threshold(index, percentile=99.5)
    sims = images @ images.T
    np.fill_diagonal(sims, -1)
    assert np.quantile(sims.max(1), 0.9) < threshold <= sims.max() + 1e-6
    out = remove_near_duplicates(index, images[:1], ["not-in-memory"])
    assert out.calibrated and out.by_embedding == 1  # the query itself is in the memory under another hash


def test_report_json_has_exactly_the_contract_fields() -> None:
    rows = [ResultRow(dataset="cub100", task="zeroshot", metric="top1", mode=RefineMode.BOTH, value=0.5)]
    report = EvalReport(results=rows, memory_size=10, k=10, encoder_id="e", checkpoint="1:f",
                        near_duplicates_removed=2).to_json_dict()
    assert set(report) == {"results", "memory_size", "k", "encoder_id", "checkpoint", "near_duplicates_removed"}
    assert report["results"] == [{"dataset": "cub100", "task": "zeroshot", "metric": "top1", "mode": "both",
                                  "value": 0.5}]
    assert METRICS == ("top1", "top5", "i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10")
    with pytest.raises(ValidationError):
        ResultRow(dataset="x", task="zeroshot", metric="top1", mode=RefineMode.CLIP, value=1.5)
