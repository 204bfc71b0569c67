"""Shared fixtures. Services: the machine's Postgres/Redis (URLs from env), testcontainers where a
Docker engine answers, a failure under CI=true when neither, a skip with the reason otherwise."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from app.config import Settings
from app.memory.store import close_stores

SHARED_DATA = Path(os.environ.get("RECO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
POSTGRES_URL = os.environ.get("RECO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RECO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("+psycopg", ""))
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


def require_service(name: str, url: str, default_port: int) -> str | None:
    """The URL when the service answers; else fail under CI, or return None (caller may try containers)."""
    if _reachable(url, default_port):
        return url
    if IN_CI:
        pytest.fail(f"{name} at {url} is unreachable and CI=true: a missing service is a failure, not a skip")
    return None


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test reads the developer's RECO_* environment or data dir."""
    for key in list(os.environ):
        if key.startswith("RECO_") and not key.startswith("RECO_TEST_") and key != "RECO_SHARED_DATA":
            monkeypatch.delenv(key)
    monkeypatch.setenv("RECO_DATA_DIR", str(tmp_path / "reco-data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    close_stores()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "reco-data", clip_model="reco-tiny", clip_pretrained="",
                    decode_workers=0, ingest_batch_size=16)


@pytest.fixture(scope="session")
def tiny_encoder():  # type: ignore[no-untyped-def]
    from app.encoder import OpenClipEncoder

    return OpenClipEncoder("reco-tiny", "")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    url = require_service("PostgreSQL", POSTGRES_URL, 5432)
    if url is not None:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
            yield pg.get_connection_url()
        return
    pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} and no Docker engine (set CI=true to make this fail)")


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database per test on the Postgres server; dropped afterwards."""
    from tests.fixtures.postgres import fresh_database

    with fresh_database(postgres_server_url) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = require_service("Redis", REDIS_URL, 6379)
    if url is None:
        pytest.skip(f"Redis unreachable at {REDIS_URL} (set CI=true to make this fail)")
    return url


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found at {SHARED_DATA}; set RECO_SHARED_DATA")
    return SHARED_DATA
