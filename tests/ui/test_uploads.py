"""ingestion.uploads: hostile zips are refused whole, before anything is written; good ones land in
<data_dir>/uploads/<hash>/ and are ingested from there."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from app.config import Settings
from app.schemas import RejectReason
from ingestion.uploads import (
    StoredUpload,
    UploadLimits,
    UploadRejected,
    choose_source,
    member_path,
    store_manifest,
    store_upload,
    store_zip,
    upload_root,
)
from tests.ui.conftest import png_bytes

LIMITS = UploadLimits(max_upload_bytes=10 << 20, max_total_bytes=8 << 20, max_images=5, max_entries=12,
                      max_member_bytes=4 << 20, max_ratio=50.0)


def make_zip(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def zip_with_info(info: zipfile.ZipInfo, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(info, data)
    return out.getvalue()


def _rejected(data: bytes, settings: Settings, reason: RejectReason) -> UploadRejected:
    with pytest.raises(UploadRejected) as caught:
        store_zip(data, settings, limits=LIMITS)
    assert caught.value.reason == reason, caught.value
    assert not any(upload_root(settings).glob("*/*")), "nothing may be written for a refused upload"
    return caught.value


def test_good_zip_is_extracted_once_under_its_hash(settings: Settings) -> None:
    data = make_zip({"a.png": png_bytes(), "a.txt": b"a red square", "sub/b.png": png_bytes(color=(0, 0, 255)),
                     "sub/b.txt": b"a blue square", "notes.docx": b"skipped", "__MACOSX/._a.png": b"meta"})
    first = store_zip(data, settings, limits=LIMITS)
    assert first.folder.parent == upload_root(settings) and first.source == first.folder
    assert (first.folder / "sub" / "b.png").is_file() and (first.folder / "a.txt").read_text() == "a red square"
    assert (first.files, first.images) == (4, 2) and set(first.skipped) == {"notes.docx", "__MACOSX/._a.png"}
    again = store_zip(data, settings, limits=LIMITS)
    assert again.reused and again.folder == first.folder
    assert [p.name for p in upload_root(settings).iterdir()] == [first.folder.name]  # no staging left behind


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                  "..\\evil.png", "\\\\server\\share\\evil.png"])
def test_traversal_and_absolute_names_are_refused(settings: Settings, name: str) -> None:
    error = _rejected(make_zip({"ok.png": png_bytes(), name: png_bytes()}), settings, RejectReason.PATH_OUTSIDE_ROOT)
    assert "evil" in error.detail


def test_symlink_member_is_refused(settings: Settings) -> None:
    info = zipfile.ZipInfo("link.png")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    _rejected(zip_with_info(info, b"/etc/passwd"), settings, RejectReason.PATH_OUTSIDE_ROOT)


def test_device_and_encrypted_members_are_refused(settings: Settings) -> None:
    info = zipfile.ZipInfo("fifo.png")
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    _rejected(zip_with_info(info, b"x"), settings, RejectReason.UNSUPPORTED)
    data = bytearray(make_zip({"a.png": png_bytes()}, compression=zipfile.ZIP_STORED))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the "encrypted" flag bit
        at = data.index(signature) + offset
        data[at] |= 0x1
    _rejected(bytes(data), settings, RejectReason.UNSUPPORTED)


def test_zip_bomb_by_ratio_and_by_total_size(settings: Settings) -> None:
    bomb = _rejected(make_zip({"zeros.png": bytes(3 << 20)}), settings, RejectReason.DECOMPRESSION_BOMB)
    assert "ratio" in bomb.detail
    noisy = [os.urandom(3 << 20) for _ in range(3)]
    _rejected(make_zip({f"{i}.png": d for i, d in enumerate(noisy)}, compression=zipfile.ZIP_STORED), settings,
              RejectReason.DECOMPRESSION_BOMB)  # 9 MiB in total > 8 MiB


def test_member_size_count_and_entry_caps(settings: Settings) -> None:
    big = os.urandom((4 << 20) + 1)
    _rejected(make_zip({"big.png": big}, compression=zipfile.ZIP_STORED), settings, RejectReason.TOO_LARGE)
    _rejected(make_zip({f"{i}.png": png_bytes() for i in range(6)}), settings, RejectReason.TOO_LARGE)
    _rejected(make_zip({f"{i}.txt": b"x" for i in range(13)}), settings, RejectReason.TOO_LARGE)


def test_lying_header_is_caught_while_extracting(settings: Settings) -> None:
    data = bytearray(make_zip({"a.png": bytes(200_000)}))
    # shrink the declared uncompressed size in both headers: the member inflates past it
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    for at in (local + 22, central + 24):
        data[at: at + 4] = (1000).to_bytes(4, "little")
    with pytest.raises(UploadRejected) as caught:
        store_zip(bytes(data), settings, limits=LIMITS)
    assert caught.value.reason in {RejectReason.DECOMPRESSION_BOMB, RejectReason.CORRUPT}
    assert not any(upload_root(settings).glob("*/*"))


def test_not_a_zip_duplicates_and_empty(settings: Settings) -> None:
    _rejected(b"PK\x03\x04 not really a zip", settings, RejectReason.CORRUPT)
    _rejected(make_zip({"readme.md": b"no images"}), settings, RejectReason.EMPTY_FILE)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("a.png", png_bytes())
        zf.writestr("a.png", png_bytes())
    _rejected(out.getvalue(), settings, RejectReason.BAD_ROW)


def test_member_path_normalises_harmless_names() -> None:
    assert str(member_path("./a//b/./c.png")) == "a/b/c.png"
    with pytest.raises(UploadRejected):
        member_path("a/\x00.png")


def test_manifest_inside_a_zip_is_the_source(settings: Settings) -> None:
    data = make_zip({"set/images/a.png": png_bytes(), "set/manifest.csv": b"image,caption\nimages/a.png,red\n",
                     "set/other.jsonl": b"{}\n"})
    stored = store_zip(data, settings, limits=LIMITS)
    assert stored.source == stored.folder / "set" / "manifest.csv"
    assert choose_source(stored.folder / "set" / "images") == stored.folder / "set" / "images"


def test_store_upload_dispatches_and_refuses_other_types(settings: Settings) -> None:
    manifest = store_upload("../../m.csv", b"image,caption\n/x.png,y\n", settings, limits=LIMITS)
    assert isinstance(manifest, StoredUpload) and manifest.source.name == "m.csv"
    assert manifest.source.parent.parent == upload_root(settings)  # the name's folders are dropped
    with pytest.raises(UploadRejected) as caught:
        store_upload("photo.png", png_bytes(), settings, limits=LIMITS)
    assert caught.value.reason == RejectReason.UNSUPPORTED
    with pytest.raises(UploadRejected):
        store_manifest("m.csv", b"", settings, limits=LIMITS)


def test_ingest_a_stored_zip(settings: Settings, tmp_path: Path) -> None:
    from app.services.ingest import prepare_storage
    from ingestion.uploads import ingest_upload

    prepare_storage(settings)
    data = make_zip({"a.png": png_bytes(), "a.txt": b"a red square", "b.png": png_bytes(color=(0, 0, 255))})
    summary = ingest_upload("set.zip", data, settings, progress=False)
    assert (summary["ingested"], summary["failed"]) == (1, 1)
    assert summary["failures"][0]["reason"] == RejectReason.EMPTY_CAPTION
