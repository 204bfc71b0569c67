"""The ingest service end to end in-process: decode → metadata → vectors → status, and its repairs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from app.config import Settings
from app.db.repo import MetadataRepo
from app.memory.base import item_id_for
from app.schemas import EmbedStatus
from app.services.ingest import IngestService, clean_caption, prepare_storage
from ingestion.pipeline import ingest_source


def _flickr_subset(shared_data: Path, tmp_path: Path, n_rows: int) -> Path:
    """A manifest of the first n caption rows of Flickr8k (5 captions per image), images copied."""
    src = shared_data / "flickr8k"
    rows = list(csv.DictReader(open(src / "manifest.csv", newline="", encoding="utf-8")))[:n_rows]
    out = tmp_path / "flickr-subset"
    (out / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(src / r["image"], out / r["image"])
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


@pytest.fixture
def service(settings: Settings, tiny_encoder) -> IngestService:  # type: ignore[no-untyped-def]
    prepare_storage(settings)
    return IngestService(settings, encoder=tiny_encoder)


def test_ingest_twice_is_idempotent_and_keeps_every_caption(
    service: IngestService, settings: Settings, shared_data: Path, tmp_path: Path
) -> None:
    manifest = _flickr_subset(shared_data, tmp_path, 40)
    first = ingest_source(manifest, settings, service=service, progress=False)
    assert (first["seen"], first["ingested"], first["duplicates"], first["failed"]) == (40, 40, 0, 0)
    second = ingest_source(manifest, settings, service=service, progress=False)
    assert (second["seen"], second["ingested"], second["duplicates"], second["failed"]) == (40, 0, 40, 0)
    assert service.memory.count() == 40  # 8 images x 5 captions: each pair is its own item
    m = service.memory.export_matrices()
    assert len(set(m.image_hashes)) == 8
    counts = MetadataRepo.from_url(settings.resolved_database_url).status_counts()
    assert counts == {service.encoder_id: {"embedded": 40}}


def test_same_image_same_vector_across_captions(service: IngestService, settings: Settings, shared_data: Path,
                                                tmp_path: Path) -> None:
    ingest_source(_flickr_subset(shared_data, tmp_path, 10), settings, service=service, progress=False)
    m = service.memory.export_matrices()
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(m.image_hashes):
        by_hash.setdefault(h, []).append(i)
    for rows in by_hash.values():
        assert (m.image[rows] == m.image[rows[0]]).all()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [("", "empty_caption"), ("   \n\t ", "empty_caption"), ("a\x00b", "bad_caption"), ("x" * 5000, "caption_too_long")],
)
def test_caption_rules(raw: str, reason: str) -> None:
    caption, problem = clean_caption(raw, max_chars=4000, required=True)
    assert problem is not None and problem.reason == reason


def test_caption_whitespace_is_normalised() -> None:
    assert clean_caption("  a  dog\n runs ", max_chars=100, required=True) == ("a dog runs", None)


def test_crash_between_vectors_and_status_is_reconciled(
    service: IngestService, settings: Settings, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _flickr_subset(shared_data, tmp_path, 10)
    repo = service.repo
    real_set_status = repo.set_status

    def crash_after_upsert(ids, encoder_id, status, *a, **kw):  # type: ignore[no-untyped-def]
        if status == EmbedStatus.EMBEDDED:
            raise RuntimeError("simulated crash after Qdrant acknowledged the vectors")
        return real_set_status(ids, encoder_id, status, *a, **kw)

    monkeypatch.setattr(repo, "set_status", crash_after_upsert)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest_source(manifest, settings, service=service, progress=False)
    monkeypatch.setattr(repo, "set_status", real_set_status)
    assert repo.status_counts()[service.encoder_id] == {"pending": 10}
    report = service.reconcile()
    assert report.marked_embedded == 10
    assert repo.status_counts()[service.encoder_id] == {"embedded": 10}
    # vectors lost behind our back: reconcile sends them back to pending, a re-run re-embeds them
    lost = service.memory.export_matrices().ids[:3]
    service.memory.delete(lost)
    assert service.reconcile().reset_to_pending == 3
    again = ingest_source(manifest, settings, service=service, progress=False)
    assert (again["ingested"], again["duplicates"]) == (3, 7)
    assert service.memory.count() == 10


def test_item_ids_match_qdrant_points(service: IngestService, settings: Settings, shared_data: Path,
                                      tmp_path: Path) -> None:
    manifest = _flickr_subset(shared_data, tmp_path, 5)
    ingest_source(manifest, settings, service=service, progress=False)
    m = service.memory.export_matrices()
    for pid, payload in zip(m.ids, m.payloads, strict=True):
        assert pid == payload.item_id == item_id_for(payload.image_hash, payload.caption)
