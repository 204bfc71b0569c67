"""What the serving service (:mod:`app.services.serving`) answers and is asked: the request and answer
models every front end shares (HTTP, UI, workers, CLI), and the conversions of stored items and search hits
into them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from app.db.models import Item
from app.memory.base import SearchHit
from app.schemas import Modality, RefineMode
from app.services.predict import ClassScore
from app.services.search import SearchRequest, SearchResult

MAX_CLASSES = 5_000


# --- what it answers ------------------------------------------------------------------------------------
class NeighbourOut(BaseModel):
    """A memory item shown as a result or as an explanation (similarity, and attention when refined)."""

    item_id: str
    caption: str = ""
    score: float
    attention: float | None = None
    source: str | None = None
    dataset: str | None = None
    split: str | None = None
    label: int | None = None
    label_name: str | None = None  # the class name of ``label`` (its dataset's classes.txt)
    image_hash: str | None = None
    captions: list[str] = []  # every caption the memory holds for this image (one result per image)


class PredictQuery(BaseModel):
    """The class set (a dataset's ``classes.txt`` by name, or labels) and how to refine."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] | None = Field(default=None, max_length=MAX_CLASSES)
    class_set: str | None = Field(default=None, max_length=128)
    mode: RefineMode | None = Field(default=None, description="none: the loaded checkpoint's validated mode "
                                                            "(both when it has none)")
    k: int | None = Field(default=None, ge=1, le=1000, description="k' neighbours (default RECO_K_INFER)")
    top: int = Field(default=5, ge=1, le=100)
    templates: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _one_class_source(self) -> PredictQuery:
        if (self.labels is None) == (self.class_set is None):
            raise ValueError("give exactly one of labels or class_set")
        if self.labels is not None:
            cleaned = list(dict.fromkeys(s.strip() for s in self.labels if s and s.strip()))
            if not cleaned:
                raise ValueError("labels are empty")
            if any(len(s) > 200 for s in cleaned):
                raise ValueError("a label is longer than 200 characters")
            self.labels = cleaned
        return self


class ClassExplanation(BaseModel):
    """How the text side decided for one class: its prompt refined by text→text search, the captions it
    retrieved, their similarity and the fusion's attention on each."""

    name: str
    prompt: str
    neighbours: list[NeighbourOut] = []
    self_attention: float | None = None


class Relatedness(BaseModel):
    """How related the memory was to the query: the similarity of its nearest memory image, against the
    same figure for the memory's own images (their nearest other image), measured on a sample of them."""

    top_similarity: float
    typical: float | None = None  # median over the sample
    low: float | None = None  # 5th percentile over the sample: below it, the query is outside the memory's domain
    sample: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outside(self) -> bool:
        """Less related than 95 % of the memory's own images are to their nearest: outside its domain."""
        return self.low is not None and self.top_similarity < self.low


class ClassSetPrepared(BaseModel):
    classes: int
    refined: bool  # the refined (text-side) embeddings too
    seconds: float
    cached: bool  # found (at least partly) in the cache


class ClassCoverage(BaseModel):
    """Which classes the memory holds: a class counts as held when some caption mentions it."""

    classes: int
    held: int
    missing: list[str]  # the classes no caption mentions (first 50)
    missing_count: int


class PredictionOut(BaseModel):
    name: str
    clip: list[ClassScore]
    reco: list[ClassScore] | None = None
    mode: RefineMode  # the mode used: the query's, else the checkpoint's validated one
    k: int
    encoder_id: str
    checkpoint: str | None = None
    neighbours: list[NeighbourOut] = []
    self_attention: float | None = None
    class_explanations: list[ClassExplanation] = []  # modes text/both: the top classes' prompt neighbours
    relatedness: Relatedness | None = None
    # the checkpoint's do-no-harm threshold (chosen on validation) for an image query, and whether this image's
    # nearest neighbour fell below it, so that the image side kept its CLIP embedding
    fallback_threshold: float | None = None
    fell_back: bool | None = None
    reco_unavailable: str | None = None  # why there is no RECO answer (no checkpoint, empty memory, ...)
    via: str = "in-process"


class RefineOptions(BaseModel):
    mode: RefineMode = Field(default=RefineMode.CLIP, description="clip, or a RECO mode that refines the query")
    k_prime: int | None = Field(default=None, ge=1, le=1000, description="neighbours that refine the query")


class SearchQuery(SearchRequest, RefineOptions):
    """A search (text or image, target vectors, filters, k, threshold) and whether RECO refines the query."""


class SearchAnswer(BaseModel):
    results: list[NeighbourOut]
    reco: bool
    query_modality: Modality
    target: Modality
    encoder_id: str
    random_weights: bool = False
    neighbours: list[NeighbourOut] = []  # what refined the query (RECO)
    self_attention: float | None = None
    reco_unavailable: str | None = None
    via: str = "in-process"


class ItemOut(BaseModel):
    id: str
    caption: str
    source: str
    dataset: str | None
    split: str | None
    label: int | None
    image_hash: str
    width: int | None
    height: int | None
    size_bytes: int
    created_at: datetime
    extra: dict[str, Any] = {}
    deleted_at: datetime | None = None
    deleted_reason: str | None = None


class EmbeddingOut(BaseModel):
    encoder_id: str
    collection: str | None
    live: bool
    status: str
    reason: str | None
    detail: str | None
    attempts: int
    updated_at: datetime


class ItemDetail(ItemOut):
    embeddings: list[EmbeddingOut] = []
    in_memory: bool = False  # its vectors are in the live collection


class ItemsPage(BaseModel):
    items: list[ItemOut]
    total: int
    offset: int
    limit: int


class FailureOut(BaseModel):
    source: str
    reason: str
    detail: str | None = None


class JobOut(BaseModel):
    id: int
    source: str
    kind: str
    status: str
    seen: int
    ingested: int
    duplicates: int
    failed: int
    total: int | None = None  # rows to go through, when known (a running job's progress = seen / total)
    cancel_requested: bool = False
    error: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    failures: list[FailureOut] = []


class DeleteOut(BaseModel):
    id: str
    deleted_at: datetime
    reason: str
    vectors_removed_from: list[str]


def item_out(item: Item, model: type[ItemOut] = ItemOut, **extra: Any) -> Any:
    return model(id=item.id, caption=item.caption, source=item.source_uri, dataset=item.dataset, split=item.split,
                 label=item.label, image_hash=item.image_hash, width=item.width, height=item.height,
                 size_bytes=item.size_bytes, created_at=item.created_at, extra=dict(item.extra or {}),
                 deleted_at=item.deleted_at, deleted_reason=item.deleted_reason, **extra)


def neighbour_of(hit: SearchHit | SearchResult, attention: float | None = None) -> NeighbourOut:
    if isinstance(hit, SearchResult):
        return NeighbourOut(item_id=hit.item_id, caption=hit.caption, score=hit.score, attention=attention,
                            source=hit.source, dataset=hit.dataset, split=hit.split, label=hit.label,
                            image_hash=hit.image_hash)
    p = hit.payload
    return NeighbourOut(item_id=hit.item_id, caption=p.caption if p else "", score=hit.score, attention=attention,
                        source=p.source if p else None, dataset=p.dataset if p else None,
                        split=p.split if p else None, label=p.label if p else None,
                        image_hash=p.image_hash if p else None)
