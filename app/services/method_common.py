"""What training, evaluation and prediction share: the memory as cached matrices, the checkpoint to use,
the metadata DB, the device.

Exporting a memory collection is the slow part of ``reco train``/``reco eval``; the export is cached
as ``.npz`` under ``<data_dir>/cache/memory``, keyed by collection, its point count and the payload
filter. Ingestion only adds points, so a changed count means a changed memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import Settings
from app.db.factory import SessionFactory, migrated_session_factory
from app.db.runs import CheckpointRecord, checkpoint_by_sha256, checkpoints_newest_first, newest_checkpoint
from app.encoder.openclip import collection_name_for
from app.encoder.weights import file_sha256
from app.errors import UsageError
from app.fusion.checkpoint import MIN_DEFAULT_PAIRS, committed_checkpoint_for, trained_pairs
from app.memory.base import Filters, ItemPayload, MemoryMatrices, VectorMemory
from app.memory.exact import ExactIndex
from app.memory.store import open_store

log = logging.getLogger(__name__)


class MethodError(RuntimeError):
    """A precondition of training/evaluation is not met (empty memory, no checkpoint, ...)."""


class CheckpointNotFound(MethodError, UsageError):
    """A fusion checkpoint path that names no file (a usage error: exit 2)."""


def resolve_device(settings: Settings) -> str:
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def session_factory_for(settings: Settings) -> SessionFactory:
    """The metadata DB, migrated to head first (idempotent, as the ingest service does)."""
    return migrated_session_factory(settings.resolved_database_url)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def memory_for_encoder(settings: Settings, encoder_id: str) -> VectorMemory:
    memory = open_store(settings).collection(collection_name_for(encoder_id))
    if not memory.exists() or memory.count() == 0:
        raise MethodError(f"the memory holds no embeddings for encoder {encoder_id}: run `reco ingest` first")
    return memory


def _cache_path(settings: Settings, memory: VectorMemory, filters: Filters | None) -> Path:
    key = json.dumps({"collection": memory.collection, "count": memory.count(),
                      "filters": {k: filters[k] for k in sorted(filters)} if filters else None}, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.data_dir / "cache" / "memory" / f"{safe_name(memory.collection)}-{digest}.npz"


def load_matrices(settings: Settings, memory: VectorMemory, filters: Filters | None = None) -> MemoryMatrices:
    """The memory (or the rows matching ``filters``) as matrices, from the cache when it is current."""
    path = _cache_path(settings, memory, filters)
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            payloads = [ItemPayload.model_validate_json(p) for p in data["payloads"].tolist()]
            return MemoryMatrices(ids=data["ids"].tolist(), image=data["image"], text=data["text"],
                                  image_hashes=data["image_hashes"].tolist(), payloads=payloads)
    matrices = memory.export_matrices(filters=filters)
    tmp = path.with_suffix(".tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, ids=np.asarray(matrices.ids, dtype=str), image=matrices.image, text=matrices.text,
                 image_hashes=np.asarray(matrices.image_hashes, dtype=str),
                 payloads=np.asarray([p.model_dump_json() for p in matrices.payloads], dtype=str))
        tmp.replace(path)
    except OSError as exc:  # a full disk costs the cache, not the training or evaluation run
        tmp.unlink(missing_ok=True)
        log.warning("memory matrices not cached at %s: %s", path, exc)
        return matrices
    log.info("cached %d memory rows at %s", len(matrices), path)
    return matrices


def exact_index(settings: Settings, matrices: MemoryMatrices, *, version: str | None = None) -> ExactIndex:
    return ExactIndex.from_matrices(matrices, dtype=settings.exact_index_dtype, chunk=settings.exact_index_chunk,
                                    device=resolve_device(settings), version=version)


def resolve_checkpoint(
    settings: Settings, encoder_id: str, explicit: Path | str | None, factory: SessionFactory
) -> tuple[Path, CheckpointRecord | None]:
    """An explicit file, else RECO_FUSION_CHECKPOINT, else the newest registered for ``encoder_id``."""
    chosen = explicit or settings.fusion_checkpoint or None
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise CheckpointNotFound(f"fusion checkpoint not found: {path}: give an existing file "
                                     "(--checkpoint or RECO_FUSION_CHECKPOINT), or leave it empty for the newest")
        return path, checkpoint_by_sha256(factory, file_sha256(path))
    found, record = default_checkpoint(factory, encoder_id)
    if found is not None:
        path = found
        if record is None:  # the committed default: registered only if someone registered that file
            record = checkpoint_by_sha256(factory, file_sha256(path))
        elif trained_pairs(record.metrics) < MIN_DEFAULT_PAIRS:
            # No default for this encoder: the newest one is used, but never silently (log and label say so).
            log.warning("no fusion checkpoint trained on >= %d pairs and no committed default for %s: using %s, "
                        "trained on %d pairs", MIN_DEFAULT_PAIRS, encoder_id, path, trained_pairs(record.metrics))
        return path, record
    raise MethodError(f"no fusion checkpoint registered for encoder {encoder_id}: run `reco train` first "
                      "(or evaluate with --modes clip)")


def default_checkpoint(factory: SessionFactory, encoder_id: str) -> tuple[Path | None, CheckpointRecord | None]:
    """What a command uses when no checkpoint is named: the newest registered one trained on enough pairs, else
    the committed default for the encoder, else the newest registered one (small), else none."""
    record = eligible_checkpoint(factory, encoder_id)
    if record is not None and Path(record.path).is_file():
        return Path(record.path), record
    committed = committed_checkpoint_for(encoder_id)
    if committed is not None:
        return committed, None
    small = newest_checkpoint(factory, encoder_id)
    if small is not None and Path(small.path).is_file():
        return Path(small.path), small
    return None, None


def eligible_checkpoint(factory: SessionFactory, encoder_id: str) -> CheckpointRecord | None:
    """The newest registered checkpoint for ``encoder_id`` trained on at least ``MIN_DEFAULT_PAIRS`` pairs."""
    return next((record for record in checkpoints_newest_first(factory, encoder_id)
                 if trained_pairs(record.metrics) >= MIN_DEFAULT_PAIRS), None)


def checkpoint_label(path: Path, record: CheckpointRecord | None) -> str:
    label = f"{record.id}:{path.name}" if record else str(path)
    if record is not None and trained_pairs(record.metrics) < MIN_DEFAULT_PAIRS:
        label += f" (small: trained on {trained_pairs(record.metrics)} pairs)"
    return label


def describe_filters(filters: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((filters or {}).items())) or "all"
