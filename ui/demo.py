"""``reco demo``: the offline first run — start ``reco serve`` (the one process that owns the memory),
ingest the bundled sample through it, load the default fusion checkpoint (never trained here), show CLIP vs RECO on the
sample's held-out images, then start the UI as the server's client.

While the demo runs, every other ``reco`` command (``reco ingest``, ``reco status``, ``reco search``) finds
the server in the data dir and goes through it. Lives in ``ui/`` because it ends in the UI and uses the
ingestion and API layers; it only calls services.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli._common import fail, load_settings, print_json
from app.config import Settings

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample" / "clothing10"


def _checkpoint(settings: Settings, encoder_id: str) -> tuple[Path | None, str]:
    """Explicit setting → a registered checkpoint trained on enough pairs → the committed default for the encoder.

    The demo never trains a fusion on its own memory: the memory is swapped in under a fusion trained on the
    generic memory (Flickr8k train), as the paper intends. None: the encoder has no default (CLIP only).
    """
    from app.services.method_common import MethodError, resolve_checkpoint, session_factory_for

    try:
        path, record = resolve_checkpoint(settings, encoder_id, None, session_factory_for(settings))
    except MethodError:
        return None, "none for this encoder: CLIP only"
    if settings.fusion_checkpoint:
        return path, "configured"
    from app.fusion.checkpoint import committed_checkpoint_for

    committed = committed_checkpoint_for(encoder_id)
    is_committed = committed is not None and path.resolve() == committed.resolve()
    return path, "committed default" if is_committed else "registered"


def run_demo(settings: Settings, *, sample: Path = SAMPLE_DIR, progress: bool = True) -> dict[str, Any]:
    """The demo's steps in this process; the memory is reached through the running server when there is one."""
    from app.encoder import create_encoder
    from app.services.evaluate import EvalRequest, run_evaluation
    from app.services.ingest import prepare_storage
    from ingestion.pipeline import ingest_source

    started = time.perf_counter()
    prepare_storage(settings)
    encoder = create_encoder(settings)
    manifest = sample / "manifest.csv"
    ingest = ingest_source(manifest, settings, split="train", progress=progress)
    checkpoint, origin = _checkpoint(settings, encoder.encoder_id)
    modes = None if checkpoint is not None else ["clip"]
    request = EvalRequest(dataset=str(manifest), split="val", checkpoint=checkpoint, progress=progress,
                          **({"modes": modes} if modes else {}))
    report = run_evaluation(settings, request, encoder=encoder)
    return {
        "encoder": encoder.describe() if hasattr(encoder, "describe") else {"encoder_id": encoder.encoder_id},
        "ingest": {k: ingest[k] for k in ("job_id", "seen", "ingested", "duplicates", "failed")},
        "checkpoint": {"path": str(checkpoint) if checkpoint else None, "origin": origin},
        "evaluation": report.to_json_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _print_table(result: dict[str, Any]) -> None:
    enc = result["encoder"]
    if enc.get("random_weights"):
        typer.secho("RANDOM WEIGHTS: the encoder is untrained; these numbers only show the mechanics.",
                    fg="yellow", bold=True)
    ev = result["evaluation"]
    typer.echo(f"\nencoder {enc['encoder_id']} · fusion {result['checkpoint']['path']} "
               f"({result['checkpoint']['origin']}) · memory {ev['memory_size']} pairs · k'={ev['k']} · "
               f"near-duplicates removed {ev['near_duplicates_removed']}")
    rows = [r for r in ev["results"] if r["metric"] in {"top1", "top5"}]
    typer.echo(f"\nzero-shot on the sample's held-out images ({rows[0]['dataset'] if rows else '-'})")
    typer.echo(f"{'mode':<12}{'top-1':>8}{'top-5':>8}")
    for mode in ("clip", "image", "text", "both"):
        vals = {r["metric"]: r["value"] for r in rows if r["mode"] == mode}
        if vals:
            label = "CLIP" if mode == "clip" else f"RECO {mode}"
            typer.echo(f"{label:<12}{vals.get('top1', 0) * 100:>7.1f}%{vals.get('top5', 0) * 100:>7.1f}%")
    typer.echo(f"\ndone in {result['seconds']} s")


def demo(
    no_ui: Annotated[bool, typer.Option("--no-ui", help="Do not start the web UI at the end.")] = False,
    port: Annotated[int | None, typer.Option(help="UI port (default RECO_UI_PORT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Offline demo on embedded defaults: reco serve, the bundled sample ingested through it, the fusion, CLIP vs
    RECO, then the UI as the server's client."""
    from api.process import start_server, stop_server
    from app.memory.store import close_stores
    from app.remote import find_server
    from app.services.ingest import prepare_storage

    settings = load_settings()
    server = None
    running = find_server(settings)
    try:
        if running is None:
            prepare_storage(settings)
            close_stores()  # the server owns the memory: this process goes through it from here on
            log_path = Path(settings.data_dir) / "logs" / "serve.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if not as_json:
                typer.echo(f"starting reco serve (the memory's owner; log {log_path}) …")
            with log_path.open("ab") as log:
                server, url = start_server(settings, log=log)
        else:
            url = running.url
        if not as_json:
            typer.echo(f"reco serve at {url} (API docs {url}/docs) — other `reco` commands go through it")
        result = run_demo(settings, progress=not as_json) | {"server": url}
    except Exception as exc:  # noqa: BLE001 - the demo explains what went wrong instead of a traceback
        if server is not None:
            stop_server(server)
        fail(f"demo failed: {type(exc).__name__}: {exc}")
    if as_json:
        print_json(result)
    else:
        _print_table(result)
    try:
        if not no_ui:
            from ui.cli import launch_ui

            typer.echo(f"\nstarting the UI (a client of reco serve at {url}; Ctrl-C to stop) …", err=as_json)
            launch_ui(settings, port or settings.ui_port, block=True)
    finally:
        close_stores()
        if server is not None:
            stop_server(server)


def register(cli: typer.Typer) -> None:
    cli.command("demo")(demo)
