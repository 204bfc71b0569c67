"""The memories of the reproduction and the removal of near-duplicates of the evaluation images.

(a) ``generic``: Flickr8k train pairs. (b) ``generic+domain``: (a) plus the captioned train rows of
CUB-100, Flowers-12 and Imagenette, less the held-out validation part. Every evaluation image (test
and validation, all datasets) is looked for in the memory by three rules: same file content (sha256),
dHash within a few bits, image-embedding cosine above a threshold calibrated on the memory itself
(a high percentile of the nearest-neighbour cosine between distinct memory images). Counts per rule
are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.evaluation.near_duplicates import calibrate_threshold, remove_near_duplicates
from app.memory.exact import ExactIndex
from programs.reproduce.data import EncodedSet


@dataclass
class MemoryRows:
    """Row-aligned memory content before it becomes an index."""

    ids: list[str]
    image: np.ndarray
    text: np.ndarray
    image_hashes: list[str]
    dhashes: np.ndarray

    @classmethod
    def of(cls, data: EncodedSet, images: np.ndarray) -> MemoryRows:
        """The caption rows (pairs) of the given image rows of one dataset."""
        rows = data.captions_of(images)
        owner = data.caption_image[rows]
        return cls([f"{data.name}:{r}" for r in rows], data.image_emb[owner], data.text_emb[rows],
                   [data.image_sha256[i] for i in owner], data.image_dhash[owner])

    @classmethod
    def concat(cls, parts: Sequence[MemoryRows]) -> MemoryRows:
        return cls([i for p in parts for i in p.ids], np.concatenate([p.image for p in parts]),
                   np.concatenate([p.text for p in parts]), [h for p in parts for h in p.image_hashes],
                   np.concatenate([p.dhashes for p in parts]))

    def index(self, version: str) -> ExactIndex:
        return ExactIndex(self.ids, self.image, self.text, self.image_hashes, version=version)


@dataclass
class EvalImages:
    """Every image the reproduction evaluates on (all test and validation sets together)."""

    embeddings: np.ndarray
    sha256: list[str]
    dhashes: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[tuple[EncodedSet, np.ndarray]]) -> EvalImages:
        return cls(np.concatenate([d.image_emb[i] for d, i in parts]),
                   [d.image_sha256[j] for d, i in parts for j in i],
                   np.concatenate([d.image_dhash[i] for d, i in parts]))


@dataclass
class CleanMemory:
    name: str
    index: ExactIndex
    dhashes: np.ndarray
    counts: dict[str, int]  # rows before/after, removed by each rule


def calibrated_threshold(rows: MemoryRows, percentile: float) -> float:
    """Near-duplicate cosine for this encoder: ``percentile`` of nearest-neighbour cosine of distinct images."""
    return calibrate_threshold(rows.index("calibration"), percentile=percentile)


def clean_memory(name: str, rows: MemoryRows, evaluation: EvalImages, threshold: float, dhash_distance: int
                 ) -> CleanMemory:
    """The memory without near-duplicates of any evaluation image; the counts removed per rule."""
    index = rows.index(f"{name}:raw")
    removal = remove_near_duplicates(index, evaluation.embeddings, evaluation.sha256, threshold=threshold,
                                     memory_dhashes=rows.dhashes, eval_dhashes=evaluation.dhashes,
                                     dhash_distance=dhash_distance)
    kept = np.flatnonzero(np.isin(np.asarray(rows.ids), np.asarray(removal.index.ids)))
    cleaned = MemoryRows([rows.ids[i] for i in kept], rows.image[kept], rows.text[kept],
                         [rows.image_hashes[i] for i in kept], rows.dhashes[kept])
    counts = {"rows_before": len(rows.ids), "rows_after": len(kept),
              "images_before": len(set(rows.image_hashes)), "images_after": len(set(cleaned.image_hashes)),
              "removed_rows": removal.removed, "by_content_hash": removal.by_hash,
              "by_perceptual_hash": removal.by_perceptual_hash, "by_embedding": removal.by_embedding,
              "removed_with_their_image": removal.removed - removal.by_hash - removal.by_perceptual_hash
              - removal.by_embedding}
    return CleanMemory(name, cleaned.index(f"{name}:{len(kept)}"), cleaned.dhashes, counts)
