"""Ingestion: upload a zip of images (captions as same-name .txt files, a manifest inside, or class folders
captioned from a template) or a manifest, or point at a folder on the server — under a dataset name of your
choosing. The job runs in the serving service: live progress for every kind of job, cancel, and what
happened said plainly (amber when something failed or nothing was ingested), failures with their reasons,
retry."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import streamlit as st

from app.config import Settings
from app.manifest import PathOutsideRoot, printable, resolve_confined
from app.schemas import JobStatus, RejectReason
from app.services.serving import JobOut, ingest_roots
from ingestion.classfolders import TemplateError, check_template
from ingestion.uploads import UploadRejected, store_upload
from ui import components, state

POLL_S = 0.3
JOB_KEY = "ingest_failure_job"  # the job whose failures are shown
FOLLOW_KEY = "ingest_follow_newest"  # after a submit: show the newest job, not the one picked before
DEFAULT_TEMPLATE = "a photo of a {folder}."

# What a person reads first when an *upload* is refused: the same wire reasons as for an image, but a zip
# that does not open is not "a corrupt image".
UPLOAD_HEADLINES: dict[str, str] = {
    RejectReason.CORRUPT: "not a readable zip archive",
    RejectReason.UNSUPPORTED: "not a zip or a manifest",
    RejectReason.EMPTY_FILE: "the file is empty",
    RejectReason.TOO_LARGE: "the upload is over the size or count caps",
    RejectReason.DECOMPRESSION_BOMB: "an archive member expands too much (zip bomb)",
    RejectReason.PATH_OUTSIDE_ROOT: "an archive member's path leaves the archive",
}


def upload_rejection(name: str, reason: str, detail: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    headline = UPLOAD_HEADLINES.get(reason, components.REJECTION_HEADLINES.get(reason, "refused"))
    if reason == RejectReason.CORRUPT and suffix not in {".zip"}:
        headline = "not a readable archive or manifest"
    if reason == RejectReason.EMPTY_FILE and suffix == ".zip":
        headline = "nothing to ingest in the archive"
    return f"**{printable(name)}** was rejected: {headline} (`{reason}`) — {detail}"


def dataset_name(raw: str) -> str | None:
    name = re.sub(r"[^A-Za-z0-9 _.-]+", "_", raw.strip()).strip(" ._-")[:128]
    return name or None


def default_dataset(name: str) -> str:
    return dataset_name(PurePosixPath(name.replace("\\", "/")).stem) or "upload"


# --- starting a job -----------------------------------------------------------------------------------
def ingest_work(settings: Settings, source: Path, options: dict[str, Any]) -> tuple[Callable[..., dict[str, Any]],
                                                                                   Callable[[int], Any] | None]:
    """The work (through the serving service: ``reco serve`` or this process; or the embed workers) and
    how to cancel it (None where the job cannot be cancelled from here)."""
    if settings.ui_use_workers:
        from ingestion.dispatch import dispatch_source
        from workers.client import CeleryTaskSender

        sender = CeleryTaskSender(state.celery_app(settings))
        return (lambda run: dispatch_source(source, settings, sender, progress=False)), None
    service = state.service(settings)  # resolved here: the worker thread has no Streamlit context
    client = state.server_client(settings)

    def work(run: state.IngestRun) -> dict[str, Any]:
        kind = "manifest" if source.is_file() else "folder"
        job = (client.ingest_path(source, **options) if client is not None
               else service.start_ingest(source, kind=kind, total=run.total, **options))
        run.job_id = job.id
        while job.status == JobStatus.RUNNING:
            time.sleep(POLL_S)
            job = service.get_job(job.id)
        if job.status == JobStatus.FAILED:
            raise RuntimeError(job.error or f"job {job.id} failed")
        return job.model_dump() | {"job_id": job.id}

    return work, service.cancel_job


def start_ingest(settings: Settings, source: Path, label: str, total: int | None = None,
                 options: dict[str, Any] | None = None) -> None:
    latest = state.repo(settings).latest_job()
    work, cancel = ingest_work(settings, source, options or {})
    state.ingest_runner().submit(label, source, latest.id if latest else 0, work, total, cancel)
    st.session_state[FOLLOW_KEY] = True


def job_options(dataset: str, template: str) -> dict[str, Any] | None:
    """The dataset name and caption template as the service takes them; None (after an error) if unusable."""
    options: dict[str, Any] = {}
    if dataset_name(dataset):
        options["dataset"] = dataset_name(dataset)
    if template.strip():
        try:
            options["caption_template"] = check_template(template.strip())
        except TemplateError as exc:
            st.error(f"Caption template: {exc}")
            return None
    return options


def start_upload(settings: Settings, name: str, data: bytes, options: dict[str, Any]) -> None:
    try:
        stored = store_upload(name, data, settings)
    except UploadRejected as exc:
        st.error(upload_rejection(name, exc.reason, exc.detail))
        return
    except OSError as exc:  # disk full, permissions on the data dir: the upload is not stored, say why
        st.error(f"`{printable(name)}` could not be stored on the server: {exc.strerror or exc}")
        return
    if stored.skipped:
        shown = ", ".join(stored.skipped[:10]) + (" …" if len(stored.skipped) > 10 else "")
        st.info(f"{len(stored.skipped)} archive members skipped (not images, captions or manifests): {shown}")
    start_ingest(settings, stored.source, name, stored.images or None, options)


def start_server_path(settings: Settings, raw: str, options: dict[str, Any]) -> None:
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
    start_ingest(settings, path, str(path), options=options)


# --- progress, jobs, failures -----------------------------------------------------------------------------
def job_of(run: state.IngestRun, settings: Settings) -> JobOut | None:
    """The run's job as the serving service sees it (with its total), once it exists."""
    if run.job_id is not None:
        try:
            return state.service(settings).get_job(run.job_id)
        except LookupError:
            return None
    if settings.ui_use_workers:  # dispatched: the newest job above the one before the run
        jobs = [j for j in state.repo(settings).recent_jobs(20) if j.id > run.after_job]
        job = min(jobs, key=lambda j: j.id, default=None)
        if job is not None:
            return JobOut(id=job.id, source=job.source, kind=job.kind, status=job.status, seen=job.seen,
                          ingested=job.ingested, duplicates=job.duplicates, failed=job.failed, total=run.total,
                          error=job.error, started_at=job.started_at, finished_at=job.finished_at)
    return None


