"""One factory for the memory: the store the settings name, opened once per process.

- ``RECO_QDRANT_URL`` set: a Qdrant server or cluster (:class:`QdrantServerStore`); any process may open it.
- a ``reco serve`` announced in the data dir (or ``RECO_API_URL``): the memory it owns, over HTTP
  (:class:`app.memory.remote.RemoteStore`) — the same operations, the server's engine.
- otherwise: the embedded engine, Qdrant Edge, in ``RECO_MEMORY_PATH`` (default ``<data dir>/memory``),
  opened by this process, which then owns it; see :mod:`app.memory.edge`.

A store left by the retired embedded backend (qdrant-client's local mode, ``<data dir>/qdrant``) is never
silently ignored: opening the memory refuses with an error naming ``reco memory migrate``.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from app.memory.base import MemoryStore, MemoryStoreError, VectorMemory
from app.memory.layout import MemoryLayout

if TYPE_CHECKING:
    from app.config import Settings

_stores: dict[tuple[str, str | None], MemoryStore] = {}
_stores_lock = threading.Lock()
_client_name = "cli"  # whose key this process uses with a server (the UI has one of its own)


def set_client_name(name: str) -> None:
    global _client_name
    _client_name = name


def is_local_mode_store(path: Path) -> bool:
    """qdrant-client's local mode keeps ``meta.json`` and ``collection/<name>/storage.sqlite`` in its folder."""
    return (path / "meta.json").is_file() and (path / "collection").is_dir()


def check_no_legacy_store(settings: Settings) -> None:
    legacy = settings.legacy_local_store
    if settings.qdrant_path is not None:
        raise MemoryStoreError(
            f"RECO_QDRANT_PATH ({legacy}) names a qdrant-client local-mode store, which is retired: convert it "
            "with `reco memory migrate` (into RECO_MEMORY_PATH), then unset RECO_QDRANT_PATH.")
    if not settings.qdrant_url and is_local_mode_store(legacy):
        raise MemoryStoreError(
            f"{legacy} holds a memory in qdrant-client's local mode, which is retired: convert it to the embedded "
            f"engine (Qdrant Edge, {settings.resolved_memory_path}) with `reco memory migrate` — the old folder is "
            "kept, renamed — or move it away to start empty.")


def _open(settings: Settings) -> MemoryStore:
    layout = MemoryLayout.from_settings(settings)
    if settings.qdrant_url:
        from app.memory.qdrant import QdrantServerStore

        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return QdrantServerStore.connect(settings.qdrant_url, api_key, layout)
    from app.remote import find_server

    server = find_server(settings, _client_name)
    if server is not None:
        from app.memory.remote import RemoteStore
        from app.remote import HttpClient

        return RemoteStore(HttpClient.for_settings(settings, server, _client_name))
    check_no_legacy_store(settings)
    from app.memory.edge import EdgeStore, temporary_store

    path = settings.resolved_memory_path
    assert path is not None
    if path == ":memory:":
        return temporary_store(layout)
    return EdgeStore(Path(path), layout)


def open_store(settings: Settings) -> MemoryStore:
    """The store of these settings, opened once per process (an embedded one may be opened only once)."""
    key = (settings.qdrant_url or "", settings.resolved_memory_path)
    if key[1] == ":memory:":  # a throwaway store per settings object, not one shared by everything
        key = (f"tmp:{id(settings)}", key[1])
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            if not _stores:
                atexit.register(close_stores)  # close before interpreter teardown, not in __del__
            store = _open(settings)
            _stores[key] = store
        return store


def close_stores() -> None:
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def encoder_memory(settings: Settings, encoder_id: str, dim: int, *, store: MemoryStore | None = None) -> VectorMemory:
    """The collection of one embedding version, created on first use."""
    from app.encoder.openclip import collection_name_for

    return (store or open_store(settings)).ensure_collection(collection_name_for(encoder_id), dim)


def live_memory(settings: Settings, *, store: MemoryStore | None = None) -> VectorMemory:
    """The alias searches use: it follows the live version across a re-embedding swap."""
    return (store or open_store(settings)).collection(settings.memory_alias)
