"""``reco predict``: zero-shot classification of one image, with the neighbours that explain it.

Class embeddings (templates x class names, refined by text->text search for modes ``text``/``both``)
are cached per (encoder, checkpoint, memory version, classes, templates), so a prediction costs one
image encode and, for modes ``image``/``both``, one image refinement against the live memory. The caches
belong to whoever predicts (:class:`PredictCaches`: the serving service holds one); a call given none
builds its own, which still finds the class embeddings on disk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.config import Settings
from app.db.factory import SessionFactory
from app.encoder import Encoder, create_encoder
from app.imaging import ImageLimits, open_image_safely
from app.memory.base import VectorMemory
from app.refine import Refinement, Refiner, mode_or_recommended, refiner_from_checkpoint
from app.schemas import RefineMode
from app.services.method_common import (
    checkpoint_label,
    memory_for_encoder,
    resolve_checkpoint,
    resolve_device,
    session_factory_for,
)
from app.zeroshot import ClassEmbeddingCache, ZeroShotClassifier


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_bytes: bytes = Field(repr=False)
    classes: list[str] = Field(min_length=1)
    templates: str | None = None
    mode: RefineMode | None = None  # none: the checkpoint's validated mode (both when it has none)
    top: int = Field(default=5, ge=1)
    k: int | None = Field(default=None, ge=1)
    checkpoint: Path | None = None


class ClassScore(BaseModel):
    label: int
    name: str
    score: float


class NeighbourOut(BaseModel):
    item_id: str
    score: float
    attention: float
    caption: str | None = None


class PredictResponse(BaseModel):
    mode: RefineMode  # the mode used: the request's, else the checkpoint's validated one
    encoder_id: str
    checkpoint: str | None
    predictions: list[ClassScore]
    neighbours: list[NeighbourOut] = []
    self_attention: float | None = None
    fell_back: bool = False  # the memory's neighbours were too far: RECO kept the CLIP embedding of the image
    softmax_scale: float = 100.0  # logit scale of the probabilities (calibrated on validation with the checkpoint)


MAX_CACHED_REFINERS = 8
RefinerKey = tuple[str, str, int, int]  # (checkpoint file, its hash, memory object, k')


class PredictCaches:
    """What predictions keep between calls, owned by their caller: class embeddings per cache folder, and the
    loaded fusion models by (checkpoint file, its hash, memory object, k') — a prediction must not reload
    weights. Thread-safe."""

    def __init__(self, max_refiners: int = MAX_CACHED_REFINERS) -> None:
        self.max_refiners = max_refiners
        self._classes: dict[Path, ClassEmbeddingCache] = {}
        self._refiners: OrderedDict[RefinerKey, tuple[VectorMemory, Refiner]] = OrderedDict()
        self._lock = threading.Lock()

    def class_cache(self, settings: Settings) -> ClassEmbeddingCache:
        """The class-embedding cache of ``settings``' data dir (in process, and on disk under it)."""
        folder = settings.data_dir / "cache" / "zeroshot"
        with self._lock:
            return self._classes.setdefault(folder, ClassEmbeddingCache(folder))

    def forget_classes(self) -> None:
        """Drop the in-process class embeddings (as a restart does); the files on disk stay."""
        with self._lock:
            self._classes.clear()

    def refiner(self, key: RefinerKey, memory: VectorMemory) -> Refiner | None:
        with self._lock:
            cached = self._refiners.get(key)
            if cached is None or cached[0] is not memory:
                return None
            self._refiners.move_to_end(key)
            return cached[1]

    def keep_refiner(self, key: RefinerKey, memory: VectorMemory, refiner: Refiner) -> None:
        with self._lock:
            self._refiners[key] = (memory, refiner)
            while len(self._refiners) > self.max_refiners:
                self._refiners.popitem(last=False)


def _load_refiner(
    settings: Settings, request: PredictRequest, encoder_id: str, memory: VectorMemory,
    factory: SessionFactory | None, caches: PredictCaches,
) -> tuple[Refiner | None, str | None]:
    if request.mode is RefineMode.CLIP:
        return None, None
    factory = factory or session_factory_for(settings)
    path, record = resolve_checkpoint(settings, encoder_id, request.checkpoint, factory)
    k = request.k or settings.k_infer
    stat = path.stat()
    key = (str(path), record.sha256 if record else f"{stat.st_mtime_ns}:{stat.st_size}", id(memory), k)
    cached = caches.refiner(key, memory)
    if cached is not None:
        return cached, checkpoint_label(path, record)
    refiner, _ = refiner_from_checkpoint(path, memory, k=k, expected_sha256=record.sha256 if record else None,
                                         device=resolve_device(settings))
    caches.keep_refiner(key, memory, refiner)
    return refiner, checkpoint_label(path, record)


def predict_image(
    settings: Settings,
    request: PredictRequest,
    *,
    encoder: Encoder | None = None,
    memory: VectorMemory | None = None,
    session_factory: SessionFactory | None = None,
    refiner: tuple[Refiner, str] | None = None,
    image_vector: np.ndarray | None = None,
    caches: PredictCaches | None = None,
) -> PredictResponse:
    """``refiner``: an already loaded (Refiner, checkpoint label) — long-lived callers (reco serve, the refine
    worker) load it once instead of resolving and hashing the checkpoint per call. ``image_vector``: the
    image already decoded and encoded (a caller asking for CLIP and RECO answers encodes it once).
    ``caches``: the caller's class embeddings and loaded fusion models, kept across its calls (none: this
    call's own)."""
    caches = PredictCaches() if caches is None else caches
    encoder = encoder or create_encoder(settings)
    if image_vector is None:
        image = open_image_safely(request.image_bytes, ImageLimits.from_settings(settings),
                                  fit=getattr(encoder, "image_size", None))  # downscaled right after decoding
    loaded: Refiner | None = None
    checkpoint: str | None = None
    if request.mode is not RefineMode.CLIP:
        if refiner is not None:  # loaded once with the default k': this request's k' still counts
            loaded, checkpoint = refiner[0].with_k(request.k), refiner[1]
        else:
            memory = memory or memory_for_encoder(settings, encoder.encoder_id)
            loaded, checkpoint = _load_refiner(settings, request, encoder.encoder_id, memory, session_factory,
                                               caches)
    mode = mode_or_recommended(request.mode, loaded)
    if mode is RefineMode.CLIP:  # chosen by the checkpoint: as a request naming clip, no refiner, no checkpoint
        loaded, checkpoint = None, None
    refiner_obj = loaded.for_task("zeroshot") if loaded is not None else None  # the image is classified
    # CLIP's probabilities: the scale calibrated with the loaded checkpoint when the caller has one, else 100.
    clip_scale = refiner[0].softmax_scale(RefineMode.CLIP) if refiner is not None else None
    classifier = ZeroShotClassifier(request.classes, encoder, templates=request.templates, refiner=refiner_obj,
                                    checkpoint_id=checkpoint or "none", cache=caches.class_cache(settings),
                                    clip_softmax_scale=clip_scale)
    v = encoder.encode_images([image])[0] if image_vector is None else np.asarray(image_vector, np.float32)
    refinement: Refinement | None = None
    if refiner_obj is not None and mode in (RefineMode.IMAGE, RefineMode.BOTH):
        refinement = refiner_obj.refine_image(v)
        v = refinement.vector
    logits = classifier.class_embeddings(mode) @ v
    probs = np.exp(classifier.softmax_scale(mode) * (logits - logits.max()))
    probs /= probs.sum()
    order = np.argsort(-logits)[: request.top]
    return PredictResponse(
        mode=mode, encoder_id=encoder.encoder_id, checkpoint=checkpoint,
        predictions=[ClassScore(label=int(i), name=request.classes[i], score=float(probs[i])) for i in order],
        neighbours=[NeighbourOut(item_id=n.item_id, score=n.score, attention=n.attention, caption=n.caption)
                    for n in (refinement.neighbours if refinement else [])],
        self_attention=refinement.self_attention if refinement else None,
        fell_back=bool(refinement.fell_back) if refinement else False,
        softmax_scale=classifier.softmax_scale(mode),
    )
