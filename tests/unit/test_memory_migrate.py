"""A store left in qdrant-client's local mode is refused with the command that converts it, and converted."""

from __future__ import annotations

from pathlib import Path

import pytest
from qdrant_client import QdrantClient, models
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.memory.base import MemoryStoreError
from app.memory.store import close_stores, open_store
from tests.fixtures.memories import make_records

DIM = 8


def _local_mode_store(folder: Path, n: int) -> None:
    client = QdrantClient(path=str(folder))
    params = models.VectorParams(size=DIM, distance=models.Distance.COSINE)
    client.create_collection("reco__old", vectors_config={"image": params, "text": params})
    records = make_records(n, 1, DIM)
    client.upsert("reco__old", points=[models.PointStruct(
        id=r.item_id, vector={"image": r.image_vector.tolist(), "text": r.text_vector.tolist()},
        payload=r.payload.model_dump()) for r in records])
    client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
        create_alias=models.CreateAlias(collection_name="reco__old", alias_name="memory"))])
    client.close()


def test_legacy_store_is_refused_then_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "reco-data"
    _local_mode_store(data / "qdrant", 37)
    settings = Settings(data_dir=data)
    with pytest.raises(MemoryStoreError, match="reco memory migrate"):
        open_store(settings)
    monkeypatch.setenv("RECO_DATA_DIR", str(data))
    result = CliRunner().invoke(cli, ["memory", "migrate", "--json"])
    assert result.exit_code == 0, result.output
    assert '"reco__old": 37' in result.output
    assert not (data / "qdrant").exists() and (data / "qdrant.local-mode-backup" / "meta.json").is_file()
    store = open_store(settings)
    assert store.live_collection("memory") == "reco__old"
    assert store.collection("memory").count() == 37
    close_stores()


def test_retired_qdrant_path_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MemoryStoreError, match="RECO_QDRANT_PATH.*reco memory migrate"):
        open_store(Settings(data_dir=tmp_path, qdrant_path=tmp_path / "old"))
