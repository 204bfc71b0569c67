"""Memory search by text or image (CLIP embeddings; RECO refinement plugs in through ``refine``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from pydantic import BaseModel, Field, model_validator

from app.encoder import Encoder, create_encoder
from app.imaging import ImageLimits, open_image_safely
from app.memory.base import SearchHit, VectorMemory
from app.memory.store import live_memory
from app.schemas import Modality

if TYPE_CHECKING:
    from app.config import Settings

# A query vector → a refined one (RECO); identity for plain CLIP.
Refiner = Callable[[np.ndarray, Modality], np.ndarray]


class SearchOptions(BaseModel):
    """How to rank: everything but the query itself."""

    k: int = Field(default=5, ge=1, le=1000)
    filters: dict[str, Any] = {}
    target: Modality | None = Field(
        default=None, description="Which stored vectors to rank; default: image vectors (text→image retrieval, "
                                  "image→image: similar images).")
    distinct_images: bool = Field(default=True, description="One result per image (the serving service collapses "
                                  "the caption hits of one image into one result with all its captions).")
    score_threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="Only hits at least this similar.")


class SearchRequest(SearchOptions):
    text: str | None = Field(default=None, max_length=4000)
    image_bytes: bytes | None = Field(default=None, repr=False)

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.text is None) == (self.image_bytes is None):
            raise ValueError("give exactly one of text or image")
        if self.text is not None and not self.text.strip():
            raise ValueError("empty text query")
        return self

    @property
    def query_modality(self) -> Modality:
        return Modality.TEXT if self.text is not None else Modality.IMAGE


class SearchResult(BaseModel):
    item_id: str
    caption: str
    score: float
    source: str | None
    dataset: str | None = None
    split: str | None = None
    label: int | None = None
    image_hash: str | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    encoder_id: str
    random_weights: bool = False
    query_modality: Modality
    target: Modality


def hit_to_result(hit: SearchHit) -> SearchResult:
    p = hit.payload
    return SearchResult(item_id=hit.item_id, caption=p.caption if p else "", score=hit.score,
                        source=p.source if p else None, dataset=p.dataset if p else None,
                        split=p.split if p else None, label=p.label if p else None,
                        image_hash=p.image_hash if p else None)


def default_target(query: Modality) -> Modality:
    """What a query ranks when it does not say: images (a text finds images, an image finds similar images)."""
    return Modality.IMAGE


class SearchService:
    def __init__(self, settings: Settings, *, encoder: Encoder | None = None,
                 memory: VectorMemory | None = None) -> None:
        self.settings = settings
        self.encoder = encoder or create_encoder(settings)
        self.memory = memory or live_memory(settings)
        self.limits = ImageLimits.from_settings(settings)

    def embed_query(self, request: SearchRequest) -> np.ndarray:
        if request.text is not None:
            return cast(np.ndarray, self.encoder.encode_texts([request.text])[0])
        assert request.image_bytes is not None
        fit = getattr(self.encoder, "image_size", None)  # downscaled right after decoding: bounded memory
        image = open_image_safely(request.image_bytes, self.limits, fit=fit)
        return cast(np.ndarray, self.encoder.encode_images([image])[0])

    def search(self, request: SearchRequest, refine: Refiner | None = None,
               fetch: int | None = None) -> SearchResponse:
        """``fetch``: how many hits to ask the memory for (more than k when the caller groups them)."""
        if not self.memory.exists():
            raise LookupError("the memory is empty: ingest something first (reco ingest SOURCE)")
        vector = self.embed_query(request)
        if refine is not None:
            vector = refine(vector, request.query_modality)
        target = request.target or default_target(request.query_modality)
        hits = self.memory.search(vector, target, request.k if fetch is None else fetch, filters=request.filters,
                                  score_threshold=request.score_threshold,
                                  distinct_images=request.distinct_images and target == Modality.IMAGE)
        return SearchResponse(results=[hit_to_result(h) for h in hits], encoder_id=self.encoder.encoder_id,
                              random_weights=bool(getattr(self.encoder, "is_random", False)),
                              query_modality=request.query_modality, target=target)
