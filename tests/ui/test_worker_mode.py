"""RECO_UI_USE_WORKERS=true: the pages get their answers from a real refine worker (``reco worker --queues
refine``) through Redis, and the Operations page shows its queues and the worker's ping."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app.config import get_settings
from app.memory.store import close_stores
from tests.ui.conftest import ROOT, UI_APP, sample_image, start_server, stop_process
from ui.cli import settings_env

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REDIS_DB = 14  # a database of its own on the shared Redis, flushed here only


@pytest.fixture
def refine_worker(ui_data: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:

    broker = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    monkeypatch.setenv("RECO_BROKER_URL", broker)
    monkeypatch.setenv("RECO_BROKER_KEY_PREFIX", f"ui{uuid.uuid4().hex[:8]}:")  # queues of its own
    monkeypatch.setenv("RECO_UI_USE_WORKERS", "true")
    settings = get_settings()
    close_stores()
    server = start_server(settings, tmp_path / "serve.log")  # owns the memory; the refine worker goes through it
    node = f"ui-refine-{uuid.uuid4().hex[:6]}@test"
    log = tmp_path / "refine-worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", "worker", "--queues", "refine", "--pool", "solo",
             "--hostname", node], cwd=ROOT, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while f"{node} ready." not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield node
    finally:
        stop_process(process)
        stop_process(server)


def test_pages_answer_through_the_refine_worker(refine_worker: str) -> None:
    at = AppTest.from_file(str(UI_APP), default_timeout=120).run()
    assert any("refine worker" in c.value for c in at.sidebar.caption)
    image = sample_image()
    at.file_uploader(key="predict_files").set_value((image.name, image.read_bytes(), "image/jpeg")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("· refine worker" in c.value for c in at.caption)
    text = "\n".join(m.value for m in at.markdown)
    # the image's 4 neighbours and the top 3 classes' 4 prompt neighbours each, with the fusion's weights
    assert "#### RECO top-5 · mode both, k=4" in text and text.count("attention **") == 4 + 3 * 4

    at.switch_page("views/search.py").run()
    at.text_input(key="search_text").set_value("a photo of a hat")
    at.radio(key="search_mode").set_value("RECO")
    at.button[0].click().run()
    assert not at.error, [e.value for e in at.error]
    assert "· RECO (query refined)" in "\n".join(m.value for m in at.markdown)

    at.switch_page("views/operations.py").run()
    assert not at.exception, at.exception
    tables = [t.value for t in at.dataframe]
    queues = next(t for t in tables if "queue" in t.columns)
    assert set(queues["queue"]) == {"embed", "refine", "maintenance"}
    workers = next(t for t in tables if "worker" in t.columns)
    assert refine_worker in set(workers["worker"])
