"""The refine worker's state: the live memory, its encoder, the fusion checkpoint — loaded once.

Neighbours come from the memory's engine (HNSW, k' per request): a Qdrant server directly, or the
embedded engine through the process that owns it (``reco serve``). The worker follows the live version:
after a re-embedding swap it loads the new encoder, and it picks up a newer fusion checkpoint of the live
encoder without a restart.

The method is the app's: ``predict`` wraps :func:`app.services.predict.predict_image`; ``search``
is :class:`app.services.search.SearchService` with the query refined by :class:`app.refine.Refiner`.
Both answer with plain CLIP *and* RECO, so a caller sees what the refinement changed. Latencies are
kept per request and logged as p50/p99.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.config import Settings
from app.db.models import EmbeddingVersion
from app.db.repo import MetadataRepo
from app.db.session import make_session_factory
from app.memory.base import VectorMemory
from app.memory.store import live_memory
from app.schemas import Modality, RefineMode
from app.services.reembed import encoder_for, live_version, seed_of

log = logging.getLogger(__name__)

LOG_EVERY = 50  # requests between two latency log lines


@dataclass
class _Loaded:
    version: EmbeddingVersion
    memory: VectorMemory
    encoder: Any
    checkpoint_id: int | None = None
    checkpoint_label: str | None = None
    refiner: Any = None
    refiner_error: str | None = None


def percentile_ms(samples: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(samples) * 1000.0, q)) if samples else None


class RefineRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.factory = make_session_factory(settings.resolved_database_url)
        self._lock = threading.RLock()
        self._loaded: _Loaded | None = None
        self._latency: dict[str, deque[float]] = {"predict": deque(maxlen=2000), "search": deque(maxlen=2000)}
        self._served = 0

    # --- what is live -----------------------------------------------------------------------------
    def current(self) -> _Loaded:
        version = live_version(MetadataRepo(self.factory))
        if version is None:
            raise LookupError("the memory is empty: ingest something first (no live embedding version)")
        with self._lock:
            if self._loaded is None or self._loaded.version.encoder_id != version.encoder_id:
                self._loaded = self._load(version)
            self._refresh_checkpoint(self._loaded)
            return self._loaded

    def _load(self, version: EmbeddingVersion) -> _Loaded:
        started = time.perf_counter()
        encoder = encoder_for(self.settings, version.model, version.pretrained, seed_of(version.encoder_id))
        encoder.encode_texts(["warm-up"])  # weights now, not on the first request
        log.info("refine worker: live encoder %s (collection %s) loaded in %.2f s", version.encoder_id,
                 version.collection, time.perf_counter() - started)
        return _Loaded(version, live_memory(self.settings), encoder)

    def _refresh_checkpoint(self, loaded: _Loaded) -> None:
        """The newest checkpoint of the live encoder (one indexed query per request)."""
        from app.db.runs import newest_checkpoint

        record = newest_checkpoint(self.factory, loaded.version.encoder_id)
        wanted = record.id if record else None
        if loaded.refiner is not None and (self.settings.fusion_checkpoint or loaded.checkpoint_id == wanted):
            return
        if loaded.refiner_error is not None and wanted is None and not self.settings.fusion_checkpoint:
            return
        from app.refine import refiner_from_checkpoint
        from app.services.method_common import MethodError, checkpoint_label, resolve_checkpoint, resolve_device

        try:
            path, rec = resolve_checkpoint(self.settings, loaded.version.encoder_id, None, self.factory)
            loaded.refiner, _ = refiner_from_checkpoint(
                path, loaded.memory, k=self.settings.k_infer, expected_sha256=rec.sha256 if rec else None,
                device=resolve_device(self.settings))
            loaded.checkpoint_id, loaded.refiner_error = (rec.id if rec else None), None
            loaded.checkpoint_label = checkpoint_label(path, rec)
            log.info("refine worker: fusion checkpoint %s for %s", path, loaded.version.encoder_id)
        except MethodError as exc:  # no checkpoint for this encoder (e.g. right after a re-embedding)
            loaded.refiner, loaded.checkpoint_id, loaded.refiner_error = None, None, str(exc)

    def _describe(self, loaded: _Loaded) -> dict[str, Any]:
        return {"encoder_id": loaded.version.encoder_id, "memory": loaded.version.collection,
                "memory_count": loaded.memory.count(),
                "checkpoint_id": loaded.checkpoint_id, "retraining_required": loaded.refiner is None,
                "reco_unavailable": loaded.refiner_error}

    # --- requests ---------------------------------------------------------------------------------
    def predict(self, image_b64: str, classes: list[str], *, mode: str | None = None,
                k: int | None = None) -> dict[str, Any]:
        from app.services.method_common import MethodError
        from app.services.predict import PredictRequest, predict_image

        started = time.perf_counter()
        loaded = self.current()
        image = base64.b64decode(image_b64)
        reco_mode = RefineMode(mode or RefineMode.BOTH)

        def run(m: RefineMode) -> dict[str, Any]:
            request = PredictRequest(image_bytes=image, classes=classes, mode=m, k=k)
            refiner = (loaded.refiner, loaded.checkpoint_label or "") if loaded.refiner is not None else None
            return predict_image(self.settings, request, encoder=loaded.encoder, memory=loaded.memory,
                                 session_factory=self.factory, refiner=refiner).model_dump(mode="json")

        out = self._describe(loaded) | {"clip": run(RefineMode.CLIP), "reco": None}
        if reco_mode is not RefineMode.CLIP and loaded.refiner is not None:
            try:
                out["reco"] = run(reco_mode)
            except MethodError as exc:
                out["reco_unavailable"] = str(exc)
        return out | {"latency_ms": self._observe("predict", started)}

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]:
        from app.services.search import SearchRequest, SearchService

        started = time.perf_counter()
        loaded = self.current()
        request = SearchRequest(
            text=query.get("text"), k=k or self.settings.k_infer, filters=query.get("filters") or {},
            image_bytes=base64.b64decode(query["image_b64"]) if query.get("image_b64") else None,
            target=query.get("target"))
        service = SearchService(self.settings, encoder=loaded.encoder, memory=loaded.memory)
        clip = service.search(request)
        out = self._describe(loaded) | {"query_modality": str(request.query_modality), "target": str(clip.target),
                                        "clip": [r.model_dump() for r in clip.results], "reco": None}
        refined = _refines(RefineMode(mode or RefineMode.BOTH), request.query_modality)
        if refined and loaded.refiner is not None:
            explanation: dict[str, Any] = {}

            def refine(vector: np.ndarray, modality: Modality) -> np.ndarray:
                result = loaded.refiner.refine_one(vector, modality)
                explanation["neighbours"] = [
                    {"item_id": n.item_id, "score": n.score, "attention": n.attention, "caption": n.caption}
                    for n in result.neighbours]
                explanation["self_attention"] = result.self_attention
                return result.vector

            out["reco"] = [r.model_dump() for r in service.search(request, refine=refine).results]
            out |= explanation
        return out | {"latency_ms": self._observe("search", started)}

    # --- latency --------------------------------------------------------------------------------
    def _observe(self, kind: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self._latency[kind].append(elapsed)
        self._served += 1
        if self._served % LOG_EVERY == 0:
            stats = self.stats()
            log.info("refine latency over the last requests: %s", {
                name: {"p50_ms": round(v["p50_ms"] or 0, 2), "p99_ms": round(v["p99_ms"] or 0, 2), "n": v["n"]}
                for name, v in stats["latency"].items()})
        return round(elapsed * 1000.0, 3)

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Latency percentiles since start (or the last reset: e.g. to leave the cold start out)."""
        latency = {kind: {"n": len(v), "p50_ms": percentile_ms(list(v), 50), "p99_ms": percentile_ms(list(v), 99)}
                   for kind, v in self._latency.items()}
        loaded = self._loaded
        if reset:
            for samples in self._latency.values():
                samples.clear()
        return {"served": self._served, "latency": latency} | (self._describe(loaded) if loaded else {})


def _refines(mode: RefineMode, query: Modality) -> bool:
    """Whether ``mode`` refines the query's side (the stored side is the memory, never refined online)."""
    if mode is RefineMode.BOTH:
        return True
    return (mode, query) in ((RefineMode.IMAGE, Modality.IMAGE), (RefineMode.TEXT, Modality.TEXT))
