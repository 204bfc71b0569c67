"""Defect 2: every field is validated and capped before a database sees it — the same on SQLite and
PostgreSQL. One long or NUL-containing field fails its row, with a reason; the rest of the job is ingested."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.config import Settings
from app.manifest import MAX_DATASET_CHARS, MAX_EXTRA_BYTES, MAX_SPLIT_CHARS
from app.schemas import JobStatus
from tests.reliability.conftest import ReliabilitySummary

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "clothing10" / "images"

BAD_ROWS = {
    "split over 32 chars": {"split": "s" * (MAX_SPLIT_CHARS + 1)},
    "dataset over 128 chars": {"dataset": "d" * (MAX_DATASET_CHARS + 1)},
    "NUL in dataset": {"dataset": "a\x00b"},
    "NUL in split": {"split": "tr\x00ain"},
    "control char in split": {"split": "tr\x1bain"},
    "extra too large": {"notes": "x" * (MAX_EXTRA_BYTES + 10)},
    "too many extra keys": {f"k{i}": i for i in range(100)},
    "NUL in extra value": {"notes": "a\x00b"},
    "extra key too long": {"k" * 100: "v"},
}


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for image in sorted(SAMPLE.glob("*.jpg"))[:n]:
        shutil.copy(image, folder / image.name)
        names.append(image.name)
    return names


def _manifest(folder: Path) -> tuple[Path, int, int]:
    names = _images(folder, 3 + len(BAD_ROWS))
    rows = [{"image": names[i], "caption": f"good picture {i}", "split": "train", "dataset": "ok"} for i in range(3)]
    for i, (name, fields) in enumerate(BAD_ROWS.items()):
        rows.append({"image": names[3 + i], "caption": f"bad row {name}"} | fields)
    manifest = folder / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, 3, len(BAD_ROWS)


def _ingest_and_check(settings: Settings, folder: Path, reliability: ReliabilitySummary, way: str) -> None:
    from app.services.ingest import prepare_storage
    from ingestion.pipeline import ingest_source

    prepare_storage(settings)
    manifest, good, bad = _manifest(folder)
    summary = ingest_source(manifest, settings, progress=False)
    assert summary["status"] == JobStatus.COMPLETED, summary
    assert summary["ingested"] == good and summary["failed"] == bad, summary
    reasons = {f["reason"] for f in summary["failures"]}
    assert reasons == {"bad_row"}, summary["failures"]
    for failure in summary["failures"]:
        assert failure["detail"] and "SQL" not in failure["detail"], failure
    for name in BAD_ROWS:
        reliability.outcome("metadata field", name, way, "refused, rest ingested", "refused, rest ingested")
    reliability.scenario(f"field limits, {way}", submitted=good + bad, embedded=good, failed=bad, lost=0,
                         duplicated=0)


def test_field_limits_sqlite(settings: Settings, tmp_path: Path, reliability: ReliabilitySummary) -> None:
    _ingest_and_check(settings, tmp_path / "m", reliability, "jsonl, SQLite")


def test_field_limits_postgres(settings: Settings, tmp_path: Path, postgres_url: str,
                               reliability: ReliabilitySummary) -> None:
    pg = settings.model_copy(update={"database_url": postgres_url})
    _ingest_and_check(pg, tmp_path / "m", reliability, "jsonl, PostgreSQL")


def test_long_folder_name_is_cut_not_fatal(settings: Settings, tmp_path: Path, postgres_url: str) -> None:
    from ingestion.pipeline import ingest_source

    folder = tmp_path / ("f" * 200)
    for i, name in enumerate(_images(folder, 2)):
        (folder / name).with_suffix(".txt").write_text(f"caption {i}")
    from app.services.ingest import prepare_storage

    pg = settings.model_copy(update={"database_url": postgres_url})
    prepare_storage(pg)
    summary = ingest_source(folder, pg, progress=False)
    assert summary["ingested"] == 2 and summary["failed"] == 0, summary
    from app.db.repo import MetadataRepo

    items, _ = MetadataRepo.from_url(postgres_url).list_items(limit=10)
    assert {len(i.dataset or "") for i in items} == {MAX_DATASET_CHARS}


def test_service_refuses_bad_fields_from_any_source(settings: Settings, tmp_path: Path, postgres_url: str) -> None:
    """Rows that did not come through a manifest (an API upload, a worker's ledger row) meet the same checks."""
    from PIL import Image

    from app.manifest import InputRow
    from app.services.ingest import IngestService, PreparedItem, prepare_storage

    pg = settings.model_copy(update={"database_url": postgres_url})
    prepare_storage(pg)
    service = IngestService(pg)
    image = Image.new("RGB", (32, 32), "red")
    rows = [InputRow(source="ok", path=None, url=None, caption="fine", split="train"),
            InputRow(source="bad", path=None, url=None, caption="fine too", split="x" * 40, dataset="d\x00")]
    prepared = [PreparedItem(row=r, image_hash=f"{i:064x}", size_bytes=10, image=image) for i, r in enumerate(rows)]
    outcome = service.write_batch(None, prepared)
    assert outcome.ingested == 1 and outcome.failed == 1, outcome
    assert outcome.failures[0].reason == "bad_row"


@pytest.mark.parametrize("value", ["a" * 5000])
def test_unchecked_value_fails_only_its_row_on_postgres(settings: Settings, postgres_url: str, value: str) -> None:
    """Belt and braces: a value the checks miss but the database refuses fails its row, not the batch."""
    from PIL import Image

    from app.manifest import InputRow
    from app.services.ingest import IngestService, PreparedItem, prepare_storage

    pg = settings.model_copy(update={"database_url": postgres_url})
    prepare_storage(pg)
    service = IngestService(pg)
    image = Image.new("RGB", (32, 32), "blue")
    rows = [InputRow(source="ok", path=None, url=None, caption="fine"),
            InputRow(source="bad", path=None, url=None, caption="also fine")]
    prepared = [PreparedItem(row=r, image_hash=f"{i + 7:064x}", size_bytes=10, image=image)
                for i, r in enumerate(rows)]
    import app.services.ingest as ingest_module

    original = ingest_module._new_item

    def poisoned(p, caption):  # type: ignore[no-untyped-def]
        item = original(p, caption)
        if p.row.source == "bad":  # a content hash longer than its column: PostgreSQL refuses it
            object.__setattr__(item, "content_hash", value)
        return item

    ingest_module._new_item = poisoned
    try:
        outcome = service.write_batch(None, prepared)
    finally:
        ingest_module._new_item = original
    assert outcome.ingested == 1 and outcome.failed == 1, outcome
    assert "database refused" in (outcome.failures[0].detail or "")


def test_field_limits_async_postgres(settings: Settings, tmp_path: Path, postgres_url: str,
                                     tiny_encoder, reliability: ReliabilitySummary) -> None:  # type: ignore[no-untyped-def]
    """The async path (ledger rows in PostgreSQL, an embed batch service) refuses the same rows, keeps the rest."""
    from app.services.ingest import IngestService, prepare_storage
    from app.services.ingest_async import EmbedBatchService
    from app.services.ingest_ledger import IngestLedger
    from ingestion.dispatch import dispatch_source, make_decoder
    from tests.integration.test_workers_services import ListSender, drain

    pg = settings.model_copy(update={"database_url": postgres_url})
    prepare_storage(pg)
    ingest = IngestService(pg, encoder=tiny_encoder)
    service = EmbedBatchService(ingest, make_decoder(pg, ingest.encoder))
    manifest, good, bad = _manifest(tmp_path / "m")
    sender = ListSender()
    summary = dispatch_source(manifest, pg, sender, progress=False)
    assert summary["submitted"] == good + bad, summary
    drain(service, sender.sent)
    states = IngestLedger(ingest.repo).task_states(summary["job_id"])
    assert states == {"embedded": good, "failed": bad}, states
    assert ingest.memory.count() == good
    reliability.scenario("field limits, jsonl, PostgreSQL, async", submitted=good + bad, embedded=good, failed=bad,
                         lost=0, duplicated=0)
