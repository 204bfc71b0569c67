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

import time
from typing import Any

import numpy as np

from app.memory.per_image import first_per_image
from app.schemas import Modality, RefineMode
from app.services.search import SearchResult, SearchService, default_target
from app.services.serving_items import ItemServing
from app.services.serving_jobs import JobServing
from app.services.serving_live import SAMPLE_ROOT, IngestRunner, ServingBase, class_set_roots, class_sets, ingest_roots
from app.services.serving_models import (
    MAX_CLASSES,
    ClassCoverage,
    ClassExplanation,
    ClassSetPrepared,
    DeleteOut,
    EmbeddingOut,
    FailureOut,
    ItemDetail,
    ItemOut,
    ItemsPage,
    JobOut,
    NeighbourOut,
    PredictionOut,
    PredictQuery,
    RefineOptions,
    Relatedness,
    SearchAnswer,
    SearchQuery,
    item_out,
    neighbour_of,
)
from app.services.serving_predict import PredictServing
from app.services.status import memory_status

__all__ = [  # the service's public face: every name front ends import from here
    "CAPTIONS_PER_IMAGE", "MAX_CLASSES", "SAMPLE_ROOT", "ClassCoverage", "ClassExplanation", "ClassSetPrepared",
    "DeleteOut", "EmbeddingOut", "FailureOut", "IngestRunner", "ItemDetail", "ItemOut", "ItemsPage", "JobOut",
    "NeighbourOut", "PredictQuery", "PredictionOut", "RefineOptions", "Relatedness", "SearchAnswer", "SearchQuery",
    "ServingBase", "ServingService", "class_set_roots", "class_sets", "ingest_roots", "item_out", "neighbour_of",
]

CAPTIONS_PER_IMAGE = 5  # caption hits fetched per wanted image when grouping (Flickr8k has five per image)


class ServingService(PredictServing, ItemServing, JobServing):
    """Constructor arguments: explicit, or built from the settings. Thread-safe.

    The parts: the live state (:class:`~app.services.serving_live.ServingBase`), predict
    (:mod:`~app.services.serving_predict`), items (:mod:`~app.services.serving_items`), ingest jobs
    (:mod:`~app.services.serving_jobs`); search and status are here.
    """

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
            results = first_per_image(results, lambda r: r.image_hash or r.item_id)[: query.k]
            captions = self.repo.captions_of_images([r.image_hash for r in results if r.image_hash])
            for r in results:
                r.captions = captions.get(r.image_hash or "", []) or ([r.caption] if r.caption else [])
        return self._named(results)

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


def _refines(mode: RefineMode, query: Modality) -> bool:
    """Whether ``mode`` refines the query's side (the stored side is the memory, never refined online)."""
    if mode is RefineMode.BOTH:
        return True
    return (mode, query) in ((RefineMode.IMAGE, Modality.IMAGE), (RefineMode.TEXT, Modality.TEXT))
