"""Operations page: live encoder and checkpoint (RANDOM weights said plainly), collections and alias,
re-embedding progress, and the Celery section (configured or not)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.ui.conftest import UI_APP
from ui import ops


def operations_page() -> AppTest:
    at = AppTest.from_file(str(UI_APP), default_timeout=60).run()
    return at.switch_page("views/operations.py").run()


def test_encoder_memory_reembed_and_no_celery(ui_data: Path) -> None:
    at = operations_page()
    assert not at.exception, at.exception
    assert at.title[0].value == "Operations"
    assert any("RANDOM weights" in e.value for e in at.error)
    encoder = dict(zip(at.dataframe[0].value["what"], at.dataframe[0].value["value"], strict=True))
    assert encoder["configured encoder"] == encoder["live encoder (alias)"] == "reco-tiny/random/s0"
    assert encoder["live collection"] == "reco__reco-tiny_random_s0"
    assert encoder["fusion checkpoint"].startswith("1: ") and encoder["fusion checkpoint"].endswith(".safetensors")
    collections = at.dataframe[1].value
    assert list(collections["points"]) == [40] and bool(collections["live"].iloc[0])
    assert any("Alias `memory` → `reco__reco-tiny_random_s0`" in m.value for m in at.markdown)
    assert any("Celery not configured" in i.value for i in at.info)


def test_retraining_required_on_an_empty_service(empty_ui_data: Path) -> None:
    at = operations_page()
    assert not at.exception, at.exception
    assert any("No embedding version yet" in i.value for i in at.info)


def test_celery_configured_but_broker_down(ui_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECO_UI_USE_WORKERS", "true")
    monkeypatch.setenv("RECO_BROKER_URL", "redis://:secret@127.0.0.1:1/0")
    at = operations_page()
    assert not at.exception, at.exception
    assert any("unreachable" in e.value and "secret" not in e.value for e in at.error), [e.value for e in at.error]
    assert not ops.broker_reachable("redis://127.0.0.1:1/0", timeout_s=0.5)
    assert ops.broker_reachable("memory://")
