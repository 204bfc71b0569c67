"""Metadata on both dialects: the same migrations, the same repo calls, the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from app.db.repo import FailureRecord, MetadataRepo, NewItem
from app.db.session import downgrade_database, get_engine, upgrade_database
from app.schemas import EmbedStatus, JobStatus

TABLES = {"items", "embeddings", "ingest_jobs", "ingest_failures", "embedding_versions", "fusion_checkpoints",
          "eval_runs", "alembic_version"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.db'}"
    return request.getfixturevalue("postgres_url")


def _item(n: int, image: str = "a") -> NewItem:
    return NewItem(id=f"00000000-0000-0000-0000-{n:012d}", content_hash=f"{n:064d}", image_hash=image * 64,
                   caption=f"caption {n}", source_uri=f"/data/{n}.jpg", dataset="d", split="train", label=n % 3,
                   size_bytes=100 + n, width=10, height=12, extra={"k": str(n)})


def test_alembic_round_trip(db_url: str) -> None:
    upgrade_database(db_url)
    assert TABLES <= set(inspect(get_engine(db_url)).get_table_names())
    downgrade_database(db_url, "base")
    assert set(inspect(create_engine(db_url)).get_table_names()) <= {"alembic_version"}
    upgrade_database(db_url)
    assert TABLES <= set(inspect(create_engine(db_url)).get_table_names())


def test_repo_lifecycle(db_url: str) -> None:
    upgrade_database(db_url)
    repo = MetadataRepo.from_url(db_url)
    job = repo.create_job("/src", "folder", "enc")
    items = [_item(i) for i in range(5)]
    repo.add_pending(items, "enc")
    repo.add_pending(items[:2], "enc")  # idempotent: no duplicate rows, attempts counted
    assert repo.count_items() == 5
    assert set(repo.embedding_status([i.id for i in items], "enc").values()) == {EmbedStatus.PENDING}
    repo.set_status([items[0].id, items[1].id], "enc", EmbedStatus.EMBEDDED)
    repo.set_status([items[2].id], "enc", EmbedStatus.FAILED, "encode_error", "boom")
    assert repo.status_counts() == {"enc": {"embedded": 2, "failed": 1, "pending": 2}}
    repo.record_failures(job, [FailureRecord("/x.jpg", "corrupt", "bad bytes")])
    repo.add_job_counts(job, seen=6, ingested=5, failed=1)
    repo.add_job_counts(job, seen=1, duplicates=1)
    repo.finish_job(job, JobStatus.COMPLETED)
    got = repo.get_job(job)
    assert got is not None and (got.seen, got.ingested, got.duplicates, got.failed) == (7, 5, 1, 1)
    assert got.status == "completed" and got.finished_at is not None
    assert [f.reason for f in repo.job_failures(job)] == ["corrupt"]
    rows, total = repo.list_items(filters={"label": 1}, limit=10)
    assert total == 2 and {r.id for r in rows} == {items[1].id, items[4].id}
    for not_a_column in ("nope", "extra", "metadata", "registry", "__class__", "embeddings"):
        with pytest.raises(ValueError, match="cannot filter"):
            repo.list_items(filters={not_a_column: 1})
    assert repo.item_ids_with_status("enc", EmbedStatus.PENDING) == sorted([items[3].id, items[4].id])


def test_versions_and_live_flag(db_url: str) -> None:
    upgrade_database(db_url)
    repo = MetadataRepo.from_url(db_url)
    repo.ensure_version("enc-a", "col_a", "m", "", 64)
    repo.ensure_version("enc-a", "col_a", "m", "", 64)
    repo.ensure_version("enc-b", "col_b", "m", "tag", 64)
    repo.set_live_version("enc-a")
    repo.set_live_version("enc-b")
    live = [v.encoder_id for v in repo.versions() if v.is_live]
    assert live == ["enc-b"]
