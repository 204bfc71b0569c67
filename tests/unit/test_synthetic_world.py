"""THE method test: in a world with a known answer, RECO must do what the paper says it does.

The world (app/synthetic.py): fine-grained image clusters, class names the frozen text side maps
poorly (zero-shot CLIP at chance), a memory of pairs whose captions name the concept, training on
concepts disjoint from the evaluation classes. Expected: RECO ``both`` far above CLIP; untrained
mean fusion far below the transformer; a memory whose captions were shuffled gives RECO nothing;
the loss decreases and the temperature moves.
"""

from __future__ import annotations

import pytest

from app.evaluation.report import EvalReport
from app.fusion.config import get_fusion_config
from app.fusion.train import TrainResult, train_fusion
from app.synthetic import DATASET, SyntheticWorld, evaluate_synthetic, synthetic_train_options

pytestmark = pytest.mark.slow
MODES = ("image", "text", "both")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


@pytest.fixture(scope="module")
def trained(world: SyntheticWorld) -> TrainResult:
    return train_fusion(world.training_pairs(), world.memory(), get_fusion_config("reco-fusion-b"),
                        synthetic_train_options(progress=False), encoder_id=world.encoder_id)


@pytest.fixture(scope="module")
def report(world: SyntheticWorld, trained: TrainResult) -> EvalReport:
    return evaluate_synthetic(world, trained.model, k=10)


def top1(report: EvalReport, dataset: str, mode: str) -> float:
    return report.value(dataset, "top1", mode)


def test_training_and_evaluation_concepts_are_disjoint(world: SyntheticWorld) -> None:
    assert min(world.eval_concepts) >= world.cfg.train_concepts
    assert len(world.training_pairs()) == world.cfg.train_concepts * world.cfg.train_per_concept


def test_loss_decreases_and_temperature_is_learned(trained: TrainResult) -> None:
    history = trained.metrics["loss_history"]
    assert history[-1] < 0.5 * history[0]
    assert abs(trained.metrics["logit_scale"] - trained.metrics["logit_scale_init"]) > 0.1
    assert trained.metrics["temperature"] != pytest.approx(0.07, abs=1e-3)


def test_clip_is_near_chance(world: SyntheticWorld, report: EvalReport) -> None:
    chance = 1 / world.cfg.eval_classes
    assert top1(report, DATASET, "clip") <= chance + 2 / world.cfg.eval_classes


def test_reco_both_is_far_above_clip(report: EvalReport) -> None:
    assert top1(report, DATASET, "both") >= top1(report, DATASET, "clip") + 0.5
    assert top1(report, DATASET, "image") >= top1(report, DATASET, "clip") + 0.5


def test_mean_fusion_is_worse_than_transformer_fusion(report: EvalReport) -> None:
    mean = f"{DATASET}/mean-fusion"
    assert top1(report, mean, "both") <= top1(report, DATASET, "both") - 0.4
    best_mean = max(top1(report, mean, m) for m in MODES)
    best_reco = max(top1(report, DATASET, m) for m in MODES)
    assert best_mean <= best_reco - 0.1


def test_memory_without_signal_gives_no_gain(world: SyntheticWorld, report: EvalReport) -> None:
    """Shuffled captions: RECO may differ from CLIP only by noise. Per-class predictions are
    consistent, so the noise is at class level: each class the model happens to get right adds
    1/C; allow three such classes."""
    noise = 3 / world.cfg.eval_classes
    clip = top1(report, DATASET, "clip")
    for mode in MODES:
        assert top1(report, f"{DATASET}/shuffled-memory", mode) <= clip + noise
