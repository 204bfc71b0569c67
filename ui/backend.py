"""Who answers the pages' predictions and searches — always the one serving service of ``app``:

- :class:`ServingBackend` over :class:`app.services.serving.ServingService` in this process (embedded
  default, no server running) or over :class:`app.services.serving_client.ServingClient` (a running
  ``reco serve``: the UI is then its client, with a key of its own);
- :class:`WorkerBackend`: the refine worker (Celery, ``RECO_UI_USE_WORKERS``), which wraps the same service.

All return the service's own answers (:class:`PredictionOut`, :class:`SearchAnswer`), so a page never
branches on where the answer came from and no page computes a prediction itself.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.schemas import RefineMode
from app.services.serving import (
    NeighbourOut,
    PredictionOut,
    PredictQuery,
    SearchAnswer,
)
from app.services.serving import (
    SearchQuery as ServiceSearchQuery,
)

TOP = 5

# The pages' names for the service's answers.
Neighbour = NeighbourOut
PredictView = PredictionOut
SearchView = SearchAnswer


@dataclass(frozen=True)
class SearchQuery:
    text: str | None = None
    image_bytes: bytes | None = None
    filters: dict[str, Any] = field(default_factory=dict)
    target: str | None = None  # "image" or "text" vectors; None: the other modality (CLIP retrieval)


class Backend(Protocol):
    name: str

    def predict(self, data: bytes, classes: Sequence[str], mode: RefineMode | None, k: int) -> PredictionOut: ...

    def search(self, query: SearchQuery, *, reco: bool, k: int) -> SearchAnswer: ...


class ServiceLike(Protocol):
    def predict(self, images: list[tuple[str, bytes]], query: PredictQuery) -> list[PredictionOut]: ...

    def search(self, query: ServiceSearchQuery) -> SearchAnswer: ...


def _search_query(query: SearchQuery, reco: bool, k: int) -> ServiceSearchQuery:
    return ServiceSearchQuery(text=query.text, image_bytes=query.image_bytes, filters=query.filters, k=k,
                              mode=RefineMode.BOTH if reco else RefineMode.CLIP, target=query.target)


class ServingBackend:
    def __init__(self, service: ServiceLike, name: str) -> None:
        self.service = service
        self.name = name

    def predict(self, data: bytes, classes: Sequence[str], mode: RefineMode | None, k: int) -> PredictionOut:
        query = PredictQuery(labels=list(classes), mode=mode, k=k, top=TOP)
        return self.service.predict([("image", data)], query)[0]

    def search(self, query: SearchQuery, *, reco: bool, k: int) -> SearchAnswer:
        return self.service.search(_search_query(query, reco, k))


class RefineClientLike(Protocol):
    def predict(self, image: bytes, classes: Sequence[str], *, mode: str | None = None,
                k: int | None = None) -> dict[str, Any]: ...

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]: ...


class WorkerBackend:
    """The refine worker (``workers.client.RefineClient``): the serving service in a worker process."""

    name = "refine worker"

    def __init__(self, client: RefineClientLike) -> None:
        self.client = client

    def predict(self, data: bytes, classes: Sequence[str], mode: RefineMode | None, k: int) -> PredictionOut:
        out = self.client.predict(data, list(classes), mode=None if mode is None else str(mode), k=k)
        return PredictionOut.model_validate(out | {"via": self.name})

    def search(self, query: SearchQuery, *, reco: bool, k: int) -> SearchAnswer:
        payload = _search_query(query, reco, k).model_dump(mode="json", exclude={"image_bytes"}, exclude_none=True)
        if query.image_bytes is not None:
            payload["image_b64"] = base64.b64encode(query.image_bytes).decode("ascii")
        out = self.client.search(payload, mode=str(payload.get("mode")), k=k)
        return SearchAnswer.model_validate(out | {"via": self.name})
