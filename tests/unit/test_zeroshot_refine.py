"""Refinement service and zero-shot classifier: modes, explanations, template ensembles, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion
from app.refine import Refiner, mean_fusion_refiner, memory_version_of
from app.schemas import Modality, RefineMode
from app.synthetic import SyntheticCfg, SyntheticWorld
from app.zeroshot import CLIP_SHORT_TEMPLATES, ClassEmbeddingCache, ZeroShotClassifier, resolve_templates

SMALL = SyntheticCfg(train_concepts=30, eval_classes=6, memory_per_concept=3, eval_per_class=4)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(SMALL)


@pytest.fixture(scope="module")
def refiner(world: SyntheticWorld) -> Refiner:
    torch.manual_seed(0)
    return Refiner(RecoFusion(FusionCfg(heads=4), world.dim), world.memory(), k=4)


def test_refine_image_explains_itself(world: SyntheticWorld, refiner: Refiner) -> None:
    images, _ = world.eval_images()
    out = refiner.refine_image(images[0])
    assert out.modality is Modality.IMAGE and out.vector.shape == (world.dim,)
    assert np.linalg.norm(out.vector) == pytest.approx(1.0, abs=1e-5)
    assert len(out.neighbours) == 4 and len({n.image_hash for n in out.neighbours}) == 4
    assert all(n.caption and "synthetic species" in n.caption for n in out.neighbours)
    assert out.self_attention + sum(n.attention for n in out.neighbours) == pytest.approx(1.0, abs=1e-5)
    batched = refiner.refine_many(images[:3], Modality.IMAGE)
    np.testing.assert_allclose(batched[0], out.vector, atol=1e-5)


def test_refine_text_excludes_ids(world: SyntheticWorld, refiner: Refiner) -> None:
    memory = world.memory()
    t = np.asarray(memory.matrix(Modality.TEXT)[0])
    assert refiner.refine_text(t).neighbours[0].item_id == memory.ids[0]
    assert memory.ids[0] not in {n.item_id for n in refiner.refine_text(t, exclude_ids=(memory.ids[0],)).neighbours}


def test_modes_pick_the_refined_sides(world: SyntheticWorld, refiner: Refiner) -> None:
    images, _ = world.eval_images()
    texts = world.encode_texts(world.class_names)
    v_bar = refiner.refine_many(images, Modality.IMAGE)
    t_bar = refiner.refine_many(texts, Modality.TEXT)
    cases = {RefineMode.CLIP: (images, texts), RefineMode.IMAGE: (v_bar, texts),
             RefineMode.TEXT: (images, t_bar), RefineMode.BOTH: (v_bar, t_bar)}
    for mode, (want_v, want_t) in cases.items():
        got_v, got_t = refiner.apply_mode(images, texts, mode)
        np.testing.assert_allclose(got_v, want_v, atol=1e-6)
        np.testing.assert_allclose(got_t, want_t, atol=1e-6)


def test_clip_classifier_is_the_normalised_template_average(world: SyntheticWorld) -> None:
    clf = ZeroShotClassifier(world.class_names, world, templates=["a photo of a {c}.", "art of the {c}."])
    emb = world.encode_texts([f"a photo of a {world.class_names[1]}.", f"art of the {world.class_names[1]}."])
    want = emb.mean(0) / np.linalg.norm(emb.mean(0))
    np.testing.assert_allclose(clf.class_embeddings(RefineMode.CLIP)[1], want, atol=1e-6)
    with pytest.raises(ValueError, match="checkpoint"):
        clf.class_embeddings(RefineMode.BOTH)


def test_class_embeddings_are_cached_per_memory_version(world: SyntheticWorld, refiner: Refiner,
                                                        tmp_path: Path) -> None:
    cache = ClassEmbeddingCache(tmp_path)
    clf = ZeroShotClassifier(world.class_names, world, refiner=refiner, checkpoint_id="ck1", cache=cache)
    first = clf.class_embeddings(RefineMode.BOTH)
    assert cache.misses == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(clf.class_embeddings(RefineMode.TEXT), first)  # same refined prompts
    assert cache.hits == 1
    fresh = ClassEmbeddingCache(tmp_path)  # another process: read from disk
    ZeroShotClassifier(world.class_names, world, refiner=refiner, checkpoint_id="ck1", cache=fresh).class_embeddings(
        RefineMode.BOTH)
    assert fresh.hits == 1 and fresh.misses == 0
    swapped = Refiner(refiner.model, world.memory(shuffled_captions=True), k=4)
    assert memory_version_of(swapped.memory) != refiner.memory_version
    other = ZeroShotClassifier(world.class_names, world, refiner=swapped, checkpoint_id="ck1", cache=cache)
    assert other.cache_key(True) != clf.cache_key(True)


def test_predict_returns_sorted_probabilities(world: SyntheticWorld) -> None:
    images, labels = world.eval_images()
    clf = ZeroShotClassifier(world.class_names, world, refiner=mean_fusion_refiner(world.memory(), world.dim, k=4))
    pred = clf.predict(images[0], RefineMode.IMAGE, top=3)
    assert len(pred.labels) == 3 and pred.scores == sorted(pred.scores, reverse=True)
    assert pred.names[0] == world.class_names[pred.labels[0]] and 0 < sum(pred.scores) <= 1 + 1e-6


def test_templates_by_name_file_or_list(tmp_path: Path) -> None:
    assert resolve_templates(None) == CLIP_SHORT_TEMPLATES
    assert resolve_templates("single") == ("a photo of a {c}.",)
    (tmp_path / "t.txt").write_text("# birds\na photo of a {c}, a type of bird.\n\n")
    assert resolve_templates(tmp_path / "t.txt") == ("a photo of a {c}, a type of bird.",)
    with pytest.raises(ValueError):
        resolve_templates(["no placeholder"])
    with pytest.raises(ValueError):
        resolve_templates("no-such-set")
