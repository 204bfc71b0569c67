"""The refine-worker backend hands the pages the serving service's own answers (the worker wraps it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.schemas import Modality, RefineMode
from ui.backend import SearchQuery, WorkerBackend


def _scores(names: list[str]) -> list[dict[str, Any]]:
    return [{"label": i, "name": n, "score": 1.0 / (i + 1)} for i, n in enumerate(names)]


class FakeClient:
    """Answers as the refine worker does: ``PredictionOut`` / ``SearchAnswer`` dumped to JSON."""

    def __init__(self, reco: bool) -> None:
        self.reco = reco
        self.calls: list[tuple[str, Any, Any]] = []

    def predict(self, image: bytes, classes: Sequence[str], *, mode: str | None = None,
                k: int | None = None) -> dict[str, Any]:
        self.calls.append(("predict", mode, k))
        names = list(classes)
        # no mode: the worker's service answers with the checkpoint's choice (text here)
        return {"name": "image", "mode": mode or "text", "k": k, "encoder_id": "enc", "clip": _scores(names),
                "reco": _scores(names[::-1]) if self.reco else None,
                "checkpoint": "1:f.safetensors" if self.reco else None,
                "neighbours": [{"item_id": "a", "score": 0.9, "attention": 0.3, "caption": "cap a"}] if self.reco
                else [], "self_attention": 0.4 if self.reco else None,
                "reco_unavailable": None if self.reco else "no fusion checkpoint registered for encoder enc",
                "latency_ms": 12.0}

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]:
        self.calls.append(("search", mode, query))
        hit = {"item_id": "b", "caption": "cap b", "score": 0.5, "source": "/x.jpg", "dataset": "d", "split": "s"}
        refined = self.reco and mode != "clip"
        return {"query_modality": "image" if "image_b64" in query else "text", "target": "text",
                "encoder_id": "enc", "results": [hit], "reco": refined,
                "neighbours": [{"item_id": "a", "score": 0.9, "attention": 0.3, "caption": "cap a"}] if refined
                else [], "latency_ms": 3.0}


def test_predict_through_the_worker() -> None:
    client = FakeClient(reco=True)
    view = WorkerBackend(client).predict(b"img", ["x", "y"], RefineMode.BOTH, 7)
    assert [s.name for s in view.clip] == ["x", "y"] and [s.name for s in view.reco or []] == ["y", "x"]
    assert view.neighbours[0].attention == 0.3 and view.self_attention == 0.4 and view.via == "refine worker"
    assert client.calls == [("predict", "both", 7)]


def test_predict_without_a_checkpoint_says_why() -> None:
    view = WorkerBackend(FakeClient(reco=False)).predict(b"img", ["x"], RefineMode.BOTH, 7)
    assert view.reco is None and "no fusion checkpoint" in (view.reco_unavailable or "")


def test_search_through_the_worker() -> None:
    client = FakeClient(reco=True)
    backend = WorkerBackend(client)
    clip = backend.search(SearchQuery(text="a dog", filters={"dataset": "d"}), reco=False, k=3)
    assert not clip.reco and clip.results[0].source == "/x.jpg" and clip.query_modality == Modality.TEXT
    reco = backend.search(SearchQuery(image_bytes=b"img"), reco=True, k=3)
    assert reco.reco and reco.neighbours[0].attention == 0.3 and reco.query_modality == Modality.IMAGE
    sent = client.calls[0][2]
    assert client.calls[0][1] == "clip" and sent["text"] == "a dog" and sent["filters"] == {"dataset": "d"}
    assert client.calls[1][2]["image_b64"] == "aW1n" and client.calls[1][1] == "both"


def test_no_mode_is_left_to_the_checkpoint() -> None:
    """The page's "checkpoint's choice" sends no mode (never the string "None"); the answer names the one used."""
    client = FakeClient(reco=True)
    assert WorkerBackend(client).predict(b"img", ["x"], None, 7).mode is RefineMode.TEXT
    assert client.calls == [("predict", None, 7)]

    from types import SimpleNamespace

    from app.services.serving import PredictQuery
    from app.services.serving_client import ServingClient

    sent: list[dict[str, Any]] = []

    class FakeHttp:
        server = SimpleNamespace(url="http://reco")

        def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
            sent.append(kwargs.get("data") or kwargs.get("json") or {})
            if path == "/v1/classes/prepare":
                return {"classes": 1, "refined": True, "seconds": 0.1, "cached": False}
            return {"predictions": [{"name": "image", "clip": _scores(["x"]), "mode": "text", "k": 7,
                                     "encoder_id": "enc"}]}

    served = ServingClient(FakeHttp())  # type: ignore[arg-type]
    answer = served.predict([("image", b"img")], PredictQuery(labels=["x"], k=7))[0]
    assert "mode" not in sent[0] and answer.mode is RefineMode.TEXT
    served.predict([("image", b"img")], PredictQuery(labels=["x"], mode=RefineMode.IMAGE))
    assert sent[1]["mode"] == "image"
    served.prepare_classes(PredictQuery(labels=["x"]))
    assert "mode" not in sent[2]
