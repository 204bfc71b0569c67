"""``reco memory``: the vector memory itself — what is in it, its index, and converting an old store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import fail, load_settings, print_json

memory_cli = typer.Typer(help="The vector memory (Qdrant Edge embedded, or a Qdrant server).",
                         no_args_is_help=True)


@memory_cli.command("info")
def info(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Backend, location, collections (points, segments, indexed points) and aliases."""
    from app.memory.store import open_store

    described = open_store(load_settings()).describe()
    if as_json:
        print_json(described)
        return
    typer.echo(f"{described['backend']} · {described.get('path') or described.get('url')}")
    for name, entry in described["collections"].items():
        extra = "".join(f", {k} {v}" for k, v in entry.items() if k not in ("points",))
        typer.echo(f"  {name}: {entry.get('points')} points{extra}")
    for alias, target in described["aliases"].items():
        typer.echo(f"  alias {alias} → {target}")


@memory_cli.command("index")
def index(
    force: Annotated[bool, typer.Option("--force", help="Index every waiting point, however few.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build the HNSW index over points still searched exactly (embedded engine; a server does it itself)."""
    import time

    from app.memory.store import open_store

    store = open_store(load_settings())
    for name in store.list_collections():  # open them all, so their waiting points are seen
        store.collection(name).count()
    started = time.perf_counter()
    done = store.index_pending(force=force, on_start=lambda name, n: None if as_json else typer.echo(
        f"indexing {n} points of {name} (the process is busy until it is done) …"))
    out = {"indexed_points": done, "seconds": round(time.perf_counter() - started, 2)}
    print_json(out) if as_json else typer.echo(f"indexed {done} points in {out['seconds']} s")


@memory_cli.command("reconcile")
def reconcile(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count the items whose vectors are missing.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-embed exactly the items the metadata calls embedded whose vectors the memory lost."""
    from tqdm import tqdm

    from app.services.ingest import prepare_storage
    from app.services.restore import restore_lost_vectors

    settings = load_settings()
    prepare_storage(settings)
    with tqdm(unit="item", desc="restore", disable=as_json) as bar:
        out = restore_lost_vectors(settings, dry_run=dry_run, on_batch=lambda done, tried: bar.update(tried))
    if as_json:
        print_json(out)
        return
    if dry_run:
        typer.echo(f"{out['missing']} items of {out['encoder_id']} have no vectors in {out['collection']}")
        return
    typer.echo(f"{out['missing']} items had no vectors in {out['collection']}: restored {out['restored']}, "
               f"failed {out['failed']} (`reco ingest --report` does not list these; see `reco status`)")
    if out["failed"]:
        raise typer.Exit(1)


@memory_cli.command("migrate")
def migrate(
    source: Annotated[Path | None, typer.Option(
        "--from", help="The local-mode folder (default: RECO_QDRANT_PATH, else <data dir>/qdrant).")] = None,
    keep_source: Annotated[bool, typer.Option(
        "--keep-source", help="Leave the old folder as it is (else renamed *.local-mode-backup).")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Convert a memory kept in qdrant-client's local mode (the retired embedded backend) into Qdrant Edge."""
    from tqdm import tqdm

    from app.memory.base import MemoryStoreError
    from app.memory.edge import EdgeStore
    from app.memory.layout import MemoryLayout
    from app.memory.migrate import migrate_local_mode, source_points

    settings = load_settings()
    if settings.qdrant_url:
        fail("RECO_QDRANT_URL is set: migrate converts into the embedded engine; unset it (or copy with Qdrant's "
             "own snapshot tools on the server)")
    folder = Path(source) if source else settings.legacy_local_store
    target_path = settings.resolved_memory_path
    if target_path is None or target_path == ":memory:":
        fail("RECO_MEMORY_PATH must name a folder to migrate into")
    try:
        total = source_points(folder) if (folder / "meta.json").is_file() else 0
        store = EdgeStore(Path(target_path), MemoryLayout.from_settings(settings))
        try:
            with tqdm(total=total, unit="point", desc="migrate", disable=as_json) as bar:
                result = migrate_local_mode(folder, store, on_points=bar.update, keep_source=keep_source)
        finally:
            store.close()
    except MemoryStoreError as exc:
        fail(str(exc), code=1)
    if as_json:
        print_json(result)
        return
    for name, n in result["collections"].items():
        typer.echo(f"{name}: {n} points")
    typer.echo(f"aliases: {result['aliases']}; the old store is at {result['source_kept_as']}")
    if settings.qdrant_path is not None:
        typer.echo("now unset RECO_QDRANT_PATH")


def register(cli: typer.Typer) -> None:
    cli.add_typer(memory_cli, name="memory")
