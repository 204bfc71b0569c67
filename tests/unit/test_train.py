"""Training mechanics: self-excluded neighbours, the schedule, options, the checkpoint it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import Settings, get_settings
from app.fusion.checkpoint import load_checkpoint
from app.fusion.config import FusionCfg, get_fusion_config
from app.fusion.recipe import PAPER_RECIPE
from app.fusion.train import TrainingPairs, TrainOptions, cosine_with_warmup, precompute_neighbours, train_fusion
from app.memory.exact import ExactIndex
from app.retrieval import RetrievalCfg
from app.synthetic import SyntheticCfg, SyntheticWorld, synthetic_train_options

SMALL = SyntheticCfg(train_concepts=60, eval_classes=10, train_per_concept=2, memory_per_concept=3)


def test_pairs_in_the_memory_never_see_themselves() -> None:
    world = SyntheticWorld(SMALL)
    memory = world.memory()
    rows = np.arange(0, 90, 3)  # pairs that are memory rows themselves (as with Flickr8k train)
    pairs = TrainingPairs(np.asarray(memory.matrix("image")[rows]), np.asarray(memory.matrix("text")[rows]),
                          ids=[memory.ids[r] for r in rows], image_hashes=[memory.image_hashes[r] for r in rows])
    image_nb, text_nb = precompute_neighbours(memory, pairs, 5, RetrievalCfg())
    for q, r in enumerate(rows):
        for nb in (image_nb, text_nb):
            assert r not in nb.rows[q] and nb.valid[q].all()
            assert memory.image_hashes[r] not in {memory.image_hashes[x] for x in nb.rows[q]}


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    f = cosine_with_warmup(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-9)


def test_options_come_from_settings_with_paper_defaults() -> None:
    options = TrainOptions.from_settings(get_settings(), epochs=3)
    assert (options.lr, options.weight_decay, options.batch_size, options.k) == (1e-3, 1e-5, 4096, 10)
    assert options.epochs == 3 and options.query_dropout == 0.0 and not options.gated_init
    assert options.retrieval == RetrievalCfg("uni", "cross", True)



def test_training_defaults_have_one_source() -> None:
    """The settings' defaults and TrainOptions' defaults are the paper recipe of app/fusion/recipe.py."""
    settings = Settings()
    plain, from_settings = TrainOptions(), TrainOptions.from_settings(settings)
    for name in ("k", "lr", "weight_decay", "batch_size", "epochs", "warmup_steps", "seed"):
        assert getattr(plain, name) == getattr(from_settings, name) == getattr(PAPER_RECIPE, name), name
    assert (PAPER_RECIPE.lr, PAPER_RECIPE.weight_decay, PAPER_RECIPE.batch_size, PAPER_RECIPE.epochs) == (
        1e-3, 1e-5, 4096, 10)  # the paper's Sec. 4

@pytest.mark.parametrize("extra", [{}, {"query_dropout": 0.3}, {"gated_init": True}])
def test_training_writes_a_loadable_checkpoint_with_metrics(tmp_path: Path, extra: dict[str, object]) -> None:
    world = SyntheticWorld(SMALL)
    options = synthetic_train_options(epochs=3, batch_size=32, warmup_steps=2, progress=False, **extra)
    result = train_fusion(world.training_pairs(), world.memory(), get_fusion_config("reco-fusion-b"), options,
                          encoder_id=world.encoder_id, checkpoint_path=tmp_path / "f.safetensors")
    assert result.checkpoint is not None and result.sha256 is not None
    model, meta = load_checkpoint(result.checkpoint, expected_sha256=result.sha256)
    assert meta.encoder_id == world.encoder_id and meta.memory_version == world.memory().version
    assert meta.options["retrieval"] == {"search": "uni", "fusion": "cross", "dedupe_by_image": True}
    assert meta.fusion_cfg.gated == bool(extra.get("gated_init"))
    m = meta.metrics
    assert m["steps"] == 3 * (len(world.training_pairs()) // 32) and len(m["loss_history"]) == 3
    assert set(m["loss_parts"]) == {"nce_vbar_tbar", "nce_vbar_t", "nce_v_tbar"}
    assert m["logit_scale"] != m["logit_scale_init"]


def test_training_is_reproducible_for_a_seed() -> None:
    world = SyntheticWorld(SMALL)
    options = synthetic_train_options(epochs=2, batch_size=32, progress=False)
    a = train_fusion(world.training_pairs(), world.memory(), get_fusion_config("reco-fusion-b"), options,
                     encoder_id="x")
    b = train_fusion(world.training_pairs(), world.memory(), get_fusion_config("reco-fusion-b"), options,
                     encoder_id="x")
    assert a.metrics["loss_history"] == b.metrics["loss_history"]


def test_one_pair_is_refused() -> None:
    index = ExactIndex(["a"], np.ones((1, 4)), np.ones((1, 4)), ["h"])
    with pytest.raises(ValueError, match="two pairs"):
        train_fusion(TrainingPairs(np.ones((1, 4)), np.ones((1, 4))), index, FusionCfg(heads=2),
                     TrainOptions(progress=False), encoder_id="x")
