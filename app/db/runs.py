"""Fusion checkpoints and evaluation runs in the metadata DB."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import EvalRun, FusionCheckpoint
from app.db.session import session_scope


@dataclass(frozen=True)
class CheckpointRecord:
    id: int
    path: str
    sha256: str
    encoder_id: str
    memory_version: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: FusionCheckpoint) -> CheckpointRecord:
        return cls(row.id, row.path, row.sha256, row.encoder_id, row.memory_version, dict(row.config or {}),
                   dict(row.metrics or {}), row.created_at)


def register_checkpoint(
    factory: sessionmaker[Session],
    *,
    path: str,
    sha256: str,
    encoder_id: str,
    memory_version: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> CheckpointRecord:
    """Idempotent on the file's sha256: registering the same file twice returns the first row."""
    with session_scope(factory) as session:
        row = session.scalars(select(FusionCheckpoint).where(FusionCheckpoint.sha256 == sha256)).first()
        if row is None:
            row = FusionCheckpoint(path=path, sha256=sha256, encoder_id=encoder_id, memory_version=memory_version,
                                   config=config, metrics=metrics)
            session.add(row)
            session.flush()
        return CheckpointRecord.of(row)


def newest_checkpoint(factory: sessionmaker[Session], encoder_id: str) -> CheckpointRecord | None:
    with session_scope(factory) as session:
        row = session.scalars(
            select(FusionCheckpoint).where(FusionCheckpoint.encoder_id == encoder_id)
            .order_by(FusionCheckpoint.created_at.desc(), FusionCheckpoint.id.desc()).limit(1)
        ).first()
        return CheckpointRecord.of(row) if row else None


def checkpoints_newest_first(factory: sessionmaker[Session], encoder_id: str) -> list[CheckpointRecord]:
    """Every checkpoint registered for ``encoder_id``, newest first."""
    with session_scope(factory) as session:
        rows = session.scalars(select(FusionCheckpoint).where(FusionCheckpoint.encoder_id == encoder_id)
                               .order_by(FusionCheckpoint.created_at.desc(), FusionCheckpoint.id.desc())).all()
        return [CheckpointRecord.of(row) for row in rows]


def checkpoint_by_sha256(factory: sessionmaker[Session], sha256: str) -> CheckpointRecord | None:
    with session_scope(factory) as session:
        row = session.scalars(select(FusionCheckpoint).where(FusionCheckpoint.sha256 == sha256)).first()
        return CheckpointRecord.of(row) if row else None


def store_eval_run(
    factory: sessionmaker[Session],
    report: dict[str, Any],
    *,
    checkpoint_id: int | None,
    options: dict[str, Any] | None = None,
) -> list[int]:
    """One EvalRun row per (dataset, task) of a report; ``best_value`` = the best mode's first metric."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in report["results"]:
        groups.setdefault((row["dataset"], row["task"]), []).append(row)
    ids: list[int] = []
    with session_scope(factory) as session:
        for (dataset, task), rows in groups.items():
            primary = rows[0]["metric"]
            run = EvalRun(
                dataset=dataset, task=task, encoder_id=report["encoder_id"], checkpoint_id=checkpoint_id,
                memory_size=report["memory_size"], k=report["k"],
                near_duplicates_removed=report["near_duplicates_removed"], options=options or {},
                results={"rows": rows, "checkpoint": report.get("checkpoint")},
                best_value=max(r["value"] for r in rows if r["metric"] == primary),
            )
            session.add(run)
            session.flush()
            ids.append(run.id)
    return ids


def eval_runs(factory: sessionmaker[Session], *, dataset: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    with session_scope(factory) as session:
        query = select(EvalRun).order_by(EvalRun.created_at.desc(), EvalRun.id.desc()).limit(limit)
        if dataset is not None:
            query = query.where(EvalRun.dataset == dataset)
        return [
            {"id": r.id, "dataset": r.dataset, "task": r.task, "encoder_id": r.encoder_id,
             "checkpoint_id": r.checkpoint_id, "memory_size": r.memory_size, "k": r.k,
             "near_duplicates_removed": r.near_duplicates_removed, "best_value": r.best_value,
             "results": r.results, "options": r.options, "created_at": r.created_at}
            for r in session.scalars(query)
        ]
