"""Maintenance work of the memory's owner process, over app services (kept out of the task bodies)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from app.encoder_identity import EncoderId
from app.services.reembed import ReembedService, live_version, missing_from_live, unfinished_versions

if TYPE_CHECKING:
    from app.encoder import Encoder
    from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def _encoder(runtime: WorkerRuntime, identity: EncoderId) -> Encoder:
    return runtime.target_encoder(identity)  # the runtime keeps one target's encoder at a time


def reembed_slice(runtime: WorkerRuntime, model: str, pretrained: str, seed: int | None, *, swap: bool,
                  slice_s: float) -> dict[str, Any]:
    """Up to ``slice_s`` seconds of re-embedding; after a swap the next embed batch loads the new encoder."""
    ingest = runtime.ingest_service()  # owns the Qdrant client of this process
    service = ReembedService(runtime.settings, _encoder(runtime, EncoderId(model, pretrained, seed)), repo=ingest.repo,
                             store=ingest.store)
    progress = service.run(max_seconds=slice_s, swap=swap)
    if progress.swapped:
        runtime.ingest_service()  # load the new live encoder for the next embed batch
    finished = progress.remaining == 0 and (not swap or progress.live_encoder_id == progress.encoder_id)
    return progress.model_dump() | {"finished": finished}


def pending_reembeds(runtime: WorkerRuntime) -> list[EncoderId]:
    """The encoder of every unfinished re-embedding, the configured encoder when it is not the live
    one (RECO_CLIP_MODEL / RECO_CLIP_PRETRAINED changed), and the live one if it misses items.

    Idempotent: the configured encoder's version is registered *building* once (schedule_reembed); later checks
    find it among the unfinished versions, and once its re-embedding swapped the alias it is the live one."""
    repo = runtime.ingest_service().repo
    live = live_version(repo)
    configured = configured_target(runtime, live.encoder_id if live is not None else None)
    targets = [EncoderId.of_version(v) for v in unfinished_versions(repo)]
    if configured is not None and configured not in targets:
        targets.insert(0, configured)
    if live is not None and missing_from_live(repo) > 0:
        targets.append(EncoderId.of_version(live))
    return targets


def configured_target(runtime: WorkerRuntime, live_encoder_id: str | None) -> EncoderId | None:
    """The configured encoder as a re-embedding target, when a live version exists and it is another one."""
    if live_encoder_id is None:
        return None  # nothing ingested yet: the first ingestion makes the configured encoder live
    settings = runtime.settings
    configured = EncoderId.from_settings(settings)
    encoder = _encoder(runtime, configured)
    if encoder.encoder_id == live_encoder_id:
        return None
    from app.services.reembed import schedule_reembed

    schedule_reembed(settings, configured.model, configured.pretrained, seed=configured.seed)  # building, once
    log.warning("configured encoder %s is not the live one (%s): re-embedding the memory", encoder.encoder_id,
                live_encoder_id)
    return configured


def repair_pending(runtime: WorkerRuntime) -> dict[str, Any]:
    """Reconcile DB and Qdrant, then submit items still pending after the stale age again (a repair job)."""
    from app.services.ingest_async import stale_pending_rows
    from app.services.ingest_ledger import IngestLedger

    ingest = runtime.ingest_service()
    report = ingest.reconcile().model_dump()
    rows = stale_pending_rows(ingest.repo, ingest.encoder_id, runtime.settings.ingest_stale_after_s)
    if rows:
        ledger = IngestLedger(ingest.repo)
        cursor = ledger.open_job(f"repair:{ingest.encoder_id}", "repair", ingest.encoder_id, resume=False)
        runtime.sender.send(ledger.submit(cursor.job_id, 0, rows))
        ledger.save_cursor(cursor.job_id, {"next_seq": len(rows), "dispatched": True})
        log.warning("re-submitted %d items left pending (job %d)", len(rows), cursor.job_id)
    return report | {"resubmitted": len(rows)}
