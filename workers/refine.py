"""The refine worker: the app's serving service (:class:`app.services.serving.ServingService`) in a worker
process, answering ``predict`` and ``search`` from the Celery queue ``refine``. No method logic here.

The service follows the live version (encoder, newest fusion checkpoint, memory); neighbours come from the
memory's engine — a Qdrant server directly, or the embedded engine through ``reco serve``, which owns it.
Latencies are kept per request and logged as p50/p99.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from app.config import Settings
from app.schemas import RefineMode

log = logging.getLogger(__name__)

LOG_EVERY = 50  # requests between two latency log lines


def percentile_ms(samples: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(samples) * 1000.0, q)) if samples else None


class RefineRuntime:
    def __init__(self, settings: Settings) -> None:
        from app.services.serving import ServingService

        self.settings = settings
        self.service = ServingService(settings)
        self._lock = threading.Lock()
        self._latency: dict[str, deque[float]] = {"predict": deque(maxlen=2000), "search": deque(maxlen=2000)}
        self._served = 0

    def current(self) -> Any:
        """Load what is live now (the warm-up calls this)."""
        live = self.service.live(max_age_s=0)
        if live.version is None:
            raise LookupError("the memory is empty: ingest something first (no live embedding version)")
        live.encoder.encode_texts(["warm-up"])
        return live

    def describe(self) -> dict[str, Any]:
        live = self.service.live()
        return {"encoder_id": live.encoder.encoder_id, "memory": live.version.collection if live.version else None,
                "checkpoint_id": live.checkpoint_id, "retraining_required": live.refiner is None,
                "reco_unavailable": live.refiner_error}

    # --- requests ---------------------------------------------------------------------------------
    def predict(self, image_b64: str, classes: list[str], *, mode: str | None = None,
                k: int | None = None, top: int = 5) -> dict[str, Any]:
        from app.services.serving import PredictQuery

        started = time.perf_counter()
        # no mode: the serving service uses the checkpoint's validated one
        query = PredictQuery(labels=classes, mode=RefineMode(mode) if mode else None, k=k, top=top)
        answer = self.service.predict([("image", base64.b64decode(image_b64))], query)[0]
        return answer.model_dump(mode="json") | {"latency_ms": self._observe("predict", started)}

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]:
        from app.services.serving import SearchQuery

        started = time.perf_counter()
        fields = {key: v for key, v in query.items() if key != "image_b64"}
        if query.get("image_b64"):
            fields["image_bytes"] = base64.b64decode(query["image_b64"])
        fields.setdefault("k", k or self.settings.k_infer)
        if mode is not None:
            fields["mode"] = mode
        answer = self.service.search(SearchQuery.model_validate(fields))
        return answer.model_dump(mode="json") | {"latency_ms": self._observe("search", started)}

    # --- latency --------------------------------------------------------------------------------
    def _observe(self, kind: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        with self._lock:
            self._latency[kind].append(elapsed)
            self._served += 1
            served = self._served
        if served % LOG_EVERY == 0:
            stats = self.stats()
            log.info("refine latency over the last requests: %s", {
                name: {"p50_ms": round(v["p50_ms"] or 0, 2), "p99_ms": round(v["p99_ms"] or 0, 2), "n": v["n"]}
                for name, v in stats["latency"].items()})
        return round(elapsed * 1000.0, 3)

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Latency percentiles since start (or the last reset: e.g. to leave the cold start out)."""
        with self._lock:
            latency = {kind: {"n": len(v), "p50_ms": percentile_ms(list(v), 50), "p99_ms": percentile_ms(list(v), 99)}
                       for kind, v in self._latency.items()}
            if reset:
                for samples in self._latency.values():
                    samples.clear()
        try:
            described = self.describe()
        except Exception:  # noqa: BLE001 - stats must answer even while nothing is live
            described = {}
        return {"served": self._served, "latency": latency} | described
