"""The refine-worker backend turns the worker's answers into the same views as the in-process one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.schemas import Modality, RefineMode
from ui.backend import SearchQuery, WorkerBackend


def _prediction(mode: str, names: list[str]) -> dict[str, Any]:
    return {"mode": mode, "encoder_id": "enc", "checkpoint": "1:f.safetensors" if mode != "clip" else None,
            "predictions": [{"label": i, "name": n, "score": 1.0 / (i + 1)} for i, n in enumerate(names)],
            "neighbours": [{"item_id": "a", "score": 0.9, "attention": 0.3, "caption": "cap a"}]
            if mode != "clip" else [], "self_attention": 0.4 if mode != "clip" else None}


class FakeClient:
    def __init__(self, reco: bool) -> None:
        self.reco = reco
        self.calls: list[tuple[str, Any, Any]] = []

    def predict(self, image: bytes, classes: Sequence[str], *, mode: str | None = None,
                k: int | None = None) -> dict[str, Any]:
        self.calls.append(("predict", mode, k))
        names = list(classes)
        return {"encoder_id": "enc", "retraining_required": not self.reco, "reco_unavailable": None,
                "clip": _prediction("clip", names), "reco": _prediction(mode or "both", names[::-1]) if self.reco
                else None}

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]:
        self.calls.append(("search", mode, query))
        hit = {"item_id": "b", "caption": "cap b", "score": 0.5, "source": "/x.jpg", "dataset": "d", "split": "s"}
        return {"query_modality": "image" if "image_b64" in query else "text", "target": "text",
                "clip": [hit], "reco": [hit] if self.reco and mode != "clip" else None,
                "neighbours": [{"item_id": "a", "score": 0.9, "attention": 0.3, "caption": "cap a"}]}


def test_predict_through_the_worker() -> None:
    client = FakeClient(reco=True)
    view = WorkerBackend(client, repo=None).predict(b"img", ["x", "y"], RefineMode.BOTH, 7)
    assert [s.name for s in view.clip] == ["x", "y"] and [s.name for s in view.reco or []] == ["y", "x"]
    assert view.neighbours[0].attention == 0.3 and view.self_attention == 0.4 and view.via == "refine worker"
    assert client.calls == [("predict", "both", 7)]


def test_predict_without_a_checkpoint_says_why() -> None:
    view = WorkerBackend(FakeClient(reco=False), repo=None).predict(b"img", ["x"], RefineMode.BOTH, 7)
    assert view.reco is None and "retraining required" in (view.reco_unavailable or "")


def test_search_through_the_worker() -> None:
    client = FakeClient(reco=True)
    backend = WorkerBackend(client, repo=None)
    clip = backend.search(SearchQuery(text="a dog", filters={"dataset": "d"}), reco=False, k=3)
    assert not clip.reco and clip.results[0].source == "/x.jpg" and clip.query_modality == Modality.TEXT
    reco = backend.search(SearchQuery(image_bytes=b"img"), reco=True, k=3)
    assert reco.reco and reco.neighbours[0].attention == 0.3 and reco.query_modality == Modality.IMAGE
    assert client.calls[0] == ("search", "clip", {"filters": {"dataset": "d"}, "text": "a dog"})
    assert client.calls[1][2]["image_b64"] == "aW1n"
