"""Defect 3: lost vectors are restored.

Metadata that says *embedded* beside a collection that lacks the vectors (a store removed, points lost):
``reco status`` says how many, a re-ingest embeds them again (never "duplicates"), and ``reco memory
reconcile`` re-embeds exactly the missing items.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from app.config import Settings
from app.db.repo import MetadataRepo
from app.memory.store import close_stores, open_store
from tests.reliability.conftest import ReliabilitySummary

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "clothing10" / "images"


def _manifest(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i, image in enumerate(sorted(SAMPLE.glob("*.jpg"))[:n]):
        shutil.copy(image, folder / image.name)
        rows.append(f"{image.name},picture {i} of the lost vectors test")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    return folder / "m.csv"


def _live_memory(settings: Settings):  # type: ignore[no-untyped-def]
    store = open_store(settings)
    return store.collection(store.live_collection(settings.memory_alias) or "")


def test_lost_vectors_are_noticed_restored_and_never_duplicates(
    settings: Settings, tmp_path: Path, reliability: ReliabilitySummary,
) -> None:
    from app.services.ingest import prepare_storage
    from app.services.restore import missing_vector_ids, restore_lost_vectors
    from app.services.status import memory_status
    from ingestion.pipeline import ingest_source

    prepare_storage(settings)
    manifest = _manifest(tmp_path / "m", 12)
    first = ingest_source(manifest, settings, progress=False)
    assert first["ingested"] == 12
    repo = MetadataRepo.from_url(settings.resolved_database_url)
    memory = _live_memory(settings)
    ids = sorted(p.item_id for page in memory.scroll() for p in page)
    assert len(ids) == 12

    # some points lost: status notices exactly those, reconcile re-embeds exactly those
    lost = ids[:5]
    memory.delete(lost)
    encoder_id = next(iter(repo.status_counts()))
    assert memory_status(settings)["missing_vectors"] == {encoder_id: 5}
    assert sorted(missing_vector_ids(repo, memory, encoder_id)) == lost
    out = restore_lost_vectors(settings)
    assert (out["missing"], out["restored"], out["failed"]) == (5, 5, 0), out
    assert memory.count() == 12 and memory_status(settings)["missing_vectors"] == {}
    assert restore_lost_vectors(settings)["missing"] == 0  # idempotent

    # the whole store removed: re-ingest embeds everything again, not "duplicates 12"
    close_stores()
    shutil.rmtree(settings.resolved_memory_path or "")
    assert memory_status(settings)["missing_vectors"] == {encoder_id: 12}
    again = ingest_source(manifest, settings, progress=False)
    assert (again["ingested"], again["duplicates"]) == (12, 0), again
    memory = _live_memory(settings)
    assert memory.count() == 12
    third = ingest_source(manifest, settings, progress=False)
    assert (third["ingested"], third["duplicates"]) == (0, 12), third  # now they are duplicates
    hits = memory.existing_ids(ids)
    reliability.scenario("lost vectors (5 points deleted, then the whole store)", submitted=12, embedded=len(hits),
                         failed=0, lost=12 - len(hits), duplicated=memory.count() - 12,
                         faults=["points deleted", "vector store removed"])
    assert hits == set(ids)


def test_reconcile_command_restores_a_removed_store(settings: Settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from app.cli import cli
    from app.services.ingest import prepare_storage
    from ingestion.pipeline import ingest_source

    prepare_storage(settings)
    ingest_source(_manifest(tmp_path / "m", 4), settings, progress=False)
    close_stores()
    shutil.rmtree(settings.resolved_memory_path or "")
    for key, value in {"RECO_DATA_DIR": str(settings.data_dir), "RECO_CLIP_MODEL": "reco-tiny",
                       "RECO_CLIP_PRETRAINED": "", "RECO_DECODE_WORKERS": "0"}.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, ["memory", "reconcile", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["missing"], out["restored"]) == (4, 4), out
    close_stores()
    status = CliRunner().invoke(cli, ["status", "--json"])
    assert json.loads(status.stdout)["missing_vectors"] == {}
