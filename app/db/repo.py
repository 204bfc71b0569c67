"""Queries over the metadata. Every statement is built with SQLAlchemy (bound parameters only)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Embedding, EmbeddingVersion, IngestFailure, IngestJob, Item, utcnow
from app.db.session import make_session_factory, session_scope
from app.schemas import EmbedStatus, JobStatus


@dataclass(frozen=True)
class NewItem:
    id: str
    content_hash: str
    image_hash: str
    caption: str
    source_uri: str
    dataset: str | None
    split: str | None
    label: int | None
    size_bytes: int
    width: int | None
    height: int | None
    extra: dict[str, Any]


_HOST = socket.gethostname()[:100]


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (start time in ticks since boot, so a reused pid is not taken for it)."""
    pid = os.getpid() if pid is None else pid
    return f"{_HOST}:{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:  # noqa: BLE001 - no psutil, no such process: the pid alone identifies it
        return "?"


def owner_alive(owner: str) -> bool:
    """Is the process named by ``owner`` (``process_identity``) still running?"""
    parts = owner.split(":")
    if len(parts) < 3 or not parts[-2].isdigit():
        return True  # not ours to judge
    pid, started = int(parts[-2]), parts[-1]
    try:
        import psutil

        if not psutil.pid_exists(pid):
            return False
        if started == "?":
            return True
        return f"{psutil.Process(pid).create_time():.2f}" == started and \
            psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - the process vanished between the calls
        return False


@dataclass(frozen=True)
class FailureRecord:
    source: str
    reason: str
    detail: str | None = None


FILTERABLE_ITEM_COLUMNS = frozenset(c.key for c in Item.__table__.columns if c.key != "extra")


