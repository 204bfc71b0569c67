"""The truth about items, embeddings, jobs, checkpoints and evaluation runs.

Portable types only, so the same models and migrations run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names: Alembic needs them to drop constraints on both dialects.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Item(Base):
    """One image-text pair. ``id`` is derived from ``content_hash`` (image bytes + caption)."""

    __tablename__ = "items"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    image_hash: Mapped[str] = mapped_column(String(64), index=True)
    caption: Mapped[str] = mapped_column(Text)
    source_uri: Mapped[str] = mapped_column(Text)
    dataset: Mapped[str | None] = mapped_column(String(128), index=True)
    split: Mapped[str | None] = mapped_column(String(32), index=True)
    label: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Takedown: vectors removed from every version, the row kept as the record of it; never returned again.
    deleted_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    deleted_reason: Mapped[str | None] = mapped_column(Text, default=None)

    embeddings: Mapped[list[Embedding]] = relationship(back_populates="item", cascade="all, delete-orphan")


class Embedding(Base):
    """Status of one item under one embedding version (encoder id)."""

    __tablename__ = "embeddings"
    __table_args__ = (Index("ix_embeddings_encoder_status", "encoder_id", "status"),)

    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    encoder_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # EmbedStatus
    reason: Mapped[str | None] = mapped_column(String(64))  # RejectReason when failed
    detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    item: Mapped[Item] = relationship(back_populates="embeddings")


class IngestJob(Base):
    __tablename__ = "ingest_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))  # folder | manifest | upload | watch
    encoder_id: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # JobStatus
    seen: Mapped[int] = mapped_column(Integer, default=0)
    ingested: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cursor: Mapped[str | None] = mapped_column(Text)  # resume point (last row / file processed)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    # host:pid:process start time of the process running it (app.db.repo.process_identity); None = not one
    # process's (async jobs live in the ledger). A running job whose process is gone is failed on sight.
    owner: Mapped[str | None] = mapped_column(String(160), default=None)

    failures: Mapped[list[IngestFailure]] = relationship(back_populates="job", cascade="all, delete-orphan")


class IngestFailure(Base):
    """An input that never became an item, with the reason a human can read."""

    __tablename__ = "ingest_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("ingest_jobs.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(64))  # RejectReason
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[IngestJob] = relationship(back_populates="failures")


class IngestTask(Base):
    """One submitted row of an asynchronous ingest job: the exactly-once ledger.

    Written (state ``queued``) before its message is sent; a worker moves it to ``embedded`` or
    ``failed`` once, with a conditional update, so a redelivered message changes nothing. Rows still
    queued after their message was lost (broker restart) are found here and sent again.
    """

    __tablename__ = "ingest_tasks"
    __table_args__ = (Index("ix_ingest_tasks_state_enqueued", "state", "enqueued_at"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("ingest_jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # row number within the job
    source: Mapped[str] = mapped_column(Text)
    row: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the InputRow, as JSON
    state: Mapped[str] = mapped_column(String(16))  # queued | embedded | failed
    item_id: Mapped[str | None] = mapped_column(String(36), index=True)
    reason: Mapped[str | None] = mapped_column(String(64))  # RejectReason when failed
    detail: Mapped[str | None] = mapped_column(Text)
    sends: Mapped[int] = mapped_column(Integer, default=1)  # messages sent for this row (>1: re-sent)
    enqueued_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column()  # a worker started on it
    finished_at: Mapped[datetime | None] = mapped_column()


class EmbeddingVersion(Base):
    """One Qdrant collection = one encoder id; ``is_live`` mirrors the alias."""

    __tablename__ = "embedding_versions"

    encoder_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    collection: Mapped[str] = mapped_column(String(255), unique=True)
    model: Mapped[str] = mapped_column(String(128))
    pretrained: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # building | ready | live | dropped
    is_live: Mapped[bool] = mapped_column(Boolean, default=False)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class FusionCheckpoint(Base):
    __tablename__ = "fusion_checkpoints"
    __table_args__ = (UniqueConstraint("sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    encoder_id: Mapped[str] = mapped_column(String(200), index=True)
    memory_version: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalRun(Base):
    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset: Mapped[str] = mapped_column(String(255))
    task: Mapped[str] = mapped_column(String(64))
    encoder_id: Mapped[str] = mapped_column(String(200))
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("fusion_checkpoints.id", ondelete="SET NULL"))
    memory_size: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    near_duplicates_removed: Mapped[int] = mapped_column(Integer, default=0)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    best_value: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A key for ``reco serve``'s HTTP API: only its SHA-256 is stored; scopes ``read``, ``write``, ``admin``."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # the key's first characters, to find it
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
