"""app/ is the core: it imports neither Celery nor Streamlit nor the layers above it (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_APP = {"celery", "streamlit", "workers", "ui", "ingestion", "api", "fastapi", "uvicorn"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_app_imports_no_framework_or_upper_layer() -> None:
    breaches = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN_IN_APP) for p in (ROOT / "app").rglob("*.py")
    }
    assert {k: v for k, v in breaches.items() if v} == {}


def test_typer_only_in_cli() -> None:
    users = [p.relative_to(ROOT) for p in (ROOT / "app").rglob("*.py") if "typer" in _imports(p)]
    assert all(p.parts[:2] == ("app", "cli") for p in users), users


def test_ingestion_and_workers_do_not_import_ui() -> None:
    for pkg in ("ingestion", "workers"):
        for p in (ROOT / pkg).rglob("*.py"):
            assert "ui" not in _imports(p) and "streamlit" not in _imports(p), p


def test_api_is_a_thin_front_end() -> None:
    """api/ (reco serve) calls app services (and ingestion's pipeline for jobs); never the UI or the workers."""
    for p in (ROOT / "api").rglob("*.py"):
        assert not _imports(p) & {"ui", "streamlit", "workers", "celery"}, p
