"""Pretraining of the project's own frozen base encoder (``reco pretrain``).

A small CLIP-style open_clip model (``app/encoder/model_configs/reco-base.json``): a convolutional timm
image tower trained from scratch against the frozen pretrained MiniLM sentence encoder (LiT-style) on
Flickr8k train only. Library code; the CLI in ``app/cli/pretrain.py`` is a thin wrapper.
"""

from __future__ import annotations

from dataclasses import replace

from programs.pretrain.evaluate import evaluate_base_model, evaluate_retrieval, retrieval_recalls, zero_shot_top1
from programs.pretrain.model import create_base_model, export_checkpoint
from programs.pretrain.pipeline import PretrainRequest, run_pretrain, tag_for, write_report_and_card
from programs.pretrain.train import PretrainConfig, TrainResult, train_base_model


def committed_recipe(
    model: str = "reco-base", *, epochs: int | None = None, minutes: float | None = None, seed: int | None = None
) -> PretrainConfig:
    """The recipe of the committed checkpoint (:class:`PretrainConfig` defaults), with explicit overrides."""
    cfg = PretrainConfig(model_name=model)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if minutes is not None:
        cfg = replace(cfg, max_minutes=minutes)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    return cfg


__all__ = [
    "PretrainConfig",
    "PretrainRequest",
    "TrainResult",
    "committed_recipe",
    "create_base_model",
    "evaluate_base_model",
    "evaluate_retrieval",
    "export_checkpoint",
    "retrieval_recalls",
    "run_pretrain",
    "tag_for",
    "train_base_model",
    "write_report_and_card",
    "zero_shot_top1",
]
