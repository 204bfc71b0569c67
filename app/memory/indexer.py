"""Index new points in the background of a long-lived owner of the embedded memory.

Qdrant Edge searches new points exactly until the owner builds their HNSW index, and building holds the
process (see :mod:`app.memory.edge`). So a long-lived owner (``reco serve``, a worker that owns the store)
builds it when enough points wait (``RECO_MEMORY_INDEXING_THRESHOLD``) and nothing happened for a moment
(``RECO_MEMORY_INDEX_IDLE_S`` since the last write and the last request): requests then meet a short
pause at a quiet time instead of slow exact scans forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.memory.base import MemoryStore

log = logging.getLogger(__name__)


class BackgroundIndexer:
    def __init__(self, store: MemoryStore, *, idle_s: float, interval_s: float = 1.0,
                 last_activity: Callable[[], float] | None = None) -> None:
        self.store = store
        self.idle_s = idle_s
        self.interval_s = interval_s
        self.last_activity = last_activity or (lambda: 0.0)
        self.indexed = 0
        self.runs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundIndexer:
        if getattr(self.store, "backend", "") == "edge" and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reco-indexer", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def quiet_for(self) -> float:
        last = max(getattr(self.store, "last_write", 0.0), self.last_activity())
        return time.monotonic() - last

    def step(self) -> int:
        """One check: index when enough points wait and the owner has been idle long enough."""
        if self.quiet_for() < self.idle_s:
            return 0
        done = self.store.index_pending()
        if done:
            self.indexed += done
            self.runs += 1
        return done

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - never let indexing kill the owner; the next check retries
                log.exception("background indexing failed")
