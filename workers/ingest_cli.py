"""``reco ingest``: in process (ingestion.pipeline), or through the Celery workers with ``--async``/``--watch``.

It lives with the workers because it is the one front end that needs both layers; ``workers.cli:register``
adds it to ``reco`` (app never imports ingestion or workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli._common import fail, load_settings, print_json


def ingest(
    source: Annotated[str | None, typer.Argument(help="A folder of images or a CSV/JSONL manifest.")] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="Ingest at most N rows.")] = None,
    split: Annotated[str | None, typer.Option(help="Only rows of this split (train/val/test).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Show the failures of a job instead.")] = False,
    job: Annotated[int | None, typer.Option(min=1, help="Job id for --report (default: the latest).")] = None,
    enqueue: Annotated[bool, typer.Option("--async", help="Enqueue for the embed workers instead.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="With --async: return when every row is done.")] = False,
    watch: Annotated[Path | None, typer.Option("--watch", help="Keep submitting new files/rows of DIR.")] = None,
    once: Annotated[bool, typer.Option("--once", help="With --watch: one scan, then exit.")] = False,
    caption_template: Annotated[str | None, typer.Option(
        "--caption-template",
        help="For a tree of class folders (DIR/<class>/<image>): caption each image without one as this "
             "template with {folder} replaced by its folder's name, and label it with that class "
             "(e.g. \"a photo of a {folder}.\").")] = None,
    dataset: Annotated[str | None, typer.Option(help="The dataset name to file the items under.")] = None,
) -> None:
    """Ingest image-text pairs into the memory (in this process, or --async / --watch through the workers)."""
    if source is not None and not source.strip():
        # Path("") is ".": an empty argument (an unset shell variable) must not ingest the current folder
        fail("SOURCE is empty: give a folder or a manifest (use . for the current folder)")
    source_path = Path(source) if source is not None else None
    if watch is not None and not str(watch).strip():
        fail("--watch needs a folder")
    if enqueue or watch is not None:
        if caption_template or dataset:
            fail("--caption-template and --dataset apply to an ingestion in this process (not --async / --watch)")
        run_async_cli(source_path, watch, limit=limit, wait=wait, once=once, as_json=as_json)
        return
    from app.db.repo import MetadataRepo
    from app.manifest import ManifestError
    from app.services.ingest import job_summary, prepare_storage
    from ingestion.classfolders import TemplateError, check_template
    from ingestion.pipeline import ingest_source
    from ingestion.sources import SourceError

    settings = load_settings()
    prepare_storage(settings)
    if report:
        repo = MetadataRepo.from_url(settings.resolved_database_url)
        latest = repo.latest_job() if job is None else None
        job_id = job or (latest.id if latest is not None else None)
        if job_id is None:
            fail("no ingest job yet: run `reco ingest SOURCE` first")
        try:
            summary = job_summary(repo, job_id)
        except KeyError:
            latest = repo.latest_job()
            fail(f"no ingest job {job_id}" + (f" (the latest is {latest.id})" if latest is not None else
                                              " (none yet)") + ": give an existing --job, or leave it out")
        _print_summary(summary, as_json)
        return
    if source_path is None:
        fail("give a SOURCE (folder or manifest), or --report")
    try:
        if caption_template is not None:
            check_template(caption_template)
        summary = ingest_source(source_path, settings, limit=limit, split=split, progress=not as_json,
                                dataset=dataset, caption_template=caption_template)
    except (SourceError, ManifestError, TemplateError) as exc:  # the source as a whole is unusable
        fail(exc)
    _print_summary(summary, as_json)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json({k: summary[k] for k in ("job_id", "seen", "ingested", "duplicates", "failed")}
                   | {"failures": [{"source": f["source"], "reason": f["reason"]} for f in summary["failures"]]})
        return
    typer.echo(f"job {summary['job_id']}: seen {summary['seen']}, ingested {summary['ingested']}, "
               f"duplicates {summary['duplicates']}, failed {summary['failed']}")
    for f in summary["failures"][:50]:
        typer.echo(f"  {f['reason']:<20} {f['source']}  {f['detail'] or ''}")
    if len(summary["failures"]) > 50:
        typer.echo(f"  … {len(summary['failures']) - 50} more (reco ingest --report --json)")


def register(cli: typer.Typer) -> None:
    cli.command("ingest")(ingest)


def run_async_cli(source: Path | None, watch_dir: Path | None, *, limit: int | None, wait: bool, once: bool,
                  as_json: bool) -> None:
    """``reco ingest SOURCE --async [--wait]`` and ``reco ingest --watch DIR [--once]``."""
    import typer

    from app.cli._common import fail, load_settings, print_json
    from app.db.session import upgrade_database
    from app.manifest import ManifestError
    from app.services.ingest_ledger import IngestLedger
    from ingestion.dispatch import dispatch_source, wait_for_job
    from ingestion.sources import SourceError
    from workers.client import default_sender

    settings = load_settings()
    settings.ensure_dirs()
    upgrade_database(settings.resolved_database_url)  # never opens Qdrant: the embed worker owns a local store
    sender = default_sender(settings)  # the broker these settings name, not one imported earlier
    if watch_dir is not None:
        from ingestion.watch import scan_once, watch

        if once:
            result = scan_once(watch_dir, settings, sender)
            print_json(result) if as_json else typer.echo(f"watch {result['folder']}: {result['submitted']} new rows")
            return
        typer.echo(f"watching {watch_dir} every {settings.watch_interval_s} s (Ctrl-C to stop)", err=True)
        try:
            watch(watch_dir, settings, sender)
        except KeyboardInterrupt:
            return
        return
    if source is None:
        fail("give a SOURCE to --async")
    try:
        summary = dispatch_source(source, settings, sender, limit=limit, progress=not as_json)
        if wait:
            ledger = IngestLedger.from_url(settings.resolved_database_url)
            summary = wait_for_job(ledger, summary["job_id"]) | {"submitted": summary["submitted"]}
    except (SourceError, ManifestError) as exc:
        fail(exc)
    keys = ("job_id", "submitted", "seen", "ingested", "duplicates", "failed", "status")
    if as_json:
        print_json({k: summary.get(k) for k in keys})
        return
    typer.echo("job {job_id}: submitted {submitted} rows, status {status} (seen {seen}, ingested {ingested}, "
               "duplicates {duplicates}, failed {failed})".format(**{k: summary.get(k) for k in keys}))
