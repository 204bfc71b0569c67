"""The live state behind the serving service: the embedding version the alias points at, its encoder, the
live memory and the newest fusion checkpoint registered for that encoder (picked up without a restart);
and what every part of the service shares (class names of the memory's datasets, metadata of neighbours).

:class:`ServingBase` holds it; :class:`app.services.serving.ServingService` adds search, predict, items and
ingest jobs on top (``serving_predict``, ``serving_items``, ``serving_jobs``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.db.models import EmbeddingVersion
from app.db.repo import MetadataRepo
from app.encoder import Encoder, create_encoder
from app.imaging import ImageLimits
from app.manifest import load_classes
from app.memory.base import MemoryStore, VectorMemory
from app.memory.store import live_memory, open_store
from app.refine import Refiner, refiner_from_checkpoint
from app.services.method_common import MethodError, checkpoint_label, resolve_checkpoint, resolve_device
from app.services.predict import PredictCaches
from app.services.serving_models import NeighbourOut
from app.zeroshot import ClassEmbeddingCache

log = logging.getLogger("app.services.serving")  # the service logs under one name, whichever part

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "sample"


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


class ServingBase:
    """What every part of the serving service shares: settings, metadata, memory, the live state and the
    caches. Constructor arguments: explicit, or built from the settings. Thread-safe."""

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

