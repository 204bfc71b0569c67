"""Ingestion page: a zip is ingested with live progress, failures are listed with reasons and retried;
hostile uploads and paths outside the allowed folders are refused with a clear message."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.ui.conftest import UI_APP, png_bytes, subset_manifest


def ingestion_page() -> AppTest:
    at = AppTest.from_file(str(UI_APP), default_timeout=60).run()
    return at.switch_page("views/ingestion.py").run()


def make_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def upload_zip(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="ingest_zip").set_value((name, data, "application/zip")).run()
    return at.button(key="ingest_zip_go").click().run()


def test_widgets(empty_ui_data: Path) -> None:
    at = ingestion_page()
    assert not at.exception, at.exception
    assert at.title[0].value == "Ingestion"
    assert [t.label for t in at.tabs] == ["Upload a zip", "Upload a manifest", "Folder or manifest on the server"]
    assert at.file_uploader(key="ingest_zip") is not None and at.file_uploader(key="ingest_manifest") is not None
    assert any("No ingestion jobs yet" in i.value for i in at.info)


def test_zip_is_ingested_failures_listed_and_retried(empty_ui_data: Path) -> None:
    data = make_zip({"red.png": png_bytes(), "red.txt": b"a red square", "blue.png": png_bytes(color=(0, 0, 250)),
                     "blue.txt": b"a blue square", "nocaption.png": png_bytes(color=(0, 250, 0))})
    at = upload_zip(ingestion_page(), "squares.zip", data)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("finished with 1 failure" in w.value and "2 new, 0 duplicates, 1 failed" in w.value for w in at.warning), \
        [w.value for w in at.warning]
    jobs = at.dataframe[0].value
    assert list(jobs["new"]) == [2] and list(jobs["status"]) == ["completed"]
    failures = at.dataframe[1].value
    assert list(failures["reason"]) == ["empty_caption"] and failures["source"].iloc[0].endswith("nocaption.png")
    at.button(key="ingest_retry").click().run()
    assert not at.exception, at.exception
    jobs = at.dataframe[0].value
    assert len(jobs) == 2 and list(jobs["duplicates"])[0] == 2 and list(jobs["failed"])[0] == 1


def test_hostile_zips_are_refused(empty_ui_data: Path) -> None:
    at = upload_zip(ingestion_page(), "bomb.zip", make_zip({"zeros.png": bytes(8 << 20)}))
    assert at.error and "`decompression_bomb`" in at.error[0].value and "bomb.zip" in at.error[0].value
    at = upload_zip(at, "escape.zip", make_zip({"../../escape.png": png_bytes()}))
    assert at.error and "`path_outside_root`" in at.error[0].value
    at = upload_zip(at, "photo.png", png_bytes())
    assert at.error and "`unsupported`" in at.error[0].value
    assert not list((empty_ui_data / "uploads").glob("*/*")), "a refused upload leaves nothing behind"


def test_server_path_inside_and_outside_the_allowed_folders(empty_ui_data: Path) -> None:
    at = ingestion_page()
    at.text_input(key="ingest_path").set_value("/etc")
    at.button(key="ingest_path_go").click().run()
    assert at.error and "outside the folders" in at.error[0].value
    manifest = subset_manifest(empty_ui_data / "datasets", per_class=1)
    at.text_input(key="ingest_path").set_value(str(manifest))
    at.button(key="ingest_path_go").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any("10 new" in s.value for s in at.success), [s.value for s in at.success]
