"""Ingestion: upload a zip of images (captions as same-name .txt files, or a manifest inside) or a manifest,
or point at a folder on the server; watch the job, read its failures with their reasons, retry them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from app.config import Settings
from app.db.models import IngestJob
from app.manifest import PathOutsideRoot, printable, resolve_confined
from app.schemas import JobStatus
from app.services.serving import ingest_roots
from ingestion.uploads import UploadRejected, store_upload
from ui import components, state

POLL_S = 0.3


# --- starting a job -----------------------------------------------------------------------------------
def ingest_work(settings: Settings, source: Path) -> Callable[[], dict[str, Any]]:
    """Through the serving service (``reco serve``, or this process), or dispatched to the embed workers."""
    if settings.ui_use_workers:
        from ingestion.dispatch import dispatch_source
        from workers.client import CeleryTaskSender

        sender = CeleryTaskSender(state.celery_app(settings))
        return lambda: dispatch_source(source, settings, sender, progress=False)
    service = state.service(settings)  # resolved here: the worker thread has no Streamlit context
    client = state.server_client(settings)

    def work() -> dict[str, Any]:
        job = client.ingest_path(source) if client is not None else service.start_ingest(
            source, kind="manifest" if source.is_file() else "folder")
        while job.status == JobStatus.RUNNING:
            time.sleep(POLL_S)
            job = service.get_job(job.id)
        if job.status == JobStatus.FAILED:
            raise RuntimeError(job.error or f"job {job.id} failed")
        return job.model_dump() | {"job_id": job.id}

    return work


def start_ingest(settings: Settings, source: Path, label: str, total: int | None = None) -> None:
    latest = state.repo(settings).latest_job()
    state.ingest_runner().submit(label, source, latest.id if latest else 0, ingest_work(settings, source), total)


def start_upload(settings: Settings, name: str, data: bytes) -> None:
    try:
        stored = store_upload(name, data, settings)
    except UploadRejected as exc:
        st.error(components.rejection_message(name, exc.reason, exc.detail))
        return
    except OSError as exc:  # disk full, permissions on the data dir: the upload is not stored, say why
        st.error(f"`{printable(name)}` could not be stored on the server: {exc.strerror or exc}")
        return
    if stored.skipped:
        shown = ", ".join(stored.skipped[:10]) + (" …" if len(stored.skipped) > 10 else "")
        st.info(f"{len(stored.skipped)} archive members skipped (not images, captions or manifests): {shown}")
    start_ingest(settings, stored.source, name, stored.images or None)


def start_server_path(settings: Settings, raw: str) -> None:
    roots = ingest_roots(settings)
    try:
        path = resolve_confined(roots[0], raw.strip(), roots[1:])
    except PathOutsideRoot:
        st.error(f"`{printable(raw)}` is outside the folders the UI may read: {', '.join(map(str, roots))} "
                 "(add more with RECO_ALLOWED_ROOTS).")
        return
    except ValueError as exc:
        st.error(str(exc))
        return
    if not path.exists():
        st.error(f"`{path}` does not exist.")
        return
    start_ingest(settings, path, str(path))


# --- progress, jobs, failures -----------------------------------------------------------------------------
def job_of(run: state.IngestRun, settings: Settings) -> IngestJob | None:
    jobs = [j for j in state.repo(settings).recent_jobs(20) if j.id > run.after_job]
    same = [j for j in jobs if j.source == str(run.source.resolve())]
    return min(same or jobs, key=lambda j: j.id, default=None)


def _progress_line(job: IngestJob | None, run: state.IngestRun) -> tuple[float | None, str]:
    if job is None:
        return None, "starting …"
    text = f"job {job.id}: {job.seen} seen · {job.ingested} new · {job.duplicates} duplicates · {job.failed} failed"
    return (min(1.0, job.seen / run.total) if run.total else None), text


def watch_run(run: state.IngestRun, settings: Settings) -> None:
    """Live progress while the job runs (this run of the page waits; navigating away does not stop the job)."""
    with st.status(f"Ingesting {run.label} …", expanded=True) as box:
        bar, line = st.progress(0.0), st.empty()
        while not run.future.done():
            fraction, text = _progress_line(job_of(run, settings), run)
            bar.progress(fraction if fraction is not None else 0.0)
            line.write(text)
            time.sleep(POLL_S)
        error = run.future.exception()
        fraction, text = _progress_line(job_of(run, settings), run)
        bar.progress(1.0)
        line.write(text)
        box.update(label=f"{run.label}: {'failed' if error else 'done'}", state="error" if error else "complete",
                   expanded=error is not None)
    if error is not None:
        st.error(f"Ingestion of {run.label} stopped: {type(error).__name__}: {error}")


def show_last_result(settings: Settings) -> None:
    runs = state.ingest_runner().runs
    if not runs or not runs[-1].future.done():
        return
    run = runs[-1]
    if run.future.exception() is None:
        done = run.future.result()
        st.success(f"{run.label}: job {done.get('job_id')} — {done.get('seen', 0)} seen, "
                   f"{done.get('ingested', 0)} new, {done.get('duplicates', 0)} duplicates, "
                   f"{done.get('failed', 0)} failed.")


def show_jobs(settings: Settings) -> list[IngestJob]:
    jobs = state.repo(settings).recent_jobs(20)
    st.subheader("Jobs")
    if not jobs:
        st.info("No ingestion jobs yet.")
        return []
    st.dataframe([{"job": j.id, "kind": j.kind, "status": j.status, "seen": j.seen, "new": j.ingested,
                   "duplicates": j.duplicates, "failed": j.failed, "source": j.source, "started": j.started_at,
                   "finished": j.finished_at, "error": j.error} for j in jobs], hide_index=True, key="ingest_jobs")
    if any(j.status == JobStatus.RUNNING for j in jobs):
        st.caption("A job is still running (here or on the embed workers).")
        st.button("Refresh", key="ingest_refresh")
    return jobs


def show_failures(settings: Settings, jobs: list[IngestJob]) -> None:
    if not jobs:
        return
    st.subheader("Failures")
    default = next((i for i, j in enumerate(jobs) if j.failed), 0)
    by_id = {j.id: j for j in jobs}
    chosen = st.selectbox("Job", list(by_id), index=default, key="ingest_failure_job",
                          format_func=lambda i: f"job {i} · {by_id[i].failed} failed · {Path(by_id[i].source).name}")
    job = by_id[chosen]
    failures = state.repo(settings).job_failures(job.id, limit=1000)
    if not failures:
        st.caption(f"Job {job.id} has no failures.")
        return
    st.dataframe([{"source": f.source, "reason": f.reason, "detail": f.detail} for f in failures],
                 hide_index=True, key="ingest_failures")
    st.caption("Retry re-runs the job's source: items already in the memory are skipped (content hash), the "
               "failed ones are tried again — fix the files first.")
    if st.button(f"Retry the failed items of job {job.id}", key="ingest_retry"):
        source = Path(job.source)
        if not source.exists():
            st.error(f"The job's source `{source}` no longer exists.")
        elif job.status == JobStatus.RUNNING and state.ingest_runner().active():
            st.warning("The job is still running.")
        else:
            start_ingest(settings, source, f"retry of job {job.id}")
            st.rerun()


def render() -> None:
    settings = state.load_settings()
    st.title("Ingestion")
    zip_tab, manifest_tab, path_tab = st.tabs(["Upload a zip", "Upload a manifest", "Folder or manifest on the server"])
    with zip_tab:
        upload = st.file_uploader("Zip of images (captions: same-name .txt files, or a manifest.csv inside)",
                                  key="ingest_zip")
        if upload is not None and st.button("Ingest the zip", key="ingest_zip_go", type="primary"):
            start_upload(settings, upload.name, upload.getvalue())
    with manifest_tab:
        st.caption("A manifest on its own may only point at images under RECO_ALLOWED_ROOTS (absolute paths); "
                   "to upload the images too, zip them with the manifest.")
        manifest = st.file_uploader("Manifest (.csv, .jsonl)", key="ingest_manifest")
        if manifest is not None and st.button("Ingest the manifest", key="ingest_manifest_go", type="primary"):
            start_upload(settings, manifest.name, manifest.getvalue())
    with path_tab:
        raw = st.text_input("Path", placeholder=str(settings.shared_data / "flickr8k" / "manifest.csv"),
                            key="ingest_path")
        if st.button("Ingest from the server", key="ingest_path_go") and raw.strip():
            start_server_path(settings, raw)
    for run in state.ingest_runner().active():
        watch_run(run, settings)
    show_last_result(settings)
    show_failures(settings, show_jobs(settings))


render()
