"""Symmetric InfoNCE (paper Eq. 1) and the RECO objective (Eq. 2).

Each InfoNCE term is CLIP's: the mean of the image->text and text->image cross-entropies over the
batch, divided by two. The paper writes a sum over the batch; the constant factor only rescales the
learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss between row-aligned, L2-normalised (B, d) image and text embeddings."""
    logits = logit_scale * images @ texts.T
    labels = torch.arange(len(images), device=images.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reco_loss(
    v: torch.Tensor, t: torch.Tensor, v_bar: torch.Tensor, t_bar: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """NCE(V_bar, T_bar) + NCE(V_bar, T) + NCE(V, T_bar).

    The two cross terms align refined with original embeddings, so either side can be left
    unrefined at inference (modes ``image`` and ``text``).
    """
    both = info_nce(v_bar, t_bar, logit_scale)
    image_side = info_nce(v_bar, t, logit_scale)
    text_side = info_nce(v, t_bar, logit_scale)
    total = both + image_side + text_side
    parts = {"nce_vbar_tbar": float(both.detach()), "nce_vbar_t": float(image_side.detach()),
             "nce_v_tbar": float(text_side.detach())}
    return total, parts