def _progress_line(job: JobOut | None, run: state.IngestRun) -> tuple[float | None, str]:
    if job is None:
        return None, "starting …"
    total = job.total or run.total
    counted = f"{job.seen} of {total}" if total else f"{job.seen}"
    text = (f"job {job.id}: {counted} seen · {job.ingested} new · {job.duplicates} duplicates · "
            f"{job.failed} failed")
    if job.cancel_requested and job.status == JobStatus.RUNNING:
        text += " · cancelling after this batch …"
    return (min(1.0, job.seen / total) if total else None), text


def watch_run(run: state.IngestRun, settings: Settings) -> None:
    """Live progress while the job runs (this run of the page waits; navigating away does not stop the job).
    Cancel is clickable meanwhile: the click reruns the page, which asks the service to stop the job."""
    slot = st.empty()
    if run.cancel is not None and slot.button("Cancel the job", key=f"ingest_cancel_{id(run)}"):
        if run.job_id is not None:
            try:
                run.cancel(run.job_id)
            except LookupError as exc:
                st.warning(str(exc))
    with st.status(f"Ingesting {run.label} …", expanded=True) as box:
        bar, line = st.progress(0.0), st.empty()
        while not run.done():
            fraction, text = _progress_line(job_of(run, settings), run)
            bar.progress(fraction if fraction is not None else 0.0, text=None if fraction is not None else
                         "counting …")
            line.write(text)
            time.sleep(POLL_S)
        slot.empty()
        assert run.future is not None
        error = run.future.exception()
        job = job_of(run, settings)
        fraction, text = _progress_line(job, run)
        bar.progress(1.0 if error is None and (job is None or job.status == JobStatus.COMPLETED)
                     else (fraction or 0.0))
        line.write(text)
        box.update(label=f"{run.label}: {'failed' if error else job.status if job else 'done'}",
                   state="error" if error else "complete", expanded=error is not None)
    if error is not None:
        st.error(f"Ingestion of {run.label} stopped: {type(error).__name__}: {error}")


def outcome(job: JobOut | dict[str, Any]) -> tuple[str, str]:
    """("success" | "warning", the sentence): amber when anything failed, nothing was new, or it was cancelled."""
    j = job if isinstance(job, dict) else job.model_dump()
    counts = (f"{j.get('seen', 0)} seen, {j.get('ingested', 0)} new, {j.get('duplicates', 0)} duplicates, "
              f"{j.get('failed', 0)} failed")
    head = f"job {j.get('job_id') or j.get('id')}"
    if j.get("status") == JobStatus.CANCELLED:
        return "warning", f"{head} was cancelled — {counts}; what was stored before stays."
    if not j.get("seen"):
        return "warning", f"{head} found nothing to ingest — {counts} (no images or rows in the source?)."
    if j.get("failed"):
        return "warning", f"{head} finished with {j['failed']} failure{'s' if j['failed'] > 1 else ''} — {counts}; " \
                          "the reasons are listed below."
    if not j.get("ingested"):
        return "warning", f"{head} ingested nothing new — {counts} (everything was already in the memory)."
    return "success", f"{head} — {counts}."


def show_last_result(settings: Settings) -> None:
    runs = state.ingest_runner().runs
    if not runs or not runs[-1].done():
        return
    run = runs[-1]
    assert run.future is not None
    if run.future.exception() is None:
        kind, sentence = outcome(run.future.result())
        (st.success if kind == "success" else st.warning)(f"{run.label}: {sentence}")


