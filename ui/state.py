"""What the pages share across reruns, built once per process with ``st.cache_resource``: the serving
service (a client of the running ``reco serve``, or the service in this process: encoder, memory and fusion
loaded once), the metadata DB, the Celery app and the ingestion runner. Every cache is keyed by the settings
it was built from, so a changed setting builds a new object instead of reusing a stale one. Settings themselves
are read on every run (cheap) so that ``RECO_*`` is the single source of truth.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from app.config import Settings, get_settings
from app.db.factory import SessionFactory, migrated_session_factory
from app.db.repo import MetadataRepo
from app.encoder import Encoder, create_encoder
from ui.backend import Backend, ServingBackend, WorkerBackend

if TYPE_CHECKING:
    from celery import Celery

ITEM_KEY = "memory_item"  # session key: the item the Memory page shows
SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample"


def load_settings() -> Settings:
    return get_settings()


def fingerprint(settings: Settings) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


# --- encoder and metadata -----------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the encoder …", max_entries=4)
def _encoder(key: str, _settings: Settings) -> Encoder:
    encoder = create_encoder(_settings)
    encoder.encode_texts(["warm-up"])  # weights now, under the spinner, not in the first prediction
    return encoder


def encoder(settings: Settings) -> Encoder:
    key = "|".join(str(v) for v in (settings.clip_model, settings.clip_pretrained, settings.random_init_seed,
                                    settings.device, settings.precision, settings.encode_batch_size))
    return _encoder(key, settings)


@st.cache_resource(show_spinner="Opening the metadata database …", max_entries=4)
def session_factory(url: str) -> SessionFactory:
    return migrated_session_factory(url)  # idempotent: a fresh data dir works without `reco db upgrade`


def repo(settings: Settings) -> MetadataRepo:
    return MetadataRepo(session_factory(settings.resolved_database_url))


@st.cache_data(ttl=30, show_spinner=False)
def distinct_values(url: str, column: str) -> list[Any]:
    return MetadataRepo(session_factory(url)).distinct_values(column)


# --- the serving service ------------------------------------------------------------------------------
def server_client(settings: Settings) -> Any:
    """A client of the running ``reco serve`` (the UI's own key), or None when no server runs."""
    from app.remote import find_server

    server = find_server(settings, "ui")
    if server is None:
        return None
    return _server_client(server.url, server.key or "", settings)


@st.cache_resource(show_spinner=False, max_entries=4)
def _server_client(url: str, key: str, _settings: Settings) -> Any:
    from app.remote import ServerInfo
    from app.services.serving_client import ServingClient

    return ServingClient.connect(_settings, ServerInfo(url, key or None, announced=True), "ui")


@st.cache_resource(show_spinner="Loading the encoder and the memory …", max_entries=2)
def _in_process_service(key: str, _settings: Settings) -> Any:
    from app.services.serving import ServingService
    from ingestion.pipeline import ingest_source

    service = ServingService(_settings, encoder=encoder(_settings), repo=repo(_settings), ingest_runner=ingest_source)
    return service


def service(settings: Settings) -> Any:
    """The one serving service: through ``reco serve`` when it runs, else in this process."""
    client = server_client(settings)
    if client is not None:
        return client
    return _in_process_service(fingerprint(settings), settings)


# --- backends ----------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def _celery_app(broker: str, result_backend: str | None, _settings: Settings) -> Celery:
    from workers.celery_app import create_celery_app

    return create_celery_app(_settings)


def celery_app(settings: Settings) -> Celery:
    return _celery_app(settings.broker_url, settings.result_backend, settings)


def backend(settings: Settings) -> Backend:
    """The refine worker when ``RECO_UI_USE_WORKERS`` is set, else the serving service (server or in-process)."""
    if settings.ui_use_workers:
        from workers.client import RefineClient

        return WorkerBackend(RefineClient(celery_app(settings), settings.refine_timeout_s))
    client = server_client(settings)
    if client is not None:
        return ServingBackend(client, f"reco serve ({client.url})")
    return ServingBackend(_in_process_service(fingerprint(settings), settings), "in-process")


# --- class sets for zero-shot ---------------------------------------------------------------------------
@st.cache_data(ttl=300, show_spinner=False)
def class_sets(roots: tuple[str, ...]) -> dict[str, str]:
    """Dataset name → its ``classes.txt``, from the shared data, the data dir's datasets and the sample."""
    found: dict[str, str] = {}
    for root in roots:
        folder = Path(root)
        if folder.is_dir():
            for path in sorted(folder.glob("*/classes.txt")):
                found.setdefault(path.parent.name, str(path))
    return found


def class_set_roots(settings: Settings) -> tuple[str, ...]:
    return (str(settings.shared_data), str(settings.data_dir / "datasets"), str(SAMPLE_ROOT))


# --- background ingestion ---------------------------------------------------------------------------------
@dataclass
class IngestRun:
    label: str
    source: Path
    after_job: int  # the newest job id before this run started: its job is the first one above
    total: int | None = None
    started: float = field(default_factory=time.time)
    job_id: int | None = None  # set by the work once the serving service answered with the job
    cancel: Callable[[int], Any] | None = None  # the serving service's cancel_job (None: not cancellable)
    future: Future[dict[str, Any]] | None = None

    def done(self) -> bool:
        return self.future is not None and self.future.done()


class IngestRunner:
    """One ingestion at a time in a background thread: navigating away does not stop it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reco-ui-ingest")
        self._lock = threading.Lock()
        self.runs: list[IngestRun] = []

    def submit(self, label: str, source: Path, after_job: int, work: Callable[[IngestRun], dict[str, Any]],
               total: int | None = None, cancel: Callable[[int], Any] | None = None) -> IngestRun:
        run = IngestRun(label, source, after_job, total, cancel=cancel)
        run.future = self._pool.submit(work, run)
        with self._lock:
            self.runs = [*self.runs[-19:], run]
        return run

    def active(self) -> list[IngestRun]:
        with self._lock:
            return [r for r in self.runs if not r.done()]


@st.cache_resource(show_spinner=False)
def ingest_runner() -> IngestRunner:
    return IngestRunner()
