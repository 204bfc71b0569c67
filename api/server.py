"""``reco serve``: open the memory (this process becomes its owner), load the encoder and the fusion
checkpoint, make keys for local clients, announce itself in the data dir, serve until stopped."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from app.config import Settings

log = logging.getLogger(__name__)

LOCAL_KEY_PREFIX = "local-"


def make_local_keys(service: Any) -> dict[str, str]:
    """Fresh keys for this machine's clients (the CLI and workers, the UI); the previous ones are revoked."""
    from app.db.apikeys import ApiKeyRepo
    from app.remote import LOCAL_CLIENTS

    keys = ApiKeyRepo(service.repo.session_factory)
    out = {}
    for client, scopes in LOCAL_CLIENTS.items():
        keys.revoke(f"{LOCAL_KEY_PREFIX}{client}")
        out[client], _ = keys.create(f"{LOCAL_KEY_PREFIX}{client}", scopes)
    return out


def build(settings: Settings) -> tuple[Any, Any]:
    """(FastAPI app, serving service), this process the memory's owner."""
    from api.app import create_app
    from app.db.session import upgrade_database
    from app.memory.store import open_store
    from app.remote import mark_serving_process
    from app.services.serving import ServingService
    from ingestion import uploads
    from ingestion.pipeline import ingest_source

    mark_serving_process()
    settings.ensure_dirs()
    upgrade_database(settings.resolved_database_url)
    service = ServingService(settings, store=open_store(settings), ingest_runner=ingest_source)
    return create_app(settings, service, uploads=uploads), service


def serve(settings: Settings, *, host: str, port: int, on_ready: Any = None) -> None:
    import uvicorn

    from app.memory.indexer import BackgroundIndexer
    from app.memory.store import close_stores
    from app.remote import announce, withdraw

    started = time.perf_counter()
    app, service = build(settings)
    service.warm_up()
    indexer = BackgroundIndexer(service.store, idle_s=settings.memory_index_idle_s,
                                last_activity=lambda: service.last_request).start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=10)
    from app.errors import install_log_redaction

    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn's handlers exist once configured
        install_log_redaction(logging.getLogger(name) if name else None)
    server = uvicorn.Server(config)

    def announce_when_listening() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()
        url = f"http://{_url_host(host)}:{bound[1]}"
        announce(settings, url, make_local_keys(service))
        log.warning("reco serve: %s (memory %s, encoder %s) ready in %.1f s", url, service.store.location,
                    service.live().encoder.encoder_id, time.perf_counter() - started)
        if on_ready is not None:
            on_ready(url)

    threading.Thread(target=announce_when_listening, name="reco-announce", daemon=True).start()
    parent = int(os.environ.get("RECO_SERVE_EXIT_WITH_PID", "0") or 0)
    if parent:  # started by `reco demo` (or a test): never outlive it, however it ended
        threading.Thread(target=_exit_with, args=(parent, server), name="reco-parent-watch", daemon=True).start()
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, with the handlers it found installed: these
    # no-ops let the cleanup below run (withdraw the announcement, close the engine) instead of dying first.
    previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        withdraw(settings)
        indexer.stop()
        service.close()
        close_stores()


def _exit_with(pid: int, server: Any) -> None:
    while not server.should_exit:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("reco serve: the process that started it (%d) is gone; shutting down", pid)
            server.should_exit = True
            return
        time.sleep(1.0)


def _noted(signum: int, frame: object) -> None:
    log.info("reco serve: signal %d, shutting down", signum)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - reachable on every interface: announce the loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
