"""The one serving service behind every front end: search, predict (CLIP beside RECO, with the neighbours
and attention that explain it), items (read, browse, take down), ingest jobs and status.

``reco serve`` exposes it over HTTP (``api/``), the UI calls it in-process or through the server
(:class:`app.services.serving_client.ServingClient`, same methods), the refine worker wraps it, and the
CLI uses it — no second copy of prediction or search anywhere above it.

It follows the *live* embedding version: the encoder of the version the alias points at, the newest
fusion checkpoint registered for that encoder (picked up without a restart), the live memory (the
engine's HNSW, k' per request) and a class-embedding cache that survives restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from app.config import Settings
from app.db.models import EmbeddingVersion, Item
from app.db.repo import MetadataRepo
from app.encoder import Encoder, create_encoder
from app.imaging import ImageLimits, ImageRejected, open_image_safely, read_image_file
from app.manifest import load_classes
from app.memory.base import MemoryStore, MemoryStoreError, SearchHit, VectorMemory
from app.memory.store import live_memory, open_store
from app.refine import Refiner, refiner_from_checkpoint
from app.schemas import JobStatus, Modality, RefineMode
from app.services.memory_map import MapQuery, MemoryMap, memory_map
from app.services.method_common import MethodError, checkpoint_label, resolve_checkpoint, resolve_device
from app.services.predict import ClassScore, PredictCaches, PredictRequest, predict_image
from app.services.search import SearchRequest, SearchResult, SearchService, default_target
from app.services.status import memory_status
from app.zeroshot import ClassEmbeddingCache

log = logging.getLogger(__name__)

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "sample"
MAX_CLASSES = 5_000
CAPTIONS_PER_IMAGE = 5  # caption hits fetched per wanted image when grouping (Flickr8k has five per image)


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
    mode: RefineMode = RefineMode.BOTH
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
    mode: RefineMode
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


def ingest_roots(settings: Settings) -> list[Path]:
    """Folders a server-side path given to an ingestion (API, UI) may lie in."""
    return [Path(settings.shared_data), Path(settings.data_dir), *settings.allowed_roots, *settings.watch_dirs]


def class_set_roots(settings: Settings) -> tuple[Path, ...]:
    return (Path(settings.shared_data), Path(settings.data_dir) / "datasets", SAMPLE_ROOT)


def class_sets(settings: Settings) -> dict[str, Path]:
    """Dataset name → its ``classes.txt``: the shared datasets, the data dir's, the bundled sample's."""
    found: dict[str, Path] = {}
    for root in class_set_roots(settings):
        if root.is_dir():
            for path in sorted(root.glob("*/classes.txt")):
                found.setdefault(path.parent.name, path)
    return found


# --- the live state -------------------------------------------------------------------------------------
@dataclass
class _Live:
    version: EmbeddingVersion | None  # None: nothing ingested yet (the configured encoder, no memory)
    encoder: Encoder
    memory: VectorMemory | None
    checkpoint_id: int | None = None
    checkpoint_label: str | None = None
    checkpoint_path: str | None = None
    refiner: Refiner | None = None
    refiner_error: str | None = None


IngestRunner = Callable[..., dict[str, Any]]  # ingestion.pipeline.ingest_source, injected by the layer above


class ServingService:
    """Constructor arguments: explicit, or built from the settings. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        *,
        encoder: Encoder | None = None,
        store: MemoryStore | None = None,
        repo: MetadataRepo | None = None,
        ingest_runner: IngestRunner | None = None,
    ) -> None:
        self.settings = settings
        self.repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
        self.store = store or open_store(settings)
        self._given_encoder = encoder
        self._encoders: dict[str, Encoder] = {}
        self.limits = ImageLimits.from_settings(settings)
        self.predict_caches = PredictCaches()  # this service's class embeddings and loaded fusion models
        self.class_cache: ClassEmbeddingCache = self.predict_caches.class_cache(settings)  # predictions use it
        self._lock = threading.RLock()
        self._live: _Live | None = None
        self._checked_at = 0.0
        self._ingest_runner = ingest_runner
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reco-serve-ingest")
        self._job_totals: dict[int, int | None] = {}
        self._job_futures: dict[int, Future[Any]] = {}
        self._job_cancel: dict[int, threading.Event] = {}
        self._label_cache: dict[str, tuple[tuple[str, int], list[str]]] = {}
        self._relatedness_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._captions_cache: tuple[int, str] | None = None
        self.last_request = time.monotonic()  # the background indexer waits for quiet

    # --- live version, encoder, refiner ------------------------------------------------------------------
    def _encoder_for(self, version: EmbeddingVersion | None) -> Encoder:
        from app.encoder_identity import EncoderId
        from app.services.reembed import encoder_for

        given = self._given_encoder
        if version is None or (given is not None and given.encoder_id == version.encoder_id):
            if given is None:
                given = self._given_encoder = create_encoder(self.settings)
            return given
        if version.encoder_id not in self._encoders:
            self._encoders.clear()  # one live encoder at a time
            self._encoders[version.encoder_id] = encoder_for(self.settings, EncoderId.of_version(version))
        return self._encoders[version.encoder_id]

    def live(self, *, max_age_s: float = 1.0) -> _Live:
        """What is live now (re-checked at most every ``max_age_s``: one indexed query)."""
        from app.services.reembed import live_version

        with self._lock:
            if self._live is not None and time.monotonic() - self._checked_at < max_age_s:
                return self._live
            version = live_version(self.repo)
            current = self._live
            if current is None or (current.version and current.version.encoder_id) != (version and version.encoder_id):
                encoder = self._encoder_for(version)
                memory = live_memory(self.settings, store=self.store) if version is not None else None
                current = self._live = _Live(version, encoder, memory)
                log.info("serving encoder %s over %s", encoder.encoder_id, version.collection if version else "nothing")
            self._refresh_checkpoint(current)
            self._checked_at = time.monotonic()
            return current

    def _refresh_checkpoint(self, live: _Live) -> None:
        if live.memory is None:
            live.refiner, live.refiner_error = None, "the memory is empty: ingest something first"
            return
        from app.services.method_common import default_checkpoint

        encoder_id = live.encoder.encoder_id
        if not self.settings.fusion_checkpoint:  # a registered one (enough pairs) wins over the committed default
            wanted_path, _ = default_checkpoint(self.repo.session_factory, encoder_id)
            wanted = str(wanted_path) if wanted_path else None
            if live.refiner is not None and live.checkpoint_path == wanted:
                return
            if live.refiner is None and live.refiner_error is not None and wanted is None:
                return  # still none registered: nothing to load
        elif live.refiner is not None:
            return
        try:
            path, rec = resolve_checkpoint(self.settings, encoder_id, None, self.repo.session_factory)
            refiner, _ = refiner_from_checkpoint(path, live.memory, k=self.settings.k_infer,
                                                 expected_sha256=rec.sha256 if rec else None,
                                                 device=resolve_device(self.settings))
            live.refiner, live.refiner_error = refiner, None
            live.checkpoint_id, live.checkpoint_label, live.checkpoint_path = (
                rec.id if rec else None, checkpoint_label(path, rec), str(path))
            log.info("fusion checkpoint %s for %s", path, encoder_id)
        except MethodError as exc:  # no checkpoint for this encoder (e.g. right after a re-embedding)
            live.refiner, live.checkpoint_id, live.refiner_error = None, None, str(exc)

    def warm_up(self) -> None:
        """Load the encoder weights and the checkpoint now, not in the first request."""
        live = self.live(max_age_s=0)
        live.encoder.encode_texts(["warm-up"])

    # --- predict -------------------------------------------------------------------------------------------
    def resolve_classes(self, query: PredictQuery) -> list[str]:
        if query.labels is not None:
            return list(query.labels)
        sets = class_sets(self.settings)
        assert query.class_set is not None
        if query.class_set not in sets:
            raise LookupError(f"unknown class set {query.class_set!r}; known: {', '.join(sorted(sets)) or 'none'}")
        return load_classes(sets[query.class_set])

    def prepare_classes(self, query: PredictQuery,
                        progress: Callable[[int, int], None] | None = None) -> ClassSetPrepared:
        """Compute (or find cached) the class embeddings a prediction against this class set needs: CLIP's, and
        for modes text/both the refined ones — batched, cached on disk across restarts. ``progress(done, total)``
        counts class embeddings (twice the classes when the prompts are refined). A front end prepares a large
        set in chunks of labels to show a progress bar; the full set is then assembled from the chunks' rows."""
        from app.zeroshot import ZeroShotClassifier

        started = time.perf_counter()
        classes = self.resolve_classes(query)
        live = self.live()
        k = query.k or self.settings.k_infer
        refines = query.mode in (RefineMode.TEXT, RefineMode.BOTH) and live.refiner is not None
        total = len(classes) * (2 if refines else 1)
        cache = self.predict_caches.class_cache(self.settings)
        hits = cache.hits
        clip = ZeroShotClassifier(classes, live.encoder, templates=query.templates, cache=cache)
        clip.class_embeddings(RefineMode.CLIP, progress=lambda d, _t: progress and progress(d, total))
        if refines:
            assert live.refiner is not None
            refined = ZeroShotClassifier(classes, live.encoder, templates=query.templates,
                                         refiner=live.refiner.with_k(k), checkpoint_id=live.checkpoint_label or "none",
                                         cache=cache)
            refined.class_embeddings(RefineMode.TEXT,
                                     progress=lambda d, _t: progress and progress(len(classes) + d, total))
        return ClassSetPrepared(classes=len(classes), refined=refines, seconds=time.perf_counter() - started,
                                cached=cache.hits > hits)

    def predict(self, images: list[tuple[str, bytes]], query: PredictQuery) -> list[PredictionOut]:
        """CLIP and RECO for each image: one decode and one encode per image; class embeddings cached."""
        self.last_request = time.monotonic()
        classes = self.resolve_classes(query)
        live = self.live()
        k = query.k or self.settings.k_infer
        fit = getattr(live.encoder, "image_size", None)  # downscaled right after decoding: bounded memory
        decoded = [open_image_safely(data, self.limits, fit=fit) for _, data in images]  # ImageRejected: a 4xx
        vectors = live.encoder.encode_images(decoded) if decoded else np.zeros((0, 0), np.float32)
        loaded = (live.refiner, live.checkpoint_label or "") if live.refiner is not None else None
        out = []
        for (name, _), vector in zip(images, vectors, strict=True):
            def run(mode: RefineMode, v: np.ndarray = vector) -> Any:
                request = PredictRequest(image_bytes=b"", classes=classes, mode=mode, k=k, top=query.top,
                                         templates=query.templates)
                return predict_image(self.settings, request, encoder=live.encoder, memory=live.memory,
                                     session_factory=self.repo.session_factory, refiner=loaded, image_vector=v,
                                     caches=self.predict_caches)

            clip = run(RefineMode.CLIP)
            answer = PredictionOut(name=name, clip=clip.predictions, mode=query.mode, k=k,
                                   encoder_id=live.encoder.encoder_id)
            if live.memory is not None:
                answer.relatedness = self.relatedness(live, vector)
            if query.mode is RefineMode.CLIP:
                out.append(answer)
                continue
            if loaded is None:
                answer.reco_unavailable = live.refiner_error
                out.append(answer)
                continue
            try:
                reco = run(query.mode)
            except (MethodError, MemoryStoreError) as exc:
                answer.reco_unavailable = str(exc)
                out.append(answer)
                continue
            answer.reco, answer.checkpoint = reco.predictions, reco.checkpoint
            answer.self_attention = reco.self_attention
            threshold = live.refiner.fallback.get("image") if live.refiner is not None else None
            if threshold is not None and query.mode in (RefineMode.IMAGE, RefineMode.BOTH) and reco.neighbours:
                answer.fallback_threshold = float(threshold)
                answer.fell_back = max(n.score for n in reco.neighbours) < threshold
            answer.neighbours = self._with_metadata([
                NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score, attention=n.attention)
                for n in reco.neighbours])
            if query.mode in (RefineMode.TEXT, RefineMode.BOTH):
                answer.class_explanations = self._explain_classes(live, [c.name for c in reco.predictions[:3]],
                                                                  query.templates, k)
            out.append(answer)
        return out

    def _explain_classes(self, live: _Live, names: list[str], templates: str | None, k: int) -> list[ClassExplanation]:
        """Each class's first prompt, refined as the text side refines it: what it retrieved and how the
        fusion weighed it (the class embedding averages this over the prompt templates)."""
        from app.zeroshot import resolve_templates

        assert live.refiner is not None
        template = resolve_templates(templates)[0]
        prompts = [template.replace("{c}", n) for n in names]
        vectors = live.encoder.encode_texts(prompts)
        refiner = live.refiner.with_k(k)
        out = []
        for name, prompt, vector in zip(names, prompts, vectors, strict=True):
            result = refiner.refine_one(vector, Modality.TEXT)
            out.append(ClassExplanation(name=name, prompt=prompt, self_attention=result.self_attention,
                                        neighbours=self._with_metadata([
                                            NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score,
                                                         attention=n.attention, image_hash=n.image_hash)
                                            for n in result.neighbours])))
        return out

    def relatedness(self, live: _Live, vector: np.ndarray) -> Relatedness | None:
        """The query's nearest memory image against the memory's own nearest-image similarities."""
        assert live.memory is not None
        hits = live.memory.search(vector, Modality.IMAGE, 1)
        if not hits:
            return None
        typical = self._typical_relatedness(live)
        return Relatedness(top_similarity=hits[0].score, **typical)

    def _typical_relatedness(self, live: _Live, sample: int = 64) -> dict[str, Any]:
        """Median and 5th percentile of "nearest other image" similarity over a sample of the memory's images,
        cached per collection and size (one batched search)."""
        memory = live.memory
        assert memory is not None
        key = (memory.collection, memory.count())
        cached = self._relatedness_cache.get(key)
        if cached is not None:
            return cached
        points = list(next(iter(memory.scroll(limit=sample, with_vectors=True)), []))[:sample]
        if len(points) < 5:
            return {}
        vectors = np.stack([p.vector(Modality.IMAGE) for p in points])
        found = memory.search_batch(vectors, Modality.IMAGE, 12)
        best = []
        for point, hits in zip(points, found, strict=True):
            own = point.payload.image_hash if point.payload else None
            others = [h.score for h in hits if h.item_id != point.item_id
                      and (h.payload is None or h.payload.image_hash != own)]
            if others:
                best.append(others[0])
        if not best:
            return {}
        value = {"typical": float(np.median(best)), "low": float(np.percentile(best, 5)), "sample": len(best)}
        self._relatedness_cache[key] = value
        return value

    def class_coverage(self, labels: list[str]) -> ClassCoverage:
        """Which of ``labels`` the memory holds: some caption mentions the class name (case-insensitive,
        '_' and '-' read as spaces). One pass over the memory's distinct captions, cached per item count."""
        count = self.repo.count_items()
        if self._captions_cache is None or self._captions_cache[0] != count:
            self._captions_cache = (count, " \n ".join(_words(c) for c in self.repo.distinct_captions()))
        text = self._captions_cache[1]
        missing = [label for label in labels if _words(label) not in text]
        return ClassCoverage(classes=len(labels), held=len(labels) - len(missing), missing=missing[:50],
                             missing_count=len(missing))

    # --- search --------------------------------------------------------------------------------------------
    def search(self, query: SearchQuery) -> SearchAnswer:
        """Ranks the target vectors (default: images — an image query finds similar images). With
        ``distinct_images`` (default) each image is one result carrying all its captions: caption hits of one
        image are collapsed (more hits are fetched so that k images come back)."""
        self.last_request = time.monotonic()
        live = self.live()
        if live.memory is None:
            raise LookupError("the memory is empty: ingest something first (reco ingest SOURCE)")
        self._check_extra_filters(query.filters)
        service = SearchService(self.settings, encoder=live.encoder, memory=live.memory)
        target = query.target or default_target(query.query_modality)
        fetch = min(1000, query.k * CAPTIONS_PER_IMAGE) if query.distinct_images and target is Modality.TEXT else None
        refines = _refines(query.mode, query.query_modality)
        if not refines or live.refiner is None:
            found = service.search(query, fetch=fetch)
            answer = SearchAnswer(results=self._results(found.results, query), reco=False,
                                  query_modality=found.query_modality, target=found.target,
                                  encoder_id=found.encoder_id, random_weights=found.random_weights)
            if not refines and query.mode is not RefineMode.CLIP:
                answer.reco_unavailable = (f"mode {query.mode} does not refine a {query.query_modality} query "
                                           "(use both, or the query's own side)")
            elif refines:
                answer.reco_unavailable = live.refiner_error
            return answer
        refiner = live.refiner.with_k(query.k_prime)
        explanation: dict[str, Any] = {}

        def refine(vector: np.ndarray, modality: Modality) -> np.ndarray:
            result = refiner.refine_one(vector, modality)
            explanation["neighbours"] = [
                NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score, attention=n.attention,
                             image_hash=n.image_hash) for n in result.neighbours]
            explanation["self_attention"] = result.self_attention
            return result.vector

        found = service.search(query, refine=refine, fetch=fetch)
        return SearchAnswer(results=self._results(found.results, query), reco=True,
                            query_modality=found.query_modality, target=found.target, encoder_id=found.encoder_id,
                            random_weights=found.random_weights,
                            neighbours=self._with_metadata(explanation.get("neighbours", [])),
                            self_attention=explanation.get("self_attention"))

    def _check_extra_filters(self, filters: dict[str, Any] | None) -> None:
        """``extra.<column>`` must name a column some item has: an unknown one is an error, not 0 results."""
        from app.memory.base import UnknownFilterField

        for key in filters or {}:
            if key.startswith("extra.") and not self.repo.has_extra_column(key.removeprefix("extra.")):
                raise UnknownFilterField(f"unknown filter field {key!r}: no item has an extra column "
                                         f"{key.removeprefix('extra.')!r}")

    def _results(self, found: list[SearchResult], query: SearchQuery) -> list[NeighbourOut]:
        """The hits as results: one per image (best score first, all its captions) unless asked otherwise."""
        results = [neighbour_of(r) for r in found]
        if query.distinct_images:
            grouped: dict[str, NeighbourOut] = {}
            for r in results:
                grouped.setdefault(r.image_hash or r.item_id, r)
            results = list(grouped.values())[: query.k]
            captions = self.repo.captions_of_images([r.image_hash for r in results if r.image_hash])
            for r in results:
                r.captions = captions.get(r.image_hash or "", []) or ([r.caption] if r.caption else [])
        return self._named(results)

    def label_names(self, dataset: str | None) -> list[str] | None:
        """The class names of a dataset in the memory (its ``classes.txt``, found as the class sets are)."""
        if not dataset:
            return None
        path = class_sets(self.settings).get(dataset)
        if path is None:
            return None
        key = (str(path), path.stat().st_mtime_ns)
        cached = self._label_cache.get(dataset)
        if cached is None or cached[0] != key:
            try:
                cached = self._label_cache[dataset] = (key, load_classes(path))
            except Exception:  # noqa: BLE001 - an unreadable classes.txt: numbers instead of names
                return None
        return cached[1]

    def _named(self, neighbours: list[NeighbourOut]) -> list[NeighbourOut]:
        for n in neighbours:
            names = self.label_names(n.dataset) if n.label is not None else None
            if names and n.label is not None and 0 <= n.label < len(names):
                n.label_name = names[n.label]
        return neighbours

    def _with_metadata(self, neighbours: list[NeighbourOut]) -> list[NeighbourOut]:
        """Source, dataset and split from the metadata DB (one query)."""
        if not neighbours:
            return neighbours
        items = {item.id: item for item in self.repo.get_items([n.item_id for n in neighbours])}
        for n in neighbours:
            item = items.get(n.item_id)
            if item is not None:
                n.source = n.source or item.source_uri
                n.dataset, n.split = n.dataset or item.dataset, n.split or item.split
                n.label = n.label if n.label is not None else item.label
                n.caption = n.caption or item.caption
                n.image_hash = n.image_hash or item.image_hash
        return self._named(neighbours)

    # --- the memory's map -------------------------------------------------------------------------------------
    def memory_map(self, query: MapQuery, image_bytes: bytes | None = None) -> MemoryMap:
        """A 2-D PCA map of the image vectors (one point per image) with class names; an item or an uploaded
        image marked as the query, with its nearest images."""
        self.last_request = time.monotonic()
        live = self.live()
        if live.memory is None:
            raise LookupError("the memory is empty: ingest something first (reco ingest SOURCE)")
        vector = None
        if image_bytes is not None:
            vector = live.encoder.encode_images([open_image_safely(image_bytes, self.limits)])[0]
        answer = memory_map(live.memory, query, query_vector=vector)
        named = self._named([NeighbourOut(item_id=p.item_id, caption=p.caption, score=0.0, dataset=p.dataset,
                                          label=p.label) for p in answer.points])
        for point, n in zip(answer.points, named, strict=True):
            point.label_name = n.label_name
        if answer.query is not None and answer.query.label is not None:
            answer.query.label_name = self._named([NeighbourOut(item_id="q", score=0.0, dataset=answer.query.dataset,
                                                                label=answer.query.label)])[0].label_name
        return answer

    # --- items ---------------------------------------------------------------------------------------------
    def list_items(self, *, filters: dict[str, Any] | None = None, offset: int = 0, limit: int = 50,
                   caption_contains: str | None = None) -> ItemsPage:
        rows, total = self.repo.list_items(filters=filters, offset=offset, limit=limit,
                                           caption_contains=caption_contains)
        return ItemsPage(items=[item_out(r) for r in rows], total=total, offset=offset, limit=limit)

    def get_item(self, item_id: str) -> ItemDetail:
        found = self.repo.get_items([item_id])
        if not found or found[0].deleted_at is not None:
            raise LookupError(f"no item {item_id}")
        item = found[0]
        versions = {v.encoder_id: v for v in self.repo.versions()}
        embeddings = [EmbeddingOut(encoder_id=e.encoder_id,
                                   collection=versions[e.encoder_id].collection if e.encoder_id in versions else None,
                                   live=bool(e.encoder_id in versions and versions[e.encoder_id].is_live),
                                   status=e.status, reason=e.reason, detail=e.detail, attempts=e.attempts,
                                   updated_at=e.updated_at) for e in self.repo.item_embeddings(item_id)]
        memory = self.live().memory
        in_memory = bool(memory is not None and memory.existing_ids([item_id]))
        return cast(ItemDetail, item_out(item, ItemDetail, embeddings=embeddings, in_memory=in_memory))

    def item_image(self, item_id: str) -> tuple[bytes, str]:
        """The item's image bytes (read from its source, checked against its hash) and a media type."""
        import hashlib

        found = self.repo.get_items([item_id])
        if not found or found[0].deleted_at is not None:
            raise LookupError(f"no item {item_id}")
        item = found[0]
        path = Path(item.source_uri)
        if not path.is_file():
            raise LookupError(f"the image of item {item_id} is no longer at {item.source_uri}")

        try:
            data = read_image_file(path, self.settings.max_image_bytes)
        except ImageRejected as exc:
            raise LookupError(f"the image of item {item_id} cannot be read: {exc.detail}") from exc
        if hashlib.sha256(data).hexdigest() != item.image_hash:
            raise LookupError(f"the image of item {item_id} changed since it was ingested")
        import io

        from PIL import Image

        open_image_safely(data, self.limits)  # the same checks as ingestion before anything is served
        with Image.open(io.BytesIO(data)) as header:  # the format from the header only
            media = Image.MIME.get((header.format or "").upper(), "application/octet-stream")
        return data, media

    def neighbours_of_item(self, item_id: str, k: int | None = None) -> list[NeighbourOut]:
        """The item's own neighbours in the live memory (image->image, other images only); with a fusion
        checkpoint, the attention the fusion gives each when it refines this item's image (k' as configured,
        unless ``k`` says otherwise)."""
        live = self.live()
        memory = live.memory
        if memory is None:
            return []
        points = memory.retrieve([item_id], with_vectors=True)
        if not points:
            return []
        own = points[0].payload.image_hash if points[0].payload else None
        vector = points[0].vector(Modality.IMAGE)
        others = [p.item_id for p in (memory.search(vector, Modality.IMAGE, 20, filters={"image_hash": own})
                                      if own else [])]  # its other captions: the same image
        if live.refiner is not None:
            refined = live.refiner.with_k(k).refine_image(vector, exclude_ids=tuple({item_id, *others}))
            return self._with_metadata([NeighbourOut(item_id=n.item_id, caption=n.caption or "", score=n.score,
                                                     attention=n.attention, image_hash=n.image_hash)
                                        for n in refined.neighbours])
        n = k or self.settings.k_infer
        hits = memory.search(vector, Modality.IMAGE, n, exclude_ids=[item_id, *others], distinct_images=True)
        return self._named([neighbour_of(h) for h in hits][:n])

    def delete_item(self, item_id: str, reason: str) -> DeleteOut:
        """Takedown: vectors removed from every collection, the row marked deleted (time, reason), caches
        that may hold it dropped; ingesting the same content again is refused."""
        reason = reason.strip() or "deleted"
        found = self.repo.get_items([item_id])
        if not found:
            raise LookupError(f"no item {item_id}")
        removed = []
        for name in self.store.list_collections():
            memory = self.store.collection(name)
            if memory.existing_ids([item_id]):
                memory.delete([item_id])
                removed.append(name)
        item = self.repo.mark_deleted(item_id, reason)
        assert item is not None and item.deleted_at is not None
        self.class_cache.clear()  # refined class embeddings may have used it (their key has the memory size too)
        with self._lock:
            self._checked_at = 0.0
        log.warning("item %s taken down (%s): vectors removed from %s", item_id, reason, removed or "no collection")
        return DeleteOut(id=item_id, deleted_at=item.deleted_at, reason=item.deleted_reason or reason,
                         vectors_removed_from=removed)

    # --- ingest jobs -------------------------------------------------------------------------------------
    def start_ingest(self, source: Path, *, kind: str, total: int | None = None,
                     cleanup: Callable[[], None] | None = None, dataset: str | None = None,
                     caption_template: str | None = None) -> JobOut:
        """Queue an ingestion of ``source`` (one job at a time, in this process); returns the job at once.

        ``total`` (rows to go through) is counted in the job's thread when not given, so every job has a
        progress; ``dataset`` names the items; ``caption_template`` captions class-folder trees."""
        if self._ingest_runner is None:
            raise RuntimeError("this serving service was built without an ingest runner")
        from app.services.ingest import IngestService

        live = self.live(max_age_s=0)
        ingest = IngestService(self.settings, encoder=live.encoder, repo=self.repo)
        job_id = ingest.start_job(str(source), kind)
        self._job_totals[job_id] = total
        cancel = self._job_cancel[job_id] = threading.Event()
        runner = self._ingest_runner
        options: dict[str, Any] = {k: v for k, v in (("dataset", dataset), ("caption_template", caption_template))
                                   if v}

        def work() -> dict[str, Any]:
            try:
                if cancel.is_set():  # cancelled while it waited for the job before it
                    ingest.finish_job(job_id, JobStatus.CANCELLED, "cancelled before it started")
                    return {"job_id": job_id, "status": JobStatus.CANCELLED}
                if self._job_totals.get(job_id) is None:  # the runner counts the rows first
                    options["on_total"] = lambda n: self._job_totals.__setitem__(job_id, n)
                return runner(source, self.settings, service=ingest, job_id=job_id, progress=False,
                              cancelled=cancel.is_set, **options)
            except Exception as exc:
                log.exception("ingest job %d failed", job_id)
                ingest.finish_job(job_id, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if cleanup is not None:
                    cleanup()

        self._job_futures[job_id] = self._jobs.submit(work)
        return self.get_job(job_id)

    def cancel_job(self, job_id: int) -> JobOut:
        """Ask a job to stop: between two batches it ends as *cancelled*; what it stored stays. A job that
        already ended is returned as it is."""
        job = self.get_job(job_id, failures=0)
        event = self._job_cancel.get(job_id)
        if job.status == JobStatus.RUNNING and event is not None:
            event.set()
            log.warning("ingest job %d: cancel requested", job_id)
        elif job.status == JobStatus.RUNNING:
            raise LookupError(f"ingest job {job_id} is not run by this process (an embed worker's job)")
        return self.get_job(job_id)

    def get_job(self, job_id: int, *, failures: int = 200) -> JobOut:
        job = self.repo.get_job(job_id)
        if job is None:
            raise LookupError(f"no ingest job {job_id}")
        return JobOut(id=job.id, source=job.source, kind=job.kind, status=job.status, seen=job.seen,
                      ingested=job.ingested, duplicates=job.duplicates, failed=job.failed,
                      total=self._job_totals.get(job_id),
                      cancel_requested=bool(job_id in self._job_cancel and self._job_cancel[job_id].is_set()),
                      error=job.error, started_at=job.started_at,
                      finished_at=job.finished_at,
                      failures=[FailureOut(source=f.source, reason=f.reason, detail=f.detail)
                                for f in self.repo.job_failures(job_id, limit=failures)])

    def recent_jobs(self, limit: int = 20) -> list[JobOut]:
        return [self.get_job(j.id, failures=0) for j in self.repo.recent_jobs(limit)]

    def wait_for_job(self, job_id: int, timeout_s: float | None = None) -> JobOut:
        future = self._job_futures.get(job_id)
        if future is not None:
            future.exception(timeout=timeout_s)
        return self.get_job(job_id)

    def queue_depth(self) -> int:
        return sum(1 for f in self._job_futures.values() if not f.done())

    # --- status ---------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        live = self.live()
        out = memory_status(self.settings, self.repo, store=self.store)
        return out | {"deleted_items": self.repo.count_deleted(), "serving": {
            "encoder_id": live.encoder.encoder_id, "checkpoint": live.checkpoint_label,
            "checkpoint_path": live.checkpoint_path, "reco_unavailable": live.refiner_error,
            "ingest_jobs_waiting": self.queue_depth()}}

    def close(self) -> None:
        self._jobs.shutdown(wait=False, cancel_futures=True)


def _words(text: str) -> str:
    """Lower case, punctuation and '_'/'-' as spaces, padded: whole-word containment by substring."""
    import re

    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def _refines(mode: RefineMode, query: Modality) -> bool:
    """Whether ``mode`` refines the query's side (the stored side is the memory, never refined online)."""
    if mode is RefineMode.BOTH:
        return True
    return (mode, query) in ((RefineMode.IMAGE, Modality.IMAGE), (RefineMode.TEXT, Modality.TEXT))
