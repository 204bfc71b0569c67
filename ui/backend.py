"""Who answers the pages' predictions and searches: this process, or the refine worker.

Both backends return the same plain views (:class:`PredictView`, :class:`SearchView`), so a page never
branches on where the answer came from. In-process is the embedded default; the refine worker is used
when ``RECO_UI_USE_WORKERS`` is set (and then the UI never needs the Qdrant store for these two).
Neighbour thumbnails come from each item's source path, looked up in the metadata DB (the same value
as the Qdrant payload's ``source``; the DB works in both modes).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from app.config import Settings
from app.db.repo import MetadataRepo
from app.encoder import Encoder
from app.memory.base import MemoryStoreError, VectorMemory
from app.refine import Refiner
from app.schemas import Modality, RefineMode
from app.services.method_common import MethodError
from app.services.predict import ClassScore, PredictRequest, PredictResponse, predict_image
from app.services.search import SearchRequest, SearchResult, SearchService

TOP = 5


@dataclass
class Neighbour:
    item_id: str
    caption: str
    score: float
    attention: float | None = None
    source: str | None = None
    dataset: str | None = None
    split: str | None = None


@dataclass
class PredictView:
    clip: list[ClassScore]
    reco: list[ClassScore] | None
    mode: RefineMode
    k: int
    encoder_id: str
    checkpoint: str | None = None
    neighbours: list[Neighbour] = field(default_factory=list)
    self_attention: float | None = None
    reco_unavailable: str | None = None  # why there is no RECO answer (no checkpoint, empty memory, ...)
    via: str = "in-process"


@dataclass
class SearchView:
    results: list[Neighbour]
    reco: bool
    query_modality: Modality
    target: Modality
    neighbours: list[Neighbour] = field(default_factory=list)  # what refined the query (RECO)
    self_attention: float | None = None
    reco_unavailable: str | None = None
    via: str = "in-process"


@dataclass(frozen=True)
class SearchQuery:
    text: str | None = None
    image_bytes: bytes | None = None
    filters: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def predict(self, data: bytes, classes: Sequence[str], mode: RefineMode, k: int) -> PredictView: ...

    def search(self, query: SearchQuery, *, reco: bool, k: int) -> SearchView: ...


def add_sources(neighbours: list[Neighbour], repo: MetadataRepo | None) -> list[Neighbour]:
    """Fill in source, dataset and split from the metadata DB (one query)."""
    if repo is None or not neighbours:
        return neighbours
    items = {item.id: item for item in repo.get_items([n.item_id for n in neighbours])}
    for n in neighbours:
        item = items.get(n.item_id)
        if item is not None:
            n.source = n.source or item.source_uri
            n.dataset, n.split = n.dataset or item.dataset, n.split or item.split
            n.caption = n.caption or item.caption
    return neighbours


def _from_result(r: SearchResult | dict[str, Any]) -> Neighbour:
    d = r.model_dump() if isinstance(r, SearchResult) else r
    return Neighbour(item_id=d["item_id"], caption=d.get("caption") or "", score=float(d["score"]),
                     source=d.get("source"), dataset=d.get("dataset"), split=d.get("split"))


def _explained(raw: Sequence[dict[str, Any]]) -> list[Neighbour]:
    return [Neighbour(item_id=n["item_id"], caption=n.get("caption") or "", score=float(n["score"]),
                      attention=n.get("attention")) for n in raw]


class InProcessBackend:
    """The app services in this process; the memory and the refiner come from the UI's caches."""

    name = "in-process"

    def __init__(self, settings: Settings, encoder: Encoder, repo: MetadataRepo,
                 memory: Callable[[], VectorMemory], refiner: Callable[[], Refiner],
                 search_service: Callable[[], SearchService]) -> None:
        self.settings = settings
        self.encoder = encoder
        self.repo = repo
        self._memory = memory  # raises MethodError while the memory is empty
        self._refiner = refiner  # raises MethodError without a fusion checkpoint
        self._search_service = search_service

    def predict(self, data: bytes, classes: Sequence[str], mode: RefineMode, k: int) -> PredictView:
        clip = predict_image(self.settings, PredictRequest(image_bytes=data, classes=list(classes),
                                                           mode=RefineMode.CLIP, top=TOP), encoder=self.encoder)
        view = PredictView(clip=clip.predictions, reco=None, mode=mode, k=k, encoder_id=clip.encoder_id)
        try:
            reco = predict_image(
                self.settings, PredictRequest(image_bytes=data, classes=list(classes), mode=mode, top=TOP, k=k),
                encoder=self.encoder, memory=self._memory(), session_factory=self.repo.session_factory)
        except (MethodError, MemoryStoreError) as exc:  # empty memory, no checkpoint, store held elsewhere
            view.reco_unavailable = str(exc)
            return view
        return _with_reco(view, reco, self.repo)

    def search(self, query: SearchQuery, *, reco: bool, k: int) -> SearchView:
        service = self._search_service()
        request = SearchRequest(text=query.text, image_bytes=query.image_bytes, k=k, filters=query.filters)
        if not reco:
            found = service.search(request)
            return SearchView([_from_result(r) for r in found.results], False, found.query_modality, found.target)
        try:
            refiner = self._refiner()
        except MethodError as exc:
            found = service.search(request)
            return SearchView([_from_result(r) for r in found.results], False, found.query_modality, found.target,
                              reco_unavailable=str(exc))
        explanation: dict[str, Any] = {}

        def refine(vector: np.ndarray, modality: Modality) -> np.ndarray:
            result = refiner.refine_one(vector, modality)
            explanation["neighbours"] = [Neighbour(n.item_id, n.caption or "", n.score, n.attention)
                                         for n in result.neighbours]
            explanation["self_attention"] = result.self_attention
            return result.vector

        found = service.search(request, refine=refine)
        return SearchView([_from_result(r) for r in found.results], True, found.query_modality, found.target,
                          neighbours=add_sources(explanation.get("neighbours", []), self.repo),
                          self_attention=explanation.get("self_attention"))


