"""Similar-image search in the serving service, the CLI and the API: an image finds images by default, the
target is selectable, and the caption hits of one image come back as one result with all its captions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.config import Settings
from app.memory.store import close_stores
from tests.ui.conftest import SAMPLE, sample_image, val_images


def _two_captions_each(folder: Path, images: int = 6) -> Path:
    """``images`` sample images, each with two captions (two items of one image, as Flickr8k has five)."""
    rows = []
    for path, label in val_images(1)[:images]:
        rows += [{"image": str(path), "caption": f"first caption of {path.stem}", "label": label},
                 {"image": str(path), "caption": f"second caption of {path.stem}", "label": label}]
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture
def captioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    from app.services.ingest import prepare_storage
    from ingestion.pipeline import ingest_source

    settings = Settings(data_dir=tmp_path / "data", clip_model="reco-tiny", clip_pretrained="", decode_workers=0,
                        allowed_roots=[SAMPLE, tmp_path], k_infer=4)
    for key, value in {"RECO_DATA_DIR": str(settings.data_dir), "RECO_CLIP_MODEL": "reco-tiny",
                       "RECO_CLIP_PRETRAINED": "", "RECO_DECODE_WORKERS": "0"}.items():
        monkeypatch.setenv(key, value)
    prepare_storage(settings)
    summary = ingest_source(_two_captions_each(tmp_path / "m"), settings, progress=False)
    assert summary["ingested"] == 12, summary
    yield settings
    close_stores()


def test_caption_hits_of_one_image_collapse_into_one_result(captioned: Settings) -> None:
    from app.services.serving import SearchQuery, ServingService

    service = ServingService(captioned)
    try:
        image = val_images(1)[0][0].read_bytes()
        similar = service.search(SearchQuery(image_bytes=image, k=3))
        assert similar.target == "image" and similar.results[0].score == pytest.approx(1.0, abs=1e-4)
        assert sorted(similar.results[0].captions) == [f"first caption of {val_images(1)[0][0].stem}",
                                                       f"second caption of {val_images(1)[0][0].stem}"]
        captions = service.search(SearchQuery(image_bytes=image, k=3, target="text"))
        assert captions.target == "text" and len(captions.results) == 3
        assert len({r.image_hash for r in captions.results}) == 3  # three images, not six caption rows
        assert all(len(r.captions) == 2 for r in captions.results)
        raw = service.search(SearchQuery(image_bytes=image, k=4, target="text", distinct_images=False))
        assert len(raw.results) == 4 and len({r.image_hash for r in raw.results}) == 2  # both captions of each
    finally:
        service.close()


def test_cli_search_target(captioned: Settings) -> None:
    from app.cli import cli

    runner = CliRunner()
    image = str(sample_image())
    out = runner.invoke(cli, ["search", "--image", image, "--k", "2", "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output)
    assert answer["target"] == "image" and len(answer["results"]) == 2
    assert all(len(r["captions"]) == 2 for r in answer["results"])
    out = runner.invoke(cli, ["search", "--image", image, "--k", "2", "--target", "text"])
    assert out.exit_code == 0 and "image→text" in out.output and "(+1 captions)" in out.output, out.output
    out = runner.invoke(cli, ["search", "--image", image, "--target", "audio"])
    assert out.exit_code != 0
