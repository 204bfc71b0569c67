"""``reco reembed``: embed the whole memory with another encoder, then swap the alias."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli._common import fail, load_settings, print_json


def reembed(
    model: Annotated[str | None, typer.Option(help="open_clip model name of the new encoder.")] = None,
    pretrained: Annotated[str, typer.Option(help="Its pretrained tag or checkpoint file ('' = random).")] = "",
    seed: Annotated[int | None, typer.Option(help="Seed of random weights (tests only).")] = None,
    swap: Annotated[bool, typer.Option("--swap/--no-swap", help="Swap the alias when done.")] = True,
    drop_old: Annotated[bool, typer.Option("--drop-old", help="Delete collections no longer live.")] = False,
    schedule: Annotated[bool, typer.Option(
        "--schedule", help="Only record it: the maintenance worker's scheduled check runs it.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-embed every item with MODEL/PRETRAINED into a new collection (resumable), then swap the alias.

    Without --model: show the versions (with --drop-old: delete the old ones)."""
    from app.db.session import upgrade_database
    from app.memory.base import MemoryStoreError
    from app.services.reembed import drop_old_versions, reembed_now, schedule_reembed, versions_report

    settings = load_settings()
    settings.ensure_dirs()
    upgrade_database(settings.resolved_database_url)
    try:
        if model is None:
            dropped = drop_old_versions(settings) if drop_old else []
            out = versions_report(settings) | {"dropped": dropped}
        elif schedule:
            out = schedule_reembed(settings, model, pretrained, seed=seed)
        else:
            out = reembed_now(settings, model, pretrained, seed=seed, swap=swap, drop_old=drop_old,
                              progress=not as_json)
    except MemoryStoreError as exc:
        fail(f"{exc}\n(a worker owns the local store: use --schedule, the maintenance worker will run it)")
    print_json(out) if as_json else typer.echo(_describe(out))


def _describe(out: dict[str, Any]) -> str:
    if "scheduled" in out:
        return f"re-embedding to {out['scheduled']} scheduled (checked every {out['check_every_s']:.0f} s)"
    lines = [f"{v['status']:<9} {'*' if v['live'] else ' '} {v['encoder_id']}  {v['done']}/{v['total']}  "
             f"{v['collection']}" for v in out.get("versions", [])]
    if "encoder_id" in out:
        lines.append(f"{out['encoder_id']}: {out['done']} embedded, {out['failed']} failed, "
                     f"{out['remaining']} remaining; swapped: {out['swapped']}")
    fusion = out["fusion"]
    lines.append(f"live encoder {fusion['live_encoder_id']}; fusion checkpoint: "
                 + (str(fusion["checkpoint_id"]) if fusion["checkpoint_id"] else "NONE — retrain (reco train)"))
    lines += [f"dropped {c}" for c in out.get("dropped", [])]
    return "\n".join(lines)


def register(cli: typer.Typer) -> None:
    cli.command("reembed")(reembed)
