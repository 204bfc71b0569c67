"""``reco serve`` (added to the CLI through the ``reco.cli`` entry point: app never imports api)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from app.cli._common import fail, load_settings


def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default RECO_API_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default RECO_API_PORT; 0 = any free port).")] = None,
) -> None:
    """Own the memory and serve it: the HTTP API that the UI, the CLI and the workers share (OpenAPI at /docs)."""
    from api.server import serve as run
    from app.memory.base import MemoryStoreError
    from app.remote import find_server

    settings = load_settings()
    running = find_server(settings)
    if running is not None and running.announced:
        fail(f"reco serve already runs for {settings.data_dir} at {running.url} (pid {running.pid})", code=1)
    logging.getLogger("api").setLevel(logging.INFO)
    bind_host = host or settings.api_host
    try:
        run(settings, host=bind_host, port=settings.api_port if port is None else port,
            on_ready=lambda url: typer.echo(f"reco serve ready at {url} (API docs: {url}/docs; Ctrl-C to stop)"))
    except MemoryStoreError as exc:
        fail(str(exc), code=1)


def register(cli: typer.Typer) -> None:
    cli.command("serve")(serve)
