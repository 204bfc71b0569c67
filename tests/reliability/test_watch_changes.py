"""Defect 4: watch mode sends every change. Rows are keyed by content (image hash + caption), a file pair
(image and its ``.txt``) must have settled, and a change is sent again:

- a manifest overwritten with new rows (same line numbers),
- a row inserted at the top of a manifest,
- an image picked up before its ``.txt`` caption (the caption is read when it arrives),
- an image replaced under the same name, a caption edited.

Each scan's rows go through the embed batch service, so the test also counts lost and duplicated items.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.encoder import OpenClipEncoder
from app.services.ingest import IngestService, prepare_storage
from app.services.ingest_async import EmbedBatchService
from ingestion.dispatch import make_decoder
from ingestion.watch import scan_once
from tests.integration.test_workers_services import ListSender, drain
from tests.reliability.conftest import ReliabilitySummary

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "clothing10" / "images"
IMAGES = sorted(SAMPLE.glob("*.jpg"))


@pytest.fixture
def service(settings: Settings, tiny_encoder: OpenClipEncoder) -> EmbedBatchService:
    prepare_storage(settings)
    ingest = IngestService(settings, encoder=tiny_encoder)
    return EmbedBatchService(ingest, make_decoder(settings, ingest.encoder))


def _scan(folder: Path, settings: Settings, service: EmbedBatchService, settle_s: float = 0) -> int:
    sender = ListSender()
    submitted = scan_once(folder, settings, sender, settle_s=settle_s)["submitted"]
    drain(service, sender.sent)
    return submitted


def _captions(service: EmbedBatchService) -> set[str]:
    return {i.caption for i in service.ingest.repo.list_items(limit=1000)[0]}


def test_overwritten_manifest_and_row_inserted_at_the_top_are_sent(
    settings: Settings, service: EmbedBatchService, tmp_path: Path, reliability: ReliabilitySummary,
) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for image in IMAGES[:6]:
        shutil.copy(image, folder / image.name)
    manifest = folder / "rows.csv"
    manifest.write_text("image,caption\n" + "".join(f"{IMAGES[i].name},first {i}\n" for i in range(3)))
    assert _scan(folder, settings, service) == 3
    assert _scan(folder, settings, service) == 0  # nothing changed: nothing sent
    manifest.write_text("image,caption\n" + "".join(f"{IMAGES[i].name},second {i}\n" for i in range(3, 6)))
    assert _scan(folder, settings, service) == 3, "an overwritten manifest's new rows (same lines) are new"
    manifest.write_text("image,caption\n" + f"{IMAGES[0].name},inserted at the top\n"
                        + "".join(f"{IMAGES[i].name},second {i}\n" for i in range(3, 6)))
    assert _scan(folder, settings, service) == 1, "a row inserted at the top is new"
    expected = {f"first {i}" for i in range(3)} | {f"second {i}" for i in range(3, 6)} | {"inserted at the top"}
    assert _captions(service) == expected
    memory = service.ingest.memory
    reliability.scenario("watch: manifest overwritten, row inserted at the top", submitted=7,
                         embedded=memory.count(), failed=0, lost=7 - memory.count(), duplicated=0)
    assert memory.count() == 7


def test_late_caption_replaced_image_and_edited_caption_are_sent_again(
    settings: Settings, service: EmbedBatchService, tmp_path: Path, reliability: ReliabilitySummary,
) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    # an image whose caption file arrives later: sent again with its caption, which is then read
    shutil.copy(IMAGES[0], folder / "late.jpg")
    assert _scan(folder, settings, service) == 1  # the caption is not there yet (an empty caption: refused)
    (folder / "late.txt").write_text("the caption that came late")
    assert _scan(folder, settings, service) == 1
    assert "the caption that came late" in _captions(service)
    # the same file name with other bytes: sent again
    shutil.copy(IMAGES[1], folder / "late.jpg")
    assert _scan(folder, settings, service) == 1
    # an edited caption: sent again
    (folder / "late.txt").write_text("an edited caption")
    assert _scan(folder, settings, service) == 1
    assert _scan(folder, settings, service) == 0
    assert {"the caption that came late", "an edited caption"} <= _captions(service)
    hashes = {i.image_hash for i in service.ingest.repo.list_items(limit=100)[0]}
    assert len(hashes) == 2  # both versions of late.jpg are items
    memory = service.ingest.memory
    reliability.scenario("watch: late caption, replaced image, edited caption", submitted=4,
                         embedded=memory.count(), failed=1, lost=4 - 1 - memory.count(), duplicated=0,
                         note="the failed row: the image sent before its caption arrived (empty caption)")
    assert memory.count() == 3


def test_a_pair_is_left_until_both_files_settled(settings: Settings, service: EmbedBatchService,
                                                  tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    shutil.copy(IMAGES[2], folder / "pair.jpg")
    (folder / "pair.txt").write_text("a pair")
    old = time.time() - 60
    os.utime(folder / "pair.jpg", (old, old))  # the image settled long ago, the caption was just written
    assert _scan(folder, settings, service, settle_s=30) == 0
    os.utime(folder / "pair.txt", (old, old))
    assert _scan(folder, settings, service, settle_s=30) == 1
    assert _captions(service) == {"a pair"}