def _with_reco(view: PredictView, reco: PredictResponse, repo: MetadataRepo | None) -> PredictView:
    view.reco, view.checkpoint, view.self_attention = reco.predictions, reco.checkpoint, reco.self_attention
    view.neighbours = add_sources([Neighbour(n.item_id, n.caption or "", n.score, n.attention)
                                   for n in reco.neighbours], repo)
    return view


class RefineClientLike(Protocol):
    def predict(self, image: bytes, classes: Sequence[str], *, mode: str | None = None,
                k: int | None = None) -> dict[str, Any]: ...

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]: ...


class WorkerBackend:
    """The refine worker (``workers.client.RefineClient``): it answers with CLIP *and* RECO in one call."""

    name = "refine worker"

    def __init__(self, client: RefineClientLike, repo: MetadataRepo | None) -> None:
        self.client = client
        self.repo = repo

    def predict(self, data: bytes, classes: Sequence[str], mode: RefineMode, k: int) -> PredictView:
        out = self.client.predict(data, list(classes), mode=str(mode), k=k)
        clip = PredictResponse.model_validate(out["clip"])
        view = PredictView(clip=clip.predictions[:TOP], reco=None, mode=mode, k=k, encoder_id=clip.encoder_id,
                           via=self.name)
        if out.get("reco") is None:
            view.reco_unavailable = out.get("reco_unavailable") or (
                "the refine worker has no fusion checkpoint for the live encoder (retraining required)"
                if out.get("retraining_required") else "the refine worker returned no RECO answer")
            return view
        reco = PredictResponse.model_validate(out["reco"])
        reco.predictions = reco.predictions[:TOP]
        return _with_reco(view, reco, self.repo)

    def search(self, query: SearchQuery, *, reco: bool, k: int) -> SearchView:
        payload: dict[str, Any] = {"filters": query.filters}
        if query.text is not None:
            payload["text"] = query.text
        else:
            payload["image_b64"] = base64.b64encode(query.image_bytes or b"").decode("ascii")
        out = self.client.search(payload, mode=str(RefineMode.BOTH if reco else RefineMode.CLIP), k=k)
        qm, target = Modality(out["query_modality"]), Modality(out["target"])
        if not reco or out.get("reco") is None:
            why = (out.get("reco_unavailable") or "the refine worker has no fusion checkpoint") if reco else None
            return SearchView([_from_result(r) for r in out["clip"]], False, qm, target, reco_unavailable=why,
                              via=self.name)
        return SearchView([_from_result(r) for r in out["reco"]], True, qm, target,
                          neighbours=add_sources(_explained(out.get("neighbours") or []), self.repo),
                          self_attention=out.get("self_attention"), via=self.name)
