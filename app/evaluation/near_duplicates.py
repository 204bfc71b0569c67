"""Remove near-duplicates of the evaluation images from the memory before evaluating (paper Sec. 4).

A memory row goes when its image has the same content hash as an evaluation image, when its perceptual
hash (64-bit dHash, optional) is within a few bits of one, or when its image embedding has cosine above
a threshold with any evaluation image. The threshold is given, or
calibrated from the encoder's own similarity distribution: a high percentile of the nearest-neighbour
similarity between *distinct* memory images, i.e. closer than almost any two different images of the
memory are to each other. All rows of a removed image go (its captions share the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from app.memory.exact import SCORE_BUDGET, ExactIndex
from app.schemas import Modality

DEFAULT_PERCENTILE = 99.5
DEFAULT_DHASH_DISTANCE = 4  # of 64 bits: a re-encoded or resized copy stays within it, other photos rarely


@dataclass
class NearDuplicateRemoval:
    index: ExactIndex  # the memory without the removed rows
    removed: int  # memory rows removed (hash or embedding)
    by_hash: int
    by_embedding: int  # removed by the embedding rule and by neither hash rule
    threshold: float
    calibrated: bool
    by_perceptual_hash: int = 0  # removed by the dHash rule and not by the content hash


def dhash(image: Image.Image, size: int = 8) -> int:
    """Difference hash: grey ``(size+1) x size`` thumbnail, one bit per left-right brightness step."""
    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0]) if size == 8 else int("".join("1" if b else "0" for b in bits), 2)


def perceptual_matches(memory_hashes: np.ndarray, eval_hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(n_memory,) bool: within ``max_distance`` bits of any evaluation image's dHash."""
    memory_hashes = np.asarray(memory_hashes, np.uint64)
    targets = np.unique(np.asarray(eval_hashes, np.uint64))
    out = np.zeros(len(memory_hashes), bool)
    if len(targets) == 0:
        return out
    step = max(1, (1 << 22) // len(targets))
    for start in range(0, len(memory_hashes), step):
        block = memory_hashes[start: start + step, None] ^ targets[None, :]
        out[start: start + step] = (np.bitwise_count(block) <= max_distance).any(axis=1)
    return out


def calibrate_threshold(
    index: ExactIndex, *, percentile: float = DEFAULT_PERCENTILE, sample: int = 2000, seed: int = 0
) -> float:
    """``percentile`` of nearest-neighbour cosine between distinct memory images (1.0 if < 2 images)."""
    codes = index.image_codes
    _, first_rows = np.unique(codes, return_index=True)
    if len(first_rows) < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    rows = rng.choice(first_rows, size=min(sample, len(first_rows)), replace=False)
    queries = np.asarray(index.matrix(Modality.IMAGE)[np.sort(rows)], np.float32)
    hashes = [[index.image_hashes[r]] for r in np.sort(rows)]
    scores, found = index.knn(queries, Modality.IMAGE, 1, exclude_image_hashes=hashes)
    nn = scores[found[:, 0] >= 0, 0]
    return float(np.percentile(nn, percentile)) if len(nn) else 1.0


def _max_similarity(index: ExactIndex, eval_images: np.ndarray) -> np.ndarray:
    """(n_memory,) highest cosine of each memory image with any evaluation image."""
    if len(eval_images) == 0:
        return np.full(len(index), -np.inf, np.float32)
    queries = torch.from_numpy(np.ascontiguousarray(eval_images, np.float32))
    queries = torch.nn.functional.normalize(queries, dim=1)
    step = max(1, SCORE_BUDGET // len(queries))
    best = np.empty(len(index), np.float32)
    matrix = index.matrix(Modality.IMAGE)
    for start in range(0, len(index), step):
        block = torch.from_numpy(np.array(matrix[start: start + step], np.float32))
        best[start: start + len(block)] = (block @ queries.T).max(dim=1).values.numpy()
    return best


def remove_near_duplicates(
    index: ExactIndex,
    eval_images: np.ndarray,
    eval_image_hashes: Sequence[str],
    *,
    threshold: float | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    memory_dhashes: np.ndarray | None = None,
    eval_dhashes: np.ndarray | None = None,
    dhash_distance: int = DEFAULT_DHASH_DISTANCE,
) -> NearDuplicateRemoval:
    """``memory_dhashes`` (row-aligned with the index) and ``eval_dhashes`` switch the perceptual rule on."""
    calibrated = threshold is None
    if threshold is None:
        threshold = calibrate_threshold(index, percentile=percentile)
    wanted = set(eval_image_hashes)
    same_hash = np.fromiter((h in wanted for h in index.image_hashes), bool, len(index))
    perceptual = np.zeros(len(index), bool)
    if memory_dhashes is not None and eval_dhashes is not None:
        if len(memory_dhashes) != len(index):
            raise ValueError("memory_dhashes must be row-aligned with the index")
        perceptual = perceptual_matches(memory_dhashes, eval_dhashes, dhash_distance)
    similar = _max_similarity(index, eval_images) > threshold
    drop = same_hash | perceptual | similar
    # every caption row of a dropped image goes too
    drop |= np.isin(index.image_codes, index.image_codes[drop])
    kept = np.flatnonzero(~drop)
    return NearDuplicateRemoval(
        index=index if len(kept) == len(index) else index.subset(kept),
        removed=int(drop.sum()), by_hash=int(same_hash.sum()),
        by_embedding=int((similar & ~same_hash & ~perceptual).sum()),
        threshold=float(threshold), calibrated=calibrated, by_perceptual_hash=int((perceptual & ~same_hash).sum()),
    )
