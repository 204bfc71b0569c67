"""``reco ingest DIR --caption-template "a photo of a {folder}."``: a tree of class folders (the ImageFolder
layout) ingested without a caption file per image: caption and label from the folder's name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.memory.store import close_stores
from ingestion.classfolders import TemplateError, check_template
from tests.ui.conftest import val_images


def test_template_is_checked() -> None:
    assert check_template("a photo of a {folder}.") == "a photo of a {folder}."
    for bad in ("a photo", "a {folder} of {label}", "{folder.__class__}", "x" * 300 + "{folder}"):
        with pytest.raises(TemplateError):
            check_template(bad)


def test_cli_ingests_class_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli import cli
    from app.config import Settings
    from app.db.repo import MetadataRepo

    tree = tmp_path / "clothes"
    names = {1: "hat", 6: "running_shoes"}
    for path, label in val_images(2):
        if label in names:
            (tree / names[label]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tree / names[label] / path.name)
    (tree / "hat" / "notes.txt").write_text("not a caption of anything")
    for key, value in {"RECO_DATA_DIR": str(tmp_path / "data"), "RECO_CLIP_MODEL": "reco-tiny",
                       "RECO_CLIP_PRETRAINED": "", "RECO_DECODE_WORKERS": "0",
                       "RECO_ALLOWED_ROOTS": f'["{tmp_path}"]'}.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    try:
        plain = runner.invoke(cli, ["ingest", str(tree), "--json"])  # without a template: nothing to caption
        assert plain.exit_code == 0 and json.loads(plain.output)["ingested"] == 0, plain.output
        out = runner.invoke(cli, ["ingest", str(tree), "--caption-template", "a photo of a {folder}.",
                                  "--dataset", "my-clothes", "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["ingested"] == 4
        items, total = MetadataRepo.from_url(Settings().resolved_database_url).list_items(
            filters={"dataset": "my-clothes"})
        assert total == 4 and sorted({(i.caption, i.label) for i in items}) == [
            ("a photo of a hat.", 0), ("a photo of a running shoes.", 1)]
        classes = tmp_path / "data" / "datasets" / "my-clothes" / "classes.txt"
        assert classes.read_text().splitlines() == ["hat", "running shoes"]
        bad = runner.invoke(cli, ["ingest", str(tree), "--caption-template", "a photo"])
        assert bad.exit_code != 0 and "{folder}" in bad.output
    finally:
        close_stores()