def _insert_ignore(session: Session, model: type, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """INSERT … ON CONFLICT DO NOTHING on both dialects: re-running an ingestion is idempotent."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(model).values(rows).on_conflict_do_nothing(index_elements=keys)
    session.execute(stmt)


class MetadataRepo:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    @classmethod
    def from_url(cls, url: str) -> MetadataRepo:
        return cls(make_session_factory(url))

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.session_factory)

    # --- jobs ---------------------------------------------------------------------------------
    def create_job(self, source: str, kind: str, encoder_id: str) -> int:
        with self.session() as s:
            job = IngestJob(source=source, kind=kind, encoder_id=encoder_id, status=JobStatus.RUNNING,
                            seen=0, ingested=0, duplicates=0, failed=0, owner=process_identity())
            s.add(job)
            s.flush()
            return job.id

    def add_job_counts(
        self, job_id: int, *, seen: int = 0, ingested: int = 0, duplicates: int = 0, failed: int = 0,
        cursor: str | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "seen": IngestJob.seen + seen,
            "ingested": IngestJob.ingested + ingested,
            "duplicates": IngestJob.duplicates + duplicates,
            "failed": IngestJob.failed + failed,
        }
        if cursor is not None:
            values["cursor"] = cursor
        with self.session() as s:
            s.execute(update(IngestJob).where(IngestJob.id == job_id).values(**values))

    def finish_job(self, job_id: int, status: JobStatus, error: str | None = None) -> None:
        with self.session() as s:
            s.execute(update(IngestJob).where(IngestJob.id == job_id)
                      .values(status=status, error=error, finished_at=utcnow()))

    def fail_orphaned_jobs(self) -> list[int]:
        """Running jobs whose process (on this host) is gone become *failed*: nothing will ever finish them.

        A job started by a process on another host is left alone (its process cannot be checked from here).
        """
        host = _HOST
        with self.session() as s:
            running = list(s.execute(select(IngestJob.id, IngestJob.owner).where(
                IngestJob.status == JobStatus.RUNNING, IngestJob.owner.is_not(None))))
            dead = [(job_id, str(owner)) for job_id, owner in running
                    if owner and owner.split(":", 1)[0] == host and not owner_alive(owner)]
            for job_id, owner in dead:
                pid = owner.split(":")[1] if owner.count(":") >= 2 else "?"
                s.execute(update(IngestJob).where(IngestJob.id == job_id, IngestJob.status == JobStatus.RUNNING)
                          .values(status=JobStatus.FAILED, finished_at=utcnow(),
                                  error=f"the process that ran it (pid {pid}) ended before the job finished "
                                        "(killed?): run the ingestion again (items already stored are kept)"))
        return [job_id for job_id, _ in dead]

    def get_job(self, job_id: int) -> IngestJob | None:
        self.fail_orphaned_jobs()
        with self.session() as s:
            return s.get(IngestJob, job_id)

    def latest_job(self) -> IngestJob | None:
        self.fail_orphaned_jobs()
        with self.session() as s:
            return s.scalars(select(IngestJob).order_by(IngestJob.id.desc()).limit(1)).first()

    def recent_jobs(self, limit: int = 20) -> list[IngestJob]:
        self.fail_orphaned_jobs()
        with self.session() as s:
            return list(s.scalars(select(IngestJob).order_by(IngestJob.id.desc()).limit(limit)))

    def record_failures(self, job_id: int, failures: Iterable[FailureRecord]) -> None:
        rows = [IngestFailure(job_id=job_id, source=f.source, reason=f.reason, detail=f.detail) for f in failures]
        if rows:
            with self.session() as s:
                s.add_all(rows)

    def job_failures(self, job_id: int, limit: int | None = None) -> list[IngestFailure]:
        with self.session() as s:
            stmt = select(IngestFailure).where(IngestFailure.job_id == job_id).order_by(IngestFailure.id)
            return list(s.scalars(stmt.limit(limit) if limit else stmt))

    # --- items and their embedding status ------------------------------------------------------
    def embedding_status(self, item_ids: Sequence[str], encoder_id: str) -> dict[str, str]:
        if not item_ids:
            return {}
        with self.session() as s:
            stmt = select(Embedding.item_id, Embedding.status).where(
                Embedding.encoder_id == encoder_id, Embedding.item_id.in_(list(item_ids)))
            return {row[0]: row[1] for row in s.execute(stmt)}

    def add_pending(self, items: Sequence[NewItem], encoder_id: str) -> None:
        """Items (once) and a pending status row per encoder; committed before vectors are written."""
        with self.session() as s:
            _insert_ignore(s, Item, [vars(i) | {"created_at": utcnow()} for i in items], ["id"])
            _insert_ignore(s, Embedding, [
                {"item_id": i.id, "encoder_id": encoder_id, "status": EmbedStatus.PENDING, "attempts": 0,
                 "updated_at": utcnow()} for i in items], ["item_id", "encoder_id"])
            ids = [i.id for i in items]
            s.execute(update(Embedding)
                      .where(Embedding.encoder_id == encoder_id, Embedding.item_id.in_(ids))
                      .values(status=EmbedStatus.PENDING, reason=None, detail=None,
                              attempts=Embedding.attempts + 1, updated_at=utcnow()))

    def set_status(
        self, item_ids: Sequence[str], encoder_id: str, status: EmbedStatus,
        reason: str | None = None, detail: str | None = None,
    ) -> None:
        if not item_ids:
            return
        with self.session() as s:
            s.execute(update(Embedding)
                      .where(Embedding.encoder_id == encoder_id, Embedding.item_id.in_(list(item_ids)))
                      .values(status=status, reason=reason, detail=detail, updated_at=utcnow()))

    def item_ids_with_status(self, encoder_id: str, status: EmbedStatus, limit: int = 1000) -> list[str]:
        with self.session() as s:
            stmt = (select(Embedding.item_id)
                    .where(Embedding.encoder_id == encoder_id, Embedding.status == status)
                    .order_by(Embedding.item_id).limit(limit))
            return list(s.scalars(stmt))

    def get_items(self, item_ids: Sequence[str]) -> list[Item]:
        with self.session() as s:
            return list(s.scalars(select(Item).where(Item.id.in_(list(item_ids)))))

    def list_items(
        self, *, filters: dict[str, Any] | None = None, offset: int = 0, limit: int = 50,
        caption_contains: str | None = None, include_deleted: bool = False,
    ) -> tuple[list[Item], int]:
        stmt: Select[Any] = select(Item)
        if not include_deleted:
            stmt = stmt.where(Item.deleted_at.is_(None))
        if caption_contains:
            escaped = caption_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(Item.caption.ilike(f"%{escaped}%", escape="\\"))  # bound parameter
        for key, value in (filters or {}).items():
            # only real, scalar columns: getattr on a mapped class would also find methods and the registry
            if key not in FILTERABLE_ITEM_COLUMNS:
                allowed = ", ".join(sorted(FILTERABLE_ITEM_COLUMNS))
                raise ValueError(f"cannot filter items on {key!r} (one of {allowed})")
            column = getattr(Item, key)
            stmt = stmt.where(column == value)  # bound parameter, never string building
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = s.scalars(stmt.order_by(Item.created_at, Item.id).offset(offset).limit(limit))
            return list(rows), int(total)

    def captions_of_images(self, image_hashes: Sequence[str]) -> dict[str, list[str]]:
        """Every caption the memory holds for each image (by image hash; taken-down items left out), oldest
        first: one image shown once with all its captions."""
        wanted = [h for h in dict.fromkeys(image_hashes) if h]
        if not wanted:
            return {}
        out: dict[str, list[str]] = {}
        with self.session() as s:
            rows = s.execute(select(Item.image_hash, Item.caption)
                             .where(Item.image_hash.in_(wanted), Item.deleted_at.is_(None))
                             .order_by(Item.created_at, Item.id))
            for image_hash, caption in rows:
                captions = out.setdefault(image_hash, [])
                if caption and caption not in captions:
                    captions.append(caption)
        return out

    def mark_deleted(self, item_id: str, reason: str) -> Item | None:
        """Takedown: the row stays as the record of it (time, reason); its embeddings rows go."""
        with self.session() as s:
            item = s.get(Item, item_id)
            if item is None:
                return None
            if item.deleted_at is None:
                item.deleted_at, item.deleted_reason = utcnow(), reason[:2000]
                for embedding in list(item.embeddings):
                    s.delete(embedding)
            s.flush()
            s.expunge(item)
            return item

    def deleted_among(self, item_ids: Sequence[str]) -> dict[str, Item]:
        """The taken-down items among ``item_ids`` (ingestion refuses them: a takedown sticks)."""
        if not item_ids:
            return {}
        with self.session() as s:
            rows = s.scalars(select(Item).where(Item.id.in_(list(item_ids)), Item.deleted_at.is_not(None)))
            return {r.id: r for r in rows}

    def count_deleted(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Item).where(Item.deleted_at.is_not(None))) or 0)

    def item_embeddings(self, item_id: str) -> list[Embedding]:
        """One item's status under every embedding version (the UI's item page)."""
        with self.session() as s:
            return list(s.scalars(select(Embedding).where(Embedding.item_id == item_id)
                                  .order_by(Embedding.updated_at, Embedding.encoder_id)))

    def distinct_values(self, field: str, limit: int = 500) -> list[Any]:
        """Distinct non-null values of a filterable item column (``dataset``, ``split``, ``label``)."""
        if field not in {"dataset", "split", "label"}:
            raise ValueError(f"no distinct values for {field!r}")
        column = getattr(Item, field)
        with self.session() as s:
            return list(s.scalars(select(column).where(column.is_not(None)).distinct().order_by(column).limit(limit)))

    def distinct_captions(self, limit: int = 500_000) -> list[str]:
        """The distinct captions of the items in the memory (not taken down)."""
        with self.session() as s:
            return list(s.scalars(select(Item.caption).where(Item.deleted_at.is_(None)).distinct().limit(limit)))

    def count_items(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Item)) or 0)

    def has_extra_column(self, column: str) -> bool:
        """Does any item carry ``column`` among its manifest's extra columns?"""
        with self.session() as s:
            return s.scalar(select(Item.id).where(Item.extra[column].as_string().is_not(None)).limit(1)) is not None

    def status_counts(self) -> dict[str, dict[str, int]]:
        """{encoder_id: {status: count}}"""
        with self.session() as s:
            stmt = select(Embedding.encoder_id, Embedding.status, func.count()).group_by(
                Embedding.encoder_id, Embedding.status)
            out: dict[str, dict[str, int]] = {}
            for encoder_id, status, n in s.execute(stmt):
                out.setdefault(encoder_id, {})[status] = int(n)
            return out

    # --- embedding versions ---------------------------------------------------------------------
    def ensure_version(self, encoder_id: str, collection: str, model: str, pretrained: str, dim: int) -> None:
        with self.session() as s:
            _insert_ignore(s, EmbeddingVersion, [{
                "encoder_id": encoder_id, "collection": collection, "model": model, "pretrained": pretrained,
                "dim": dim, "status": "building", "is_live": False, "total": 0, "done": 0,
                "created_at": utcnow(), "updated_at": utcnow()}], ["encoder_id"])

    def set_live_version(self, encoder_id: str) -> None:
        with self.session() as s:
            s.execute(update(EmbeddingVersion).values(is_live=False))
            s.execute(update(EmbeddingVersion).where(EmbeddingVersion.encoder_id == encoder_id)
                      .values(is_live=True, status="live", updated_at=utcnow()))

    def versions(self) -> list[EmbeddingVersion]:
        with self.session() as s:
            return list(s.scalars(select(EmbeddingVersion).order_by(EmbeddingVersion.created_at)))

    def update_version_progress(self, encoder_id: str, *, total: int | None = None, done: int | None = None,
                                status: str | None = None) -> None:
        values: dict[str, Any] = {"updated_at": utcnow()}
        if total is not None:
            values["total"] = total
        if done is not None:
            values["done"] = done
        if status is not None:
            values["status"] = status
        with self.session() as s:
            s.execute(update(EmbeddingVersion).where(EmbeddingVersion.encoder_id == encoder_id).values(**values))


def as_dict(row: Any) -> dict[str, Any]:
    """A model row as a plain dict (for --json and the UI)."""
    out = {}
    for column in row.__table__.columns:
        value = getattr(row, column.key)
        out[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return out
