"""Neighbour retrieval for the fusion: what is searched, what is handed over (paper Sec. 3.1, Tab. 3).

Four switches: search ``uni`` (image->image, text->text; the paper's choice) or ``cross``
(image->text, text->image), and fuse ``cross`` (an image query gets its neighbours' *text*
embeddings, a text query their *image* embeddings; the paper's choice) or ``uni``.

Neighbours are deduplicated by image by default: a memory may hold several captions of one image
(Flickr8k: five), and k neighbours should be k distinct images. The image is represented by the
best-scoring of its rows: its caption is the one whose text embedding is handed to the fusion. With
image->image search all captions of one image tie (same image embedding); the tie is broken by the
lowest row, so the choice is deterministic.

Two paths: :func:`find_neighbours` over an :class:`ExactIndex` (batched, for training and evaluation)
and :func:`retrieve_online` over any ``VectorMemory`` (the engine's HNSW, for online refinement).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from app.memory.base import Filters, SearchHit, VectorMemory
from app.memory.exact import ExactIndex
from app.memory.per_image import first_rows_per_image
from app.schemas import Modality

SearchKind = Literal["uni", "cross"]
FusionKind = Literal["cross", "uni"]


def other(modality: Modality) -> Modality:
    return Modality.TEXT if Modality(modality) is Modality.IMAGE else Modality.IMAGE


@dataclass(frozen=True)
class RetrievalCfg:
    search: SearchKind = "uni"
    fusion: FusionKind = "cross"
    dedupe_by_image: bool = True

    def __post_init__(self) -> None:
        if self.search not in ("uni", "cross") or self.fusion not in ("uni", "cross"):
            raise ValueError(f"search and fusion must each be 'uni' or 'cross', got {self.search}/{self.fusion}")

    @classmethod
    def from_settings(cls, settings: Any) -> RetrievalCfg:
        return cls(settings.search_modality, settings.fusion_modality, settings.dedupe_neighbours_by_image)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalCfg:
        return cls(**{k: data[k] for k in ("search", "fusion", "dedupe_by_image") if k in data})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def searched(self, query: Modality) -> Modality:
        """Which memory matrix the query is compared with."""
        return Modality(query) if self.search == "uni" else other(query)

    def fused(self, query: Modality) -> Modality:
        """Which embeddings of the neighbours the fusion receives."""
        return other(query) if self.fusion == "cross" else Modality(query)


@dataclass
class Neighbours:
    """Per query: memory rows (-1 = none) and their search scores, best first."""

    rows: np.ndarray  # (n, k) int64
    scores: np.ndarray  # (n, k) float32

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0


def find_neighbours(
    index: ExactIndex,
    queries: np.ndarray,
    query_modality: Modality,
    k: int,
    cfg: RetrievalCfg,
    *,
    exclude_ids: Sequence[Iterable[str] | str] | None = None,
    exclude_image_hashes: Sequence[Iterable[str] | str] | None = None,
) -> Neighbours:
    """k neighbours per query from the exact index (batched). Self-exclusion via the two exclude lists."""
    if len(index) == 0:  # e.g. every memory row was a near-duplicate of the evaluation images
        n = len(np.atleast_2d(queries))
        return Neighbours(rows=np.full((n, k), -1, np.int64), scores=np.full((n, k), -np.inf, np.float32))
    # Over-fetch by the most captions an image has: then k distinct images are always among them.
    fetch = k * index.max_rows_per_image if cfg.dedupe_by_image else k
    scores, rows = index.knn(
        queries, cfg.searched(query_modality), fetch,
        exclude_ids=exclude_ids, exclude_image_hashes=exclude_image_hashes,
    )
    if cfg.dedupe_by_image:
        rows, scores = first_rows_per_image(rows, scores, index.image_codes, k)
    return Neighbours(rows=rows[:, :k], scores=scores[:, :k])


def gather_embeddings(index: ExactIndex, rows: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
    """(n, k, d) float32 embeddings of the given rows (zeros where row = -1) and the (n, k) valid mask."""
    valid = rows >= 0
    if len(index) == 0:
        return np.zeros((*rows.shape, index.dim), np.float32), valid
    emb = np.asarray(index.matrix(modality)[np.maximum(rows, 0).reshape(-1)], np.float32)
    emb = emb.reshape(*rows.shape, index.dim)
    emb[~valid] = 0.0
    return emb, valid


# --- online, over any VectorMemory ---------------------------------------------------------------
@dataclass
class OnlineNeighbours:
    hits: list[SearchHit]
    embeddings: np.ndarray  # (len(hits), d): the fused modality's embeddings


def retrieve_online(
    memory: VectorMemory,
    vector: np.ndarray,
    query_modality: Modality,
    k: int,
    cfg: RetrievalCfg,
    *,
    filters: Filters | None = None,
    exclude_ids: Sequence[str] = (),
) -> OnlineNeighbours:
    """One query against the engine (Edge, a server, or the exact index): k neighbours (k distinct images
    by default), then the fused modality's stored vectors of those neighbours, read back by id."""
    hits = memory.search(vector, cfg.searched(query_modality), k, filters=filters, exclude_ids=exclude_ids,
                         distinct_images=cfg.dedupe_by_image)[:k]
    if not hits:
        return OnlineNeighbours(hits=[], embeddings=np.zeros((0, len(np.ravel(vector))), np.float32))
    embeddings = memory.fetch_vectors([h.item_id for h in hits], cfg.fused(query_modality))
    return OnlineNeighbours(hits=hits, embeddings=np.asarray(embeddings, np.float32))
