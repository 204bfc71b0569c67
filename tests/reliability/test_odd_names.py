"""Defect 5: odd file names. A name with a newline or U+202E is stored as it is (so re-embedding and the retry of
pending items read the file again); a name the metadata database cannot hold (not UTF-8) is refused at
ingestion with a reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.config import Settings
from app.db.repo import MetadataRepo
from app.schemas import EmbedStatus
from tests.reliability.conftest import ReliabilitySummary

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "clothing10" / "images"
ODD = {"newline": "a\nb.jpg", "right-to-left override": "x\u202egpj.jpg", "tab and quote": "t\t'q\".jpg",
       "leading dash and spaces": "-  spaced  .jpg", "backslash": "back\\slash.jpg"}


def test_odd_names_are_stored_as_they_are_and_re_embed(settings: Settings, tmp_path: Path,
                                                       reliability: ReliabilitySummary) -> None:
    from app.encoder_identity import EncoderId
    from app.services.ingest import prepare_storage
    from app.services.reembed import ReembedService, encoder_for
    from ingestion.pipeline import ingest_source

    folder = tmp_path / "odd"
    folder.mkdir()
    images = sorted(SAMPLE.glob("*.jpg"))
    for (kind, name), image in zip(ODD.items(), images, strict=False):
        shutil.copy(image, folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a picture with an odd name: {kind}")
    bad = os.fsencode(str(folder)) + b"/bad\xff.jpg"
    shutil.copy(images[len(ODD)], bad)
    Path(os.fsdecode(bad)).with_suffix(".txt").write_text("a picture whose name is not UTF-8")

    prepare_storage(settings)
    summary = ingest_source(folder, settings, progress=False)
    assert summary["ingested"] == len(ODD) and summary["failed"] == 1, summary
    assert summary["failures"][0]["reason"] == "bad_encoding" and "rename" in summary["failures"][0]["detail"]
    repo = MetadataRepo.from_url(settings.resolved_database_url)
    items, _ = repo.list_items(limit=100)
    stored = {Path(i.source_uri).name for i in items}
    assert stored == set(ODD.values()), stored
    assert all(Path(i.source_uri).is_file() for i in items)

    # re-embedding reads every file again: none "unreadable"
    other = encoder_for(settings, EncoderId("reco-tiny", "", seed=7))
    progress = ReembedService(settings, other, repo=repo).run()
    assert progress.done == len(ODD) and progress.failed == 0, progress
    counts = repo.status_counts()[other.encoder_id]
    assert counts == {EmbedStatus.EMBEDDED: len(ODD)}, counts
    for kind in ODD:
        reliability.outcome("file name", kind, "folder + reembed", "stored as is, re-embedded",
                            "stored as is, re-embedded")
    reliability.outcome("file name", "not UTF-8", "folder", "refused with a reason", "refused with a reason")
