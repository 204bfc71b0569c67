"""``reco ingest``, ``reco worker`` and ``reco beat`` (registered through the ``reco.cli`` entry point)."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli._common import fail, load_settings

POOLS = ("prefork", "solo", "threads")


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated: embed, refine, maintenance.")] = "embed,maintenance",
    concurrency: Annotated[int, typer.Option(min=1, help="Pool processes (threads for --pool threads).")] = 1,
    pool: Annotated[str, typer.Option(help=f"Celery pool: {', '.join(POOLS)}.")] = "prefork",
    loglevel: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    hostname: Annotated[str | None, typer.Option(help="Worker node name (default: celery@host).")] = None,
) -> None:
    """Start a Celery worker on the given queues (runs until stopped; SIGTERM = warm shutdown)."""
    from workers.celery_app import QUEUES, app, prefetch_multiplier

    settings = load_settings()
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if not chosen or unknown:
        fail(f"unknown queue(s) {unknown or chosen}; choose from {', '.join(QUEUES)}")
    if pool not in POOLS:
        fail(f"unknown pool {pool!r}; choose from {', '.join(POOLS)}")
    owns_store = {"embed", "maintenance"} & set(chosen)
    from app.remote import find_server

    if owns_store and not settings.qdrant_url and concurrency > 1 and find_server(settings) is None:
        fail("the embedded memory has one owner: without `reco serve` running, an embed/maintenance worker opens "
             "it itself and needs --concurrency 1; start `reco serve` (the workers then go through it) or use a "
             "Qdrant server (RECO_QDRANT_URL)")
    settings.ensure_dirs()
    argv = ["worker", "-Q", ",".join(chosen), "-c", str(concurrency), "-P", pool, "-l", loglevel,
            f"--prefetch-multiplier={prefetch_multiplier(settings, chosen)}", "--without-gossip", "--without-mingle"]
    app.worker_main(argv + (["-n", hostname] if hostname else []))


def beat(loglevel: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info") -> None:
    """Start the scheduler: lost-row resends, reconciliation, watch folders, re-embedding."""
    from workers.celery_app import app

    settings = load_settings()
    settings.ensure_dirs()
    app.start(["beat", "-l", loglevel, "-s", str(settings.data_dir / "celerybeat-schedule")])


def register(cli: typer.Typer) -> None:
    from workers import ingest_cli

    ingest_cli.register(cli)
    cli.command("worker")(worker)
    cli.command("beat")(beat)
