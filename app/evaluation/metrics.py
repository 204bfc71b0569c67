"""Metrics as fractions in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return {k: float("nan") for k in ks}
    # rank of the true class = number of classes scoring strictly higher (ties count in the model's favour)
    true = logits[np.arange(len(labels)), labels]
    rank = (logits > true[:, None]).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}


def recall_at_k(
    image_emb: np.ndarray, text_emb: np.ndarray, image_of_text: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image recall@k with several captions per image.

    ``image_of_text[j]`` is the image row of caption j. An image counts as found at k when any of its
    captions is among its k best texts; a caption when its image is among its k best images.
    """
    image_of_text = np.asarray(image_of_text)
    sims = image_emb @ text_emb.T  # (n_images, n_texts)
    out: dict[str, float] = {}
    # i2t: best rank over the image's own captions
    own = image_of_text[None, :] == np.arange(len(image_emb))[:, None]
    best_own = np.where(own, sims, -np.inf).max(axis=1)
    i2t_rank = (sims > best_own[:, None]).sum(axis=1)
    # t2i: rank of the caption's image among all images
    true = sims[image_of_text, np.arange(len(text_emb))]
    t2i_rank = (sims > true[None, :]).sum(axis=0)
    for k in ks:
        out[f"i2t_r@{k}"] = float((i2t_rank < k).mean())
    for k in ks:
        out[f"t2i_r@{k}"] = float((t2i_rank < k).mean())
    return out
