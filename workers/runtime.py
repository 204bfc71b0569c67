"""What a worker process builds once and keeps: encoder, services, the task sender.

Built lazily in the process that runs the tasks (a prefork child, after the fork), never in the main
process: an embedded memory (Qdrant Edge) is opened by one process only — ``reco serve`` when it runs
(the workers then reach the memory through it), else the worker consuming ``embed`` and ``maintenance``.
A Qdrant server has no such limit.

The embed side follows the *live* embedding version: after a re-embedding swapped the alias, the next
batch loads the new encoder, so new items land in the collection searches use.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError as KombuOperationalError

from app.config import Settings
from app.services.ingest_async import is_transient
from workers.client import CeleryTaskSender

if TYPE_CHECKING:
    from celery import Celery

    from app.encoder import Encoder
    from app.encoder_identity import EncoderId
    from app.services.ingest import IngestService
    from app.services.ingest_async import EmbedBatchService

log = logging.getLogger(__name__)


def is_transient_error(exc: BaseException) -> bool:
    """App-level transient errors plus the broker's own (Redis/RabbitMQ unreachable)."""
    if isinstance(exc, KombuOperationalError):
        return True
    try:
        import redis

        if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return True
    except ImportError:  # pragma: no cover - a RabbitMQ-only install
        pass
    return is_transient(exc)


def worker_settings(settings: Settings) -> Settings:
    """fp16 on CUDA unless RECO_PRECISION says otherwise; CPU keeps fp32."""
    if "precision" in settings.model_fields_set:
        return settings
    import torch

    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    return settings.model_copy(update={"precision": "fp16"}) if cuda else settings


class WorkerRuntime:
    """Per-process state; every getter builds on first use (thread-safe)."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = worker_settings(settings)
        self.app = app
        self._lock = threading.RLock()
        self._ingest: IngestService | None = None
        self._batches: EmbedBatchService | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._refine: Any = None
        self._indexer: Any = None
        self._target_lock = threading.Lock()
        self._target: tuple[EncoderId, Encoder] | None = None  # a re-embedding's encoder

    @property
    def sender(self) -> CeleryTaskSender:
        return CeleryTaskSender(self.app)

    def _live_encoder(self) -> Encoder:
        from app.db.repo import MetadataRepo
        from app.encoder import create_encoder
        from app.encoder_identity import EncoderId
        from app.services.reembed import encoder_for, live_version

        live = live_version(MetadataRepo.from_url(self.settings.resolved_database_url))
        if live is None:
            return create_encoder(self.settings)
        return encoder_for(self.settings, EncoderId.of_version(live))

    def target_encoder(self, identity: EncoderId) -> Encoder:
        """The encoder of a re-embedding target, kept while the target stays the same: one target at a time,
        the previous one dropped before the next loads (a large model is not kept around)."""
        from app.services.reembed import encoder_for

        with self._target_lock:
            if self._target is None or self._target[0] != identity:
                self._target = None
                self._target = (identity, encoder_for(self.settings, identity))
            return self._target[1]

    def ingest_service(self) -> IngestService:
        """The ingest service for the live version, rebuilt when the live version changed."""
        from app.db.repo import MetadataRepo
        from app.services.ingest import IngestService
        from app.services.reembed import live_version

        with self._lock:
            live = live_version(MetadataRepo.from_url(self.settings.resolved_database_url))
            if self._ingest is None or (live is not None and live.encoder_id != self._ingest.encoder_id):
                if self._ingest is not None:
                    log.warning("live version is now %s: loading its encoder", live.encoder_id if live else None)
                self._ingest = IngestService(self.settings, encoder=self._live_encoder())
                self._batches = None
                if self._indexer is None:  # this process owns an embedded memory: index it when idle
                    from app.memory.indexer import BackgroundIndexer

                    self._indexer = BackgroundIndexer(self._ingest.store,
                                                      idle_s=self.settings.memory_index_idle_s).start()
            return self._ingest

    def embed_batches(self) -> EmbedBatchService:
        from app.services.ingest_async import EmbedBatchService
        from ingestion.dispatch import make_decoder

        with self._lock:
            ingest = self.ingest_service()
            if self._batches is None:
                if self._pool is None and self.settings.decode_workers > 0:
                    self._pool = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="reco-decode")
                self._batches = EmbedBatchService(ingest, make_decoder(self.settings, ingest.encoder, self._pool))
            return self._batches

    def refine(self) -> Any:
        from workers.refine import RefineRuntime

        with self._lock:
            if self._refine is None:
                self._refine = RefineRuntime(self.settings)
            return self._refine


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime(app: Celery) -> WorkerRuntime:
    """This process's runtime (built after a fork: a child never inherits its parent's)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from workers.celery_app import app_settings

            _runtime = WorkerRuntime(app_settings(app), app)
        return _runtime


def reset_runtime() -> None:
    """Called in a freshly forked pool process."""
    global _runtime
    _runtime = None
