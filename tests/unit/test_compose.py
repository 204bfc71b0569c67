"""docker-compose.yml: the full stack, safe defaults (ports on 127.0.0.1, secrets from the environment).

No Docker engine runs here. ``docker compose config`` needs only the CLI with its compose plugin (or the
standalone docker-compose), so it runs when one is installed; the structure is checked from the YAML
either way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
STACK = {"qdrant", "postgres", "redis", "migrate", "api", "embed-worker", "embed-worker-gpu", "refine-worker", "beat",
         "ui"}
RECO_SERVICES = STACK - {"qdrant", "postgres", "redis"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN", re.IGNORECASE)
LOCAL_PORT = re.compile(r"^(127\.0\.0\.1|\$\{RECO_BIND:-127\.0\.0\.1\}):\d+:\d+$")
INTERPOLATED = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin), else the standalone ``docker-compose``, else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_compose_config_validates_when_a_compose_cli_is_installed() -> None:
    """``docker compose config`` validates against the compose spec and interpolates (no engine needed)."""
    cli = _compose_cli()
    if cli is None:
        # The YAML checks below still run; neither the compose plugin nor docker-compose is installed.
        return
    env = os.environ | {"POSTGRES_PASSWORD": "from-the-environment"}
    result = subprocess.run([*cli, "-f", str(COMPOSE), "--profile", "gpu", "config"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert STACK <= set(rendered["services"])
    assert "from-the-environment@postgres" in rendered["services"]["beat"]["environment"]["RECO_DATABASE_URL"]
    missing = subprocess.run([*cli, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}, cwd=ROOT)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr  # no default password


def test_the_full_stack_is_there(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert STACK <= set(services)
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert any(v.endswith(":/qdrant/storage") for v in services["qdrant"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert set(compose["volumes"]) >= {"qdrant-data", "postgres-data"}
    for name in RECO_SERVICES:
        assert services[name]["build"] == "." and services[name]["image"].startswith("reco-memory-service")
    assert (ROOT / "Dockerfile").is_file() and 'ENTRYPOINT ["reco"]' in (ROOT / "Dockerfile").read_text()


def test_ports_are_bound_to_localhost_by_default(compose: dict[str, Any]) -> None:
    published = [(name, p) for name, s in _services(compose).items() for p in s.get("ports", [])]
    assert published, "the UI and the stores publish ports"
    for name, port in published:
        assert LOCAL_PORT.match(str(port)), f"{name} publishes {port} beyond localhost"


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if SECRET_KEY.search(str(key)) and isinstance(value, str):
                    assert INTERPOLATED.match(value), f"{path}.{key} is a literal secret"
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for n, value in enumerate(node):
                walk(value, f"{path}[{n}]")
        elif isinstance(node, str) and "://" in node and "@" in node:  # a URL with credentials
            userinfo = node.split("://", 1)[1].split("@", 1)[0]
            assert "${" in userinfo, f"{path}: credentials written into {node!r}"

    walk(compose, "compose")
    password = _services(compose)["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert ":?" in password, "no default: compose refuses to start without POSTGRES_PASSWORD"


def test_migrate_runs_once_before_the_workers(compose: dict[str, Any]) -> None:
    services = _services(compose)
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in RECO_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_workers_cover_every_queue_and_the_gpu_worker_reserves_gpus(compose: dict[str, Any]) -> None:
    services = _services(compose)
    queues: set[str] = set()
    for name in ("embed-worker", "embed-worker-gpu", "refine-worker"):
        command = services[name]["command"]
        assert command[0] == "worker"
        queues |= set(command[command.index("--queues") + 1].split(","))
    assert queues == {"embed", "refine", "maintenance"}
    assert services["beat"]["command"] == ["beat"]
    devices = services["embed-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["embed-worker-gpu"]["profiles"] == ["gpu"]  # opt-in: a host without GPUs runs the CPU one
    assert "profiles" not in services["embed-worker"] and "deploy" not in services["embed-worker"]
    for name in RECO_SERVICES:  # one store for everyone: a Qdrant server, not local mode
        env = services[name]["environment"]
        # overridable from the host's environment (the cluster profile), the single node by default
        assert env["RECO_QDRANT_URL"] == "${RECO_QDRANT_URL:-http://qdrant:6333}"
        assert env["RECO_BROKER_URL"].startswith("redis://redis")


def test_api_service_defaults_to_the_base_encoder_and_the_ui_is_its_client(compose: dict[str, Any]) -> None:
    """reco serve runs as `api`; every RECO service defaults to the committed base encoder (never random
    weights), the UI reaches the memory through the API, and the image carries the demo's sample."""
    from app.config import BASE_MODEL, BASE_PRETRAINED

    services = _services(compose)
    api = services["api"]
    assert api["command"][:1] == ["serve"] and "8765" in " ".join(api["command"])
    assert any(LOCAL_PORT.match(p) and p.endswith(":8765:8765") for p in api["ports"])
    assert "readyz" in " ".join(api["healthcheck"]["test"])
    for name in RECO_SERVICES:
        env = services[name]["environment"]
        assert env["RECO_CLIP_MODEL"] == f"${{RECO_CLIP_MODEL:-{BASE_MODEL}}}", name
        assert env["RECO_CLIP_PRETRAINED"] == f"${{RECO_CLIP_PRETRAINED:-{BASE_PRETRAINED}}}", name
    ui = services["ui"]
    assert ui["environment"]["RECO_UI_USE_WORKERS"] == "false" and ui["environment"]["RECO_API_URL"] == "http://api:8765"
    assert ui["depends_on"]["api"]["condition"] == "service_healthy"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY sample ./sample" in dockerfile and "COPY api ./api" in dockerfile
    assert "sample" not in (ROOT / ".dockerignore").read_text()
