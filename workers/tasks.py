"""Celery tasks: ids in → an app service → the retry policy. No logic of their own.

Retry policy: a *transient* error (broker, database or Qdrant unreachable) is retried with exponential
backoff; anything else is the input's fault and is not retried (the services record such failures per
item with a reason). The embed task is a micro-batch (celery-batches): it retries by re-publishing the
batch's messages with a countdown, then lets the originals be acknowledged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from celery import Task
from celery.signals import worker_process_init

from app.services.ingest_async import retry_delay_s
from app.services.ingest_ledger import TaskRef
from workers.batching import CrashSafeBatches
from workers.celery_app import app, app_settings
from workers.runtime import get_runtime, is_transient_error, reset_runtime

log = logging.getLogger(__name__)

MAX_TRANSIENT_RETRIES = 8  # 1+2+4+…+60 s ≈ 4 min; after that the ledger's resend picks the rows up
F = TypeVar("F", bound=Callable[..., Any])

_settings = app_settings(app)


@worker_process_init.connect
def _fresh_runtime(**_: Any) -> None:
    """A new pool process: its own runtime. An embed worker loads its encoder right away, in a thread:
    this hook must return quickly (the main process kills a child that does not report up within
    ``worker_proc_alive_timeout``); the first batch waits for the warm-up under the runtime's lock."""
    reset_runtime()
    queues = set(app.amqp.queues.consume_from or {})
    if queues & {"embed", "refine"}:
        threading.Thread(target=_warm_up, args=(queues,), name="reco-warm-up", daemon=True).start()


def _warm_up(queues: set[str]) -> None:
    try:
        if "embed" in queues:
            ingest = get_runtime(app).embed_batches().ingest
            ingest.encoder.encode_texts(["warm-up"])  # loads the weights (lazy until the first call)
            log.info("embed worker warm: encoder %s on %s", ingest.encoder_id, getattr(ingest.encoder, "device", "?"))
        if "refine" in queues:
            get_runtime(app).refine().current()
            log.info("refine worker warm")
    except LookupError as exc:  # no memory published yet: the first request loads it
        log.info("refine warm-up skipped: %s", exc)
    except Exception:  # noqa: BLE001 - a service still starting: the first task retries it
        log.exception("warm-up failed; the first task will try again")


def retry_transient(fn: F) -> F:
    """Bound task body: transient errors → ``self.retry`` with backoff; anything else propagates."""

    @wraps(fn)
    def wrapper(self: Task, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            if not is_transient_error(exc) or self.request.retries >= MAX_TRANSIENT_RETRIES:
                raise
            log.warning("%s: transient %s, retry %d", self.name, type(exc).__name__, self.request.retries + 1)
            raise self.retry(exc=exc, countdown=retry_delay_s(self.request.retries)) from exc

    return wrapper  # type: ignore[return-value]


# --- embed ---------------------------------------------------------------------------------------
@app.task(base=CrashSafeBatches, name="reco.embed.items", bind=True, acks_late=True, ignore_result=True,
          flush_every=_settings.embed_max_batch, flush_interval=max(0.001, _settings.embed_max_wait_ms / 1000))
def embed_items(self: Task, requests: list[Any]) -> dict[str, Any] | None:
    """A micro-batch of messages ``(job_id, seq)`` → :meth:`EmbedBatchService.process`."""
    refs = [TaskRef(int(r.args[0]), int(r.args[1])) for r in requests]
    attempt = max(int((r.kwargs or {}).get("attempt", 0)) for r in requests)
    runtime = get_runtime(app)
    try:
        report = runtime.embed_batches().process(refs)
    except Exception as exc:
        if not is_transient_error(exc):
            raise  # a bug, not the input (inputs fail per item): logged; rows stay queued for the resend
        if attempt >= MAX_TRANSIENT_RETRIES:
            log.error("embed batch: %s after %d retries; leaving %d rows to the lost-row resend", exc, attempt,
                      len(refs))
            return None
        delay = retry_delay_s(attempt)
        log.warning("embed batch: transient %s; re-publishing %d rows in %.0f s", type(exc).__name__, len(refs), delay)
        runtime.sender.send(refs, attempt=attempt + 1, countdown=delay)
        return None
    log.info("embed batch: %d received, %d new, %d embedded, %d failed in %.2f s", report.received,
             report.claimed, report.embedded, report.failed, report.seconds)
    return None


# --- refine --------------------------------------------------------------------------------------
@app.task(name="reco.refine.predict", bind=True)
@retry_transient
def refine_predict(self: Task, image_b64: str, classes: list[str], mode: str | None = None,
                   k: int | None = None) -> dict[str, Any]:
    return get_runtime(app).refine().predict(image_b64, classes, mode=mode, k=k)


@app.task(name="reco.refine.search", bind=True)
@retry_transient
def refine_search(self: Task, query: dict[str, Any], mode: str | None = None, k: int | None = None) -> dict[str, Any]:
    return get_runtime(app).refine().search(query, mode=mode, k=k)


@app.task(name="reco.refine.stats", bind=True)
def refine_stats(self: Task, reset: bool = False) -> dict[str, Any]:
    return get_runtime(app).refine().stats(reset=reset)


# --- maintenance (the process that owns the memory) -------------------------------------------------
@app.task(name="reco.maintenance.resend_lost", bind=True, ignore_result=True)
@retry_transient
def resend_lost(self: Task) -> int:
    from ingestion.dispatch import resend_lost as resend

    return resend(_settings, get_runtime(app).sender)


@app.task(name="reco.maintenance.reconcile", bind=True)
@retry_transient
def reconcile(self: Task) -> dict[str, int]:
    from workers.maintenance import repair_pending

    return repair_pending(get_runtime(app))


@app.task(name="reco.maintenance.scan_watch_folders", bind=True, ignore_result=True)
@retry_transient
def scan_watch_folders(self: Task) -> int:
    from app.services.ingest_ledger import IngestLedger
    from ingestion.watch import scan_once, watched_folders

    ledger = IngestLedger.from_url(_settings.resolved_database_url)
    sender = get_runtime(app).sender
    return sum(scan_once(folder, _settings, sender, ledger=ledger)["submitted"]
               for folder in watched_folders(_settings, ledger) if folder.is_dir())


@app.task(name="reco.maintenance.reembed", bind=True)
@retry_transient
def reembed(self: Task, model: str, pretrained: str, seed: int | None = None, swap: bool = True,
            slice_s: float = 60.0) -> dict[str, Any]:
    """Re-embed for at most ``slice_s`` seconds, then continue in a new message (resumable, interleaves)."""
    from workers.maintenance import reembed_slice

    progress = reembed_slice(get_runtime(app), model, pretrained, seed, swap=swap, slice_s=slice_s)
    if not progress["finished"]:
        self.apply_async(args=(model, pretrained, seed, swap, slice_s))
    return progress


@app.task(name="reco.maintenance.reembed_check", bind=True, ignore_result=True)
@retry_transient
def reembed_check(self: Task) -> list[str]:
    """Resume re-embeddings that were started and not finished; catch up items the live version misses."""
    from workers.maintenance import pending_reembeds

    targets = pending_reembeds(get_runtime(app))
    for target in targets:
        reembed.apply_async(args=(target.model, target.pretrained, target.seed, True))
    return [target.label for target in targets]
