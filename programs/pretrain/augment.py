"""Batched image augmentation on cached uint8 tensors (no per-image PIL work in the training loop).

One ``grid_sample`` call does random-resized crop, flip and resize for the whole batch; colour jitter
and grayscale are per-sample tensor arithmetic. The output is normalised like open_clip's transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# open_clip's default (OpenAI) normalisation: the eval transform of our configs uses it too.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class AugmentCfg:
    scale: tuple[float, float] = (0.4, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    grayscale: float = 0.1


def _crop_boxes(n: int, cfg: AugmentCfg, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per sample: half width/height and centre of a crop in [-1, 1] coordinates."""
    area = torch.empty(n).uniform_(*cfg.scale, generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    return w, h, cx, cy


def augment_batch(images: torch.Tensor, size: int, cfg: AugmentCfg, gen: torch.Generator) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, size, size) float32, augmented and normalised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    n = x.shape[0]
    w, h, cx, cy = _crop_boxes(n, cfg, gen)
    flip = torch.where(torch.rand(n, generator=gen) < cfg.flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = _colour_jitter(x, cfg, gen)
    return normalise(x)


def _colour_jitter(x: torch.Tensor, cfg: AugmentCfg, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength, generator=gen)

    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = x * factor(cfg.brightness)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * factor(cfg.contrast) + mean
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = (x - grey) * factor(cfg.saturation) + grey
    to_grey = (torch.rand(n, 1, 1, 1, generator=gen) < cfg.grayscale).float()
    x = x * (1 - to_grey) + grey.expand_as(x) * to_grey
    return x.clamp_(0.0, 1.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def centre_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, H, W, 3) uint8, already square, -> (n, 3, size, size) normalised, no augmentation."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    return normalise(x)
