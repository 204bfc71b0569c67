"""``reco pretrain`` end to end: caches → train → export → evaluate the exported file through the encoder."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.encoder.openclip import OpenClipEncoder
from app.encoder.weights import file_sha256
from programs.pretrain.card import render_model_card
from programs.pretrain.data import CaptionedImages, cached_image_array, cached_text_features, read_manifest
from programs.pretrain.evaluate import ZERO_SHOT_SETS, evaluate_base_model
from programs.pretrain.model import create_base_model, export_checkpoint, image_size_of, pooled_text_features
from programs.pretrain.train import PretrainConfig, TrainResult, train_base_model


@dataclass
class PretrainRequest:
    data_root: Path
    out: Path
    cache_dir: Path
    config: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: bool = True
    zero_shot_sets: tuple[str, ...] = ZERO_SHOT_SETS
    limit_images: int | None = None  # smoke runs and tests: the first n training images only
    progress: bool = True


def load_training_data(request: PretrainRequest, model: Any) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Flickr8k train: decoded image cache, frozen caption features, caption→image index."""
    import open_clip

    cfg = request.config
    rows = read_manifest(request.data_root / "flickr8k" / "manifest.csv", "train")
    data = CaptionedImages.from_rows(rows)
    if request.limit_images is not None:
        data = data.subset(request.limit_images)
    images = cached_image_array(data.images, cfg.cache_size, request.cache_dir, progress=request.progress)
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    text_key = f"{cfg.model_name}:{tokenizer.context_length}"
    feats = cached_text_features(
        data.captions,
        lambda caps: pooled_text_features(model, tokenizer, caps),
        text_key,
        request.cache_dir,
        progress=request.progress,
    )
    return np.ascontiguousarray(images), feats, data.caption_image


def run_pretrain(request: PretrainRequest) -> dict[str, Any]:
    """Train, export to ``request.out``, and (unless told not to) evaluate the exported checkpoint."""
    cfg = request.config
    torch.manual_seed(cfg.seed)
    model = create_base_model(cfg.model_name, seed=cfg.seed)
    images, feats, caption_image = load_training_data(request, model)
    result = train_base_model(
        model,
        images,
        feats,
        caption_image,
        cfg,
        image_size=cfg.train_image_size or image_size_of(cfg.model_name),
        progress=request.progress,
    )
    provenance = _provenance(cfg, result, len(images), len(caption_image))
    path = export_checkpoint(model, cfg.model_name, request.out, extra={"reco.provenance": json.dumps(provenance)})
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        **provenance,
    }
    if request.evaluate:
        encoder = OpenClipEncoder(cfg.model_name, str(path), device="cpu", precision="fp32")
        report["evaluation"] = evaluate_base_model(
            encoder, request.data_root, zero_shot_sets=request.zero_shot_sets, progress=request.progress
        )
    return report


def _provenance(cfg: PretrainConfig, result: TrainResult, n_images: int, n_captions: int) -> dict[str, Any]:
    return {
        "config": cfg.as_dict(),
        "train_images": n_images,
        "train_captions": n_captions,
        "steps": result.steps,
        "epochs_completed": round(result.epochs_completed, 3),
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
        "epoch_losses": [round(x, 4) for x in result.epoch_losses],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image_size": image_size_of(cfg.model_name),  # the model's input resolution, named in its tag
    }


def tag_for(report: dict[str, Any]) -> str:
    """open_clip's tag convention, data_samples_batch, plus the input resolution (one model config has been
    trained at several): e.g. ``flickr8k_s229k_b128_r128``."""
    samples = report["steps"] * report["config"]["batch_size"]
    return f"flickr8k_s{round(samples / 1000)}k_b{report['config']['batch_size']}_r{report['image_size']}"


def write_report_and_card(report: dict[str, Any], *, command: str) -> tuple[Path, Path | None]:
    """``<checkpoint>.json`` (the full report) and, when evaluated, ``<checkpoint>.md`` (the model card)."""
    checkpoint = Path(report["checkpoint"])
    json_path = checkpoint.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if "evaluation" not in report:
        return json_path, None
    card = render_model_card(report, model=report["config"]["model_name"], tag=tag_for(report), command=command)
    card_path = checkpoint.with_suffix(".md")
    card_path.write_text(card)
    return json_path, card_path