def _result(job: Any) -> str:
    if job.status == JobStatus.RUNNING:
        return "running"
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return str(job.status)
    kind, _ = outcome({"status": job.status, "seen": job.seen, "ingested": job.ingested, "failed": job.failed})
    return "ok" if kind == "success" else "⚠ " + ("nothing seen" if not job.seen else f"{job.failed} failed"
                                                   if job.failed else "nothing new")


def show_jobs(settings: Settings) -> list[Any]:
    jobs = state.repo(settings).recent_jobs(20)
    st.subheader("Jobs")
    if not jobs:
        st.info("No ingestion jobs yet.")
        return []
    st.dataframe([{"job": j.id, "kind": j.kind, "status": j.status, "result": _result(j), "seen": j.seen,
                   "new": j.ingested, "duplicates": j.duplicates, "failed": j.failed, "source": j.source,
                   "started": j.started_at, "finished": j.finished_at, "error": j.error} for j in jobs],
                 hide_index=True, key="ingest_jobs")
    if any(j.status == JobStatus.RUNNING for j in jobs):
        st.caption("A job is still running (here or on the embed workers).")
        st.button("Refresh", key="ingest_refresh")
    return jobs


def show_failures(settings: Settings, jobs: list[Any]) -> None:
    if not jobs:
        return
    st.subheader("Failures")
    by_id = {j.id: j for j in jobs}
    if st.session_state.get(FOLLOW_KEY) or st.session_state.get(JOB_KEY) not in by_id:
        st.session_state[JOB_KEY] = jobs[0].id  # the newest job: the one just submitted
        if not state.ingest_runner().active():
            st.session_state.pop(FOLLOW_KEY, None)
    chosen = st.selectbox("Job", list(by_id), key=JOB_KEY,
                          format_func=lambda i: f"job {i} · {by_id[i].failed} failed · {Path(by_id[i].source).name}")
    job = by_id[chosen]
    failures = state.repo(settings).job_failures(job.id, limit=1000)
    if not failures:
        st.caption(f"Job {job.id} has no failures.")
        return
    st.dataframe([{"source": f.source, "reason": f.reason,
                   "what": components.REJECTION_HEADLINES.get(f.reason, f.reason.replace("_", " ")),
                   "detail": f.detail} for f in failures], hide_index=True, key="ingest_failures")
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


def naming(key: str, default: str, folders: bool) -> tuple[str, str]:
    """The dataset name and (for class-folder trees) the caption template, as typed."""
    left, right = st.columns(2)
    if st.session_state.get(f"{key}_for") != default:  # a new file: its name is the suggestion
        st.session_state[f"{key}_dataset"] = default
        st.session_state[f"{key}_for"] = default
    dataset = left.text_input("Dataset name", key=f"{key}_dataset",
                              help="The items are filed (and filtered) under this name.")
    template = ""
    if folders:
        template = right.text_input(
            "Caption template for class folders (optional)", "", key=f"{key}_template",
            placeholder=DEFAULT_TEMPLATE,
            help="For images in class folders (<class>/<image>) without captions: each is captioned with "
                 "{folder} replaced by its folder's name and labelled with that class.")
    return dataset, template


def render() -> None:
    settings = state.load_settings()
    st.title("Ingestion")
    st.caption("Add image–caption pairs to the memory. Each ingestion is a job: its progress, what it added, "
               "what it refused and why.")
    zip_tab, manifest_tab, path_tab = st.tabs(["Upload a zip", "Upload a manifest", "Folder or manifest on the server"])
    with zip_tab:
        upload = st.file_uploader("Zip of images (captions: same-name .txt files, a manifest.csv inside, or class "
                                  "folders with a caption template)", key="ingest_zip")
        dataset, template = naming("ingest_zip", default_dataset(upload.name) if upload else "", True)
        if upload is not None and st.button("Ingest the zip", key="ingest_zip_go", type="primary"):
            options = job_options(dataset, template)
            if options is not None:
                start_upload(settings, upload.name, upload.getvalue(), options)
    with manifest_tab:
        st.caption("A manifest on its own may only point at images under RECO_ALLOWED_ROOTS (absolute paths); "
                   "to upload the images too, zip them with the manifest.")
        manifest = st.file_uploader("Manifest (.csv, .jsonl)", key="ingest_manifest")
        dataset, _ = naming("ingest_manifest", default_dataset(manifest.name) if manifest else "", False)
        if manifest is not None and st.button("Ingest the manifest", key="ingest_manifest_go", type="primary"):
            options = job_options(dataset, "")
            if options is not None:
                start_upload(settings, manifest.name, manifest.getvalue(), options)
    with path_tab:
        raw = st.text_input("Path", placeholder=str(settings.shared_data / "flickr8k" / "manifest.csv"),
                            key="ingest_path")
        dataset, template = naming("ingest_path", "", True)
        if st.button("Ingest from the server", key="ingest_path_go") and raw.strip():
            options = job_options(dataset, template)
            if options is not None:
                start_server_path(settings, raw, options)
    for run in state.ingest_runner().active():
        watch_run(run, settings)
    show_last_result(settings)
    show_failures(settings, show_jobs(settings))


render()
