"""A small prepared memory for the UI tests: 40 Clothing-10 pairs (the bundled CC0 sample, 4 per class)
embedded by the tiny random encoder, and a fusion checkpoint trained on them for 2 epochs. Built once
per session; every test gets its own copy of the data dir and fresh Streamlit caches."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image

from app.config import Settings
from app.memory.store import close_stores

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample" / "clothing10"
UI_APP = ROOT / "ui" / "app.py"
PER_CLASS = 4


def subset_manifest(folder: Path, per_class: int = PER_CLASS, split: str = "train") -> Path:
    """The first ``per_class`` rows of each class of one split, with absolute image paths."""
    taken: dict[str, int] = {}
    rows = []
    with (SAMPLE / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == split and taken.get(row["label"], 0) < per_class:
                taken[row["label"]] = taken.get(row["label"], 0) + 1
                rows.append({**row, "image": str(SAMPLE / row["image"])})
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "clothing10" / "manifest.csv"
    manifest.parent.mkdir(exist_ok=True)
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def memory_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, clip_model="reco-tiny", clip_pretrained="", decode_workers=0,
                    ingest_batch_size=32, allowed_roots=[SAMPLE], k_infer=4)


@pytest.fixture(scope="session")
def prepared_memory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.services.ingest import prepare_storage
    from app.services.train import TrainRequest, run_training
    from ingestion.pipeline import ingest_source

    root = tmp_path_factory.mktemp("ui-memory")
    settings = memory_settings(root / "data")
    prepare_storage(settings)
    summary = ingest_source(subset_manifest(root / "manifests"), settings, progress=False)
    assert summary["ingested"] == 10 * PER_CLASS, summary
    run_training(settings, TrainRequest(dataset="clothing10", split="train", epochs=2, batch_size=16, k=4,
                                        warmup_steps=1, progress=False))
    close_stores()  # local mode is single-process: the UI (maybe a subprocess) opens it next
    return root / "data"


BASE_MODEL, BASE_TAG = "reco-base", "flickr8k_s229k_b128_r128"  # the project's own trained encoder (README)
BASE_PER_CLASS = 20


def base_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, clip_model=BASE_MODEL, clip_pretrained=BASE_TAG, decode_workers=0,
                    ingest_batch_size=50, allowed_roots=[SAMPLE], k_infer=4)


@pytest.fixture(scope="session")
def base_memory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's memory in small: 20 Clothing-10 train images per class embedded by the base encoder
    (trained weights, so similarities mean something; no fusion checkpoint)."""
    from app.services.ingest import prepare_storage
    from ingestion.pipeline import ingest_source

    root = tmp_path_factory.mktemp("ui-base-memory")
    settings = base_settings(root / "data")
    prepare_storage(settings)
    summary = ingest_source(subset_manifest(root / "manifests", per_class=BASE_PER_CLASS), settings, progress=False)
    assert summary["ingested"] == 10 * BASE_PER_CLASS, summary
    close_stores()
    return root / "data"


def val_images(per_class: int = 3) -> list[tuple[Path, int]]:
    """The first held-out images of each class, with their labels."""
    taken: dict[int, int] = {}
    out = []
    with (SAMPLE / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            label = int(row["label"])
            if row["split"] == "val" and taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                out.append((SAMPLE / row["image"], label))
    return out


def ui_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    for key, value in {"RECO_DATA_DIR": str(data_dir), "RECO_CLIP_MODEL": "reco-tiny", "RECO_CLIP_PRETRAINED": "",
                       "RECO_DECODE_WORKERS": "0", "RECO_ALLOWED_ROOTS": f'["{SAMPLE}"]', "RECO_K_INFER": "4"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def ui_data(prepared_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's copy of the prepared memory, the environment pointing at it, empty Streamlit caches."""
    data_dir = tmp_path / "data"
    shutil.copytree(prepared_memory, data_dir)
    ui_env(monkeypatch, data_dir)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield data_dir
    st.cache_resource.clear()
    close_stores()


@pytest.fixture
def base_ui_data(base_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's copy of the base-encoder memory, the environment pointing at it."""
    data_dir = tmp_path / "data"
    shutil.copytree(base_memory, data_dir)
    ui_env(monkeypatch, data_dir)
    monkeypatch.setenv("RECO_CLIP_MODEL", BASE_MODEL)
    monkeypatch.setenv("RECO_CLIP_PRETRAINED", BASE_TAG)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield data_dir
    st.cache_resource.clear()
    close_stores()


@pytest.fixture
def empty_ui_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty data dir (nothing ingested, no checkpoint)."""
    data_dir = tmp_path / "empty-data"
    ui_env(monkeypatch, data_dir)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield data_dir
    st.cache_resource.clear()
    close_stores()


def sample_image(split: str = "val") -> Path:
    """A held-out sample image (not in the prepared memory)."""
    with (SAMPLE / "manifest.csv").open(newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["split"] == split)
    return SAMPLE / row["image"]


def png_bytes(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def start_server(settings: Settings, log: Path, timeout_s: float = 120):  # type: ignore[no-untyped-def]
    """``reco serve --port 0`` over ``settings``' data dir, returned once it announced itself there."""
    import json
    import subprocess
    import sys
    import time

    from ui.cli import settings_env

    announcement = Path(settings.data_dir) / "serve.json"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", "0"],
                                   cwd=ROOT, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if json.loads(announcement.read_text()).get("pid") == process.pid:
                return process
        except (OSError, ValueError):
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def stop_process(process) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
