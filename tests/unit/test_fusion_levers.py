"""Issue 16: the similarity attention bias, the fallback toward CLIP, calibrated probabilities (ECE), the committed
default checkpoint and the rule that a small checkpoint is never the silent default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.fusion.checkpoint import (
    MIN_DEFAULT_PAIRS,
    CheckpointMeta,
    committed_checkpoint_for,
    load_checkpoint,
    save_checkpoint,
)
from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion
from app.refine import Refiner
from app.schemas import Modality, RefineMode
from app.synthetic import SyntheticCfg, SyntheticWorld
from app.zeroshot import ZeroShotClassifier, expected_calibration_error, fit_softmax_scale, softmax

DIM = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_score_bias_starts_as_the_paper_layer_and_can_favour_close_neighbours() -> None:
    torch.manual_seed(0)
    plain = RecoFusion(FusionCfg(heads=4), DIM)
    biased = RecoFusion(FusionCfg(heads=4, score_bias=True), DIM)
    biased.load_state_dict({**biased.state_dict(), **plain.state_dict()})
    q = torch.randn(3, DIM)
    nb = torch.randn(3, 5, DIM)
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.1, 0.1]] * 3)
    a = plain.refine(Modality.IMAGE, q, nb).embedding
    b = biased.refine(Modality.IMAGE, q, nb, scores=scores)
    assert torch.allclose(a, b.embedding, atol=1e-5)  # zero bias at init: the same function
    with torch.no_grad():
        biased.image.score_weight.fill_(20.0)  # type: ignore[union-attr]
    c = biased.refine(Modality.IMAGE, q, nb, scores=scores).attention
    assert (c[:, 1] > b.attention[:, 1]).all() and (c[:, 1] > 0.5).all()  # the 0.9 neighbour takes the attention
    with pytest.raises(ValueError, match="scores"):
        biased.refine(Modality.IMAGE, q, nb)
    valid = torch.tensor([[True, True, False, False, False]] * 3)  # missing neighbours still get no attention
    d = biased.refine(Modality.IMAGE, q, nb, valid, scores=scores).attention
    assert torch.all(d[:, 3:] == 0)


def _small_world() -> tuple[SyntheticWorld, RecoFusion, Any, np.ndarray]:
    """A synthetic world, an untrained fusion (seed 0), its memory and its evaluation images."""
    world = SyntheticWorld(SyntheticCfg(train_concepts=20, eval_classes=4, memory_per_concept=3, eval_per_class=3))
    torch.manual_seed(0)
    model = RecoFusion(FusionCfg(heads=4), world.dim)
    images, _ = world.eval_images()
    return world, model, world.memory(), images


def test_fallback_keeps_clip_when_the_memory_is_far() -> None:
    _, model, memory, images = _small_world()
    plain = Refiner(model, memory, k=4)
    found_top = np.asarray([plain.refine_image(v).neighbours[0].score for v in images])
    threshold = float(np.median(found_top))
    guarded = Refiner(model, memory, k=4, calibration={"fallback": {"image": threshold}})
    out = guarded.refine_many(images, Modality.IMAGE)
    base = plain.refine_many(images, Modality.IMAGE)
    far = found_top < threshold
    assert far.any() and (~far).any()
    assert np.allclose(out[far], _unit(images[far]), atol=1e-5)  # CLIP kept
    assert np.allclose(out[~far], base[~far], atol=1e-5)  # refined as before
    one = guarded.refine_image(images[int(np.flatnonzero(far)[0])])
    assert one.fell_back and one.self_attention == 1.0
    assert not guarded.refine_image(images[int(np.flatnonzero(~far)[0])]).fell_back
    # text queries have no threshold here: never fall back
    assert not guarded.falls_back(np.full((2, 4), -1.0), Modality.TEXT).any()


def test_mean_mix_blends_toward_mean_fusion_per_task() -> None:
    world, model, memory, images = _small_world()
    learned = Refiner(model, memory, k=4).refine_many(images, Modality.IMAGE)
    mean = Refiner(RecoFusion(FusionCfg(kind="mean"), world.dim), memory, k=4).refine_many(images, Modality.IMAGE)
    calibration = {"mean_mix": {"zeroshot": {"image": 1.0, "text": 0.0}, "retrieval": {"image": 0.5}}}
    refiner = Refiner(model, memory, k=4, calibration=calibration)
    assert refiner.task == "retrieval" and refiner.mix_for(Modality.IMAGE) == 0.5
    zeroshot = refiner.for_task("zeroshot")
    assert np.allclose(zeroshot.refine_many(images, Modality.IMAGE), mean, atol=1e-5)  # weight 1: mean fusion
    half = refiner.refine_many(images, Modality.IMAGE)
    assert np.allclose(half, _unit(learned + mean), atol=1e-5)  # weight 0.5: the normalised midpoint
    assert not np.allclose(half, learned, atol=1e-3)
    one = zeroshot.refine_image(images[0])
    assert abs(one.self_attention + sum(n.attention for n in one.neighbours) - 1.0) < 1e-5  # still a distribution
    flat = Refiner(model, memory, k=4, calibration={"mean_mix": {"image": 1.0}})  # one blend for every task
    assert flat.mix_for(Modality.IMAGE) == flat.for_task("zeroshot").mix_for(Modality.IMAGE) == 1.0
    classifier = ZeroShotClassifier(["a", "b"], world, refiner=refiner)
    assert classifier.refiner is not None and classifier.refiner.task == "zeroshot"  # class prompts: zero-shot blend
    with pytest.raises(ValueError, match="mean_mix"):
        Refiner(model, memory, k=4, calibration={"mean_mix": {"image": 1.5}})
    with pytest.raises(ValueError, match="task"):
        refiner.for_task("ranking")


def test_ece_and_the_fitted_scale() -> None:
    rng = np.random.default_rng(0)
    n, classes = 4000, 5
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 0.05, (n, classes))
    logits[np.arange(n), labels] += 0.04  # a weak signal: scale 100 is far too confident
    scale = fit_softmax_scale([(logits, labels)])
    assert scale < 100
    assert expected_calibration_error(logits, labels, scale) < expected_calibration_error(logits, labels, 100.0)
    assert expected_calibration_error(logits, labels, scale) < 0.05
    perfect = np.eye(classes)[labels] * 10
    assert expected_calibration_error(perfect, labels, 100.0) == pytest.approx(0.0, abs=1e-6)
    assert softmax(np.zeros((1, 4)), 100.0) == pytest.approx(np.full((1, 4), 0.25))


def test_classifier_uses_the_checkpoint_scale() -> None:
    world = SyntheticWorld(SyntheticCfg(train_concepts=20, eval_classes=4, memory_per_concept=3, eval_per_class=3))
    torch.manual_seed(0)
    refiner = Refiner(RecoFusion(FusionCfg(heads=4), world.dim), world.memory(), k=4,
                      calibration={"softmax_scale": {"clip": 30.0, "both": 7.0}})
    names = world.class_names
    clf = ZeroShotClassifier(names, world, refiner=refiner)
    assert clf.softmax_scale(RefineMode.BOTH) == 7.0 and clf.softmax_scale(RefineMode.TEXT) == 100.0
    assert ZeroShotClassifier(names, world, clip_softmax_scale=30.0).softmax_scale(RefineMode.CLIP) == 30
    images, _ = world.eval_images()
    sharp = ZeroShotClassifier(names, world).predict(images[0], RefineMode.CLIP, top=1).scores[0]
    soft = ZeroShotClassifier(names, world, clip_softmax_scale=5.0).predict(
        images[0], RefineMode.CLIP, top=1).scores[0]
    assert soft < sharp


def _checkpoint(path: Path, encoder_id: str, pairs: int) -> Path:
    model = RecoFusion(FusionCfg(heads=4), DIM)
    meta = CheckpointMeta(config=model.cfg.to_dict(), dim=DIM, encoder_id=encoder_id, memory_version="m",
                          metrics={"pairs": pairs}, calibration={"fallback": {"image": 0.3, "text": 0.5},
                                                                 "softmax_scale": {"clip": 40.0, "both": 20.0}})
    save_checkpoint(path, model, meta)
    return path


def test_calibration_travels_with_the_checkpoint(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "a.safetensors", "enc", 30000)
    _, meta = load_checkpoint(path)
    assert meta.calibration["fallback"] == {"image": 0.3, "text": 0.5}
    assert committed_checkpoint_for("enc", tmp_path) == path and committed_checkpoint_for("other", tmp_path) is None


BASE_ENCODER_ID = "reco-base/flickr8k_s229k_b128_r128/d8a378a36bbd"


def test_the_committed_default_exists_for_the_base_encoder() -> None:
    committed = committed_checkpoint_for(BASE_ENCODER_ID)
    assert committed is not None, "app/fusion/checkpoints holds no default fusion for reco-base"
    _, meta = load_checkpoint(committed)
    assert meta.metrics["pairs"] >= MIN_DEFAULT_PAIRS
    assert set(meta.calibration["softmax_scale"]) >= {"clip", "text", "both"}
    modes = meta.calibration["recommended_mode"]  # the mode a prediction naming none uses
    assert RefineMode(modes["zeroshot"]) and RefineMode(modes["retrieval"])
    assert committed.with_suffix(".md").is_file() and committed.with_suffix(".json").is_file()


def test_a_small_checkpoint_is_never_the_silent_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import Settings
    from app.db.runs import register_checkpoint
    from app.db.session import make_session_factory, upgrade_database
    from app.services import method_common
    from app.services.method_common import checkpoint_label, resolve_checkpoint

    url = f"sqlite:///{tmp_path / 'meta.db'}"
    upgrade_database(url)
    factory = make_session_factory(url)
    settings = Settings(data_dir=tmp_path / "data", fusion_checkpoint="")
    committed_dir = tmp_path / "committed"
    committed_dir.mkdir()
    monkeypatch.setattr(method_common, "committed_checkpoint_for",
                        lambda enc: committed_checkpoint_for(enc, committed_dir))
    small = _checkpoint(tmp_path / "small.safetensors", "enc", 800)
    register_checkpoint(factory, path=str(small), sha256="s1", encoder_id="enc", memory_version="m", config={},
                        metrics={"pairs": 800})
    path, record = resolve_checkpoint(settings, "enc", None, factory)  # no default at all: used, but labelled
    assert path == small and "small: trained on 800 pairs" in checkpoint_label(path, record)
    default = _checkpoint(committed_dir / "default.safetensors", "enc", 30000)
    assert resolve_checkpoint(settings, "enc", None, factory)[0] == default  # the committed one, not the small one
    assert resolve_checkpoint(settings, "enc", small, factory)[0] == small  # named explicitly: used
    big = _checkpoint(tmp_path / "big.safetensors", "enc", MIN_DEFAULT_PAIRS)
    register_checkpoint(factory, path=str(big), sha256="s2", encoder_id="enc", memory_version="m", config={},
                        metrics={"pairs": MIN_DEFAULT_PAIRS})
    assert resolve_checkpoint(settings, "enc", None, factory)[0] == big  # the user trained one on enough pairs


def test_the_recommended_mode_comes_from_the_calibration() -> None:
    world = SyntheticWorld(SyntheticCfg(train_concepts=20, eval_classes=4, memory_per_concept=3, eval_per_class=3))
    model = RecoFusion(FusionCfg(heads=4), world.dim)
    memory = world.memory()
    chosen = Refiner(model, memory, k=4, calibration={"recommended_mode": {"zeroshot": "text", "retrieval": "image"}})
    assert chosen.recommended_mode() is RefineMode.TEXT and chosen.recommended_mode("zeroshot") is RefineMode.TEXT
    assert chosen.recommended_mode("retrieval") is RefineMode.IMAGE
    assert chosen.recommended_mode("other") is RefineMode.BOTH  # no choice for that task: the paper's default
    assert Refiner(model, memory, k=4).recommended_mode() is RefineMode.BOTH  # no calibration at all
    for bad in ({"zeroshot": "sideways"}, "text", {"zeroshot": None}):
        assert Refiner(model, memory, k=4, calibration={"recommended_mode": bad}).recommended_mode() is RefineMode.BOTH


def test_a_prediction_without_a_mode_uses_the_checkpoint_choice(tmp_path: Path) -> None:
    from app.config import Settings
    from app.refine import refiner_from_checkpoint
    from app.services.predict import PredictRequest, predict_image
    from app.services.serving_live import _Live
    from app.services.serving_models import PredictQuery
    from app.services.serving_predict import mode_for

    world = SyntheticWorld(SyntheticCfg(train_concepts=20, eval_classes=4, memory_per_concept=3, eval_per_class=3))
    torch.manual_seed(0)
    model = RecoFusion(FusionCfg(heads=4), world.dim)
    meta = CheckpointMeta(config=model.cfg.to_dict(), dim=world.dim, encoder_id=world.encoder_id, memory_version="m",
                          calibration={"recommended_mode": {"zeroshot": "text", "retrieval": "both"}})
    path = tmp_path / "chosen.safetensors"
    save_checkpoint(path, model, meta)
    memory = world.memory()
    refiner, _ = refiner_from_checkpoint(path, memory, k=4)
    assert refiner.recommended_mode() is RefineMode.TEXT  # the choice travels with the checkpoint

    settings = Settings(data_dir=tmp_path / "data")
    images, _ = world.eval_images()

    def predict(refiner_obj: Refiner, mode: RefineMode | None = None) -> Any:
        request = PredictRequest(image_bytes=b"", classes=world.class_names, mode=mode, k=4)
        return predict_image(settings, request, encoder=world, memory=memory, refiner=(refiner_obj, "ck"),  # type: ignore[arg-type]
                             image_vector=images[0])

    assert PredictRequest(image_bytes=b"", classes=["a"]).mode is None
    omitted = predict(refiner)
    assert omitted.mode is RefineMode.TEXT and omitted.neighbours == []  # text: the image is not refined
    assert omitted.predictions == predict(refiner, RefineMode.TEXT).predictions
    named = predict(refiner, RefineMode.BOTH)  # a named mode wins over the checkpoint's choice
    assert named.mode is RefineMode.BOTH and len(named.neighbours) == 4
    plain = predict(Refiner(model, memory, k=4))  # no choice recorded: both, as before
    assert plain.mode is RefineMode.BOTH and len(plain.neighbours) == 4

    # the serving service resolves the query's mode once, from the live checkpoint
    query = PredictQuery(labels=["a", "b"])
    assert query.mode is None
    assert mode_for(query, _Live(None, world, memory, refiner=refiner)) is RefineMode.TEXT  # type: ignore[arg-type]
    assert mode_for(query, _Live(None, world, memory)) is RefineMode.BOTH  # type: ignore[arg-type]
    assert mode_for(PredictQuery(labels=["a"], mode="image"), _Live(None, world, memory, refiner=refiner)) \
        is RefineMode.IMAGE  # type: ignore[arg-type]
