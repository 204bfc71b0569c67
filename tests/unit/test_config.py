from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings, get_settings


def test_defaults_are_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECO_DATA_DIR", str(tmp_path))
    s = get_settings()
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'reco.db'}"
    assert s.resolved_memory_path == str(tmp_path / "memory")
    # the committed, registered base encoder: offline and never random by default
    from app.encoder.weights import REGISTERED_TAGS

    assert not s.is_random_init and (s.clip_model, s.clip_pretrained) in REGISTERED_TAGS


def test_env_switches_to_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECO_DATABASE_URL", "postgresql+psycopg://u:secret@db/reco")
    monkeypatch.setenv("RECO_QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("RECO_CLIP_PRETRAINED", "laion2b_s34b_b79k")
    s = get_settings()
    assert s.resolved_database_url.startswith("postgresql+psycopg://")
    assert s.resolved_memory_path is None and not s.is_random_init
    assert "secret" not in repr(s.qdrant_api_key)


def test_qdrant_url_and_memory_path_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="not both"):
        Settings(qdrant_url="http://q:6333", memory_path=Path("/tmp/q"))


def test_empty_env_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECO_DATABASE_URL", "")
    assert get_settings().database_url is None
