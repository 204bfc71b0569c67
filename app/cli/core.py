"""Core commands: ``search``, ``status``, ``db upgrade|downgrade``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import fail, load_settings, print_json, serving

db_cli = typer.Typer(help="Metadata database (Alembic migrations).", no_args_is_help=True)


def _parse_filters(pairs: list[str]) -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--filter takes key=value, got {pair!r}")
        out[key.strip()] = int(value) if key.strip() == "label" and value.lstrip("-").isdigit() else value
    return out


def search(
    text: Annotated[str | None, typer.Option("--text", help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image file query.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Number of results.")] = 5,
    filters: Annotated[
        list[str] | None, typer.Option("--filter", help="key=value on dataset/split/source/label")
    ] = None,
    target: Annotated[str | None, typer.Option(
        help="Rank stored 'image' vectors (default: a text finds images, an image finds similar images) or "
             "'text' vectors (captions).")] = None,
    mode: Annotated[str, typer.Option(help="clip, or a RECO mode refining the query: text | image | both.")] = "clip",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Search the live memory (plain CLIP embeddings, or the query refined by RECO with --mode)."""
    from pydantic import ValidationError

    from app.imaging import ImageRejected, read_image_file
    from app.manifest import printable
    from app.remote import ServerError
    from app.services.serving import SearchQuery

    settings = load_settings()
    try:
        image_bytes = read_image_file(image, settings.max_image_bytes) if image else None  # capped, regular only
        request = SearchQuery(text=text, image_bytes=image_bytes, k=k, filters=_parse_filters(filters or []),
                              target=target, mode=mode)
        response = serving(settings).search(request)
    except (ValidationError, ValueError, LookupError, ImageRejected, OSError, ServerError) as exc:
        fail(exc)
    if response.reco_unavailable and mode != "clip":
        typer.secho(f"RECO unavailable, CLIP results: {response.reco_unavailable}", err=True, fg="yellow")
    if as_json:
        print_json({"results": [r.model_dump(include={"item_id", "caption", "captions", "score", "source",
                                                      "dataset", "label", "label_name"})
                                for r in response.results],
                    "query_modality": str(response.query_modality), "target": str(response.target),
                    "encoder_id": response.encoder_id, "random_weights": response.random_weights,
                    "reco": response.reco, "via": response.via})
        return
    if response.random_weights:
        typer.secho("RANDOM WEIGHTS: these results carry no meaning (set RECO_CLIP_PRETRAINED)", fg="yellow")
    typer.echo(f"encoder {response.encoder_id} · {response.query_modality}→{response.target}")
    for r in response.results:
        more = len([c for c in r.captions if c != r.caption])
        label = f"  <{printable(str(r.label_name or r.label))}>" if r.label is not None else ""
        # printable(): no terminal tricks from stored captions or paths
        typer.echo(f"{r.score:7.4f}  {printable(r.caption)}{f'  (+{more} captions)' if more else ''}{label}  "
                   f"[{printable(r.source)}]")


def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts per embedding status and per collection, the live version, recent jobs."""
    from app.services.ingest import prepare_storage
    from app.services.status import memory_status

    settings = load_settings()
    prepare_storage(settings)
    info = memory_status(settings)
    if as_json:
        print_json(info)
        return
    memory = info["memory"]
    typer.echo(f"items: {info['items']}   database: {info['database']}   memory: {memory['backend']} "
               f"{memory['location']}")
    typer.echo(f"alias {info['alias']['name']} → {info['alias']['collection']}")
    for name, n in info["collections"].items():
        typer.echo(f"  collection {name}: {n} points")
    for encoder_id, counts in info["status"].items():
        typer.echo(f"  {encoder_id}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for encoder_id, n in info.get("missing_vectors", {}).items():
        typer.secho(f"  LOST VECTORS: {n} items of {encoder_id} are marked embedded but have no vectors in the "
                    "memory: run `reco memory reconcile` to re-embed exactly those", fg="yellow")


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default head)."""
    from app.db.session import upgrade_database

    settings = load_settings()
    settings.ensure_dirs()
    upgrade_database(settings.resolved_database_url, revision)
    typer.echo(f"database at {revision}")


@db_cli.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "base") -> None:
    """Revert migrations down to REVISION (default base: empty database)."""
    from app.db.session import downgrade_database

    downgrade_database(load_settings().resolved_database_url, revision)
    typer.echo(f"database at {revision}")


def register(cli: typer.Typer) -> None:
    cli.command("search")(search)
    cli.command("status")(status)
    cli.add_typer(db_cli, name="db")
