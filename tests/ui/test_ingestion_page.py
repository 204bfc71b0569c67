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


def amber(at: AppTest) -> list[str]:
    """The page's warnings (the random-weights banner aside)."""
    return [w.value for w in at.warning if "RANDOM WEIGHTS" not in w.value]


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
    assert any("finished with 1 failure" in w and "2 new, 0 duplicates, 1 failed" in w for w in amber(at)), amber(at)
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


def test_newest_job_is_shown_and_failures_are_amber(empty_ui_data: Path) -> None:
    """A clean job, then one with 3 failures: the page follows the newest job (not "job 1 has no failures")
    and reports it in amber; an empty zip ("0 seen") is amber too, never green."""
    at = upload_zip(ingestion_page(), "clean.zip", make_zip({"red.png": png_bytes(), "red.txt": b"a red square"}))
    assert any("1 new" in s.value for s in at.success) and not amber(at)
    assert at.selectbox(key="ingest_failure_job").value == 1
    broken = {f"b{n}.png": png_bytes(color=(n, 90, 90))[:60] for n in range(3)} | {
        f"b{n}.txt": b"a broken square" for n in range(3)}
    at = upload_zip(at, "broken.zip", make_zip(broken | {"blue.png": png_bytes(color=(0, 0, 250)),
                                                          "blue.txt": b"a blue square"}))
    assert not at.exception and not at.success, [s.value for s in at.success]
    assert any("finished with 3 failures" in w for w in amber(at)), amber(at)
    assert at.selectbox(key="ingest_failure_job").value == 2
    assert len(at.dataframe[1].value) == 3 and "has no failures" not in "\n".join(c.value for c in at.caption)
    assert list(at.dataframe[0].value["result"]) == ["⚠ 3 failed", "ok"]
    at = upload_zip(at, "captions.zip", make_zip({"lonely.txt": b"a caption without its image"}))
    assert any("found nothing to ingest" in w and "0 seen" in w for w in amber(at)), amber(at)
    assert at.selectbox(key="ingest_failure_job").value == 3


def test_headlines_match_the_refusal(empty_ui_data: Path) -> None:
    at = upload_zip(ingestion_page(), "photos.zip", b"this is not a zip at all")
    assert at.error and "not a readable zip archive" in at.error[0].value and "corrupt" in at.error[0].value
    assert "image is corrupt" not in at.error[0].value
    at = upload_zip(at, "photo.png", png_bytes())
    assert at.error and "not a zip or a manifest" in at.error[0].value
    assert "unsupported image format" not in at.error[0].value
    at = upload_zip(at, "nothing.zip", make_zip({"notes.md": b"nothing to see"}))
    assert at.error and "nothing to ingest in the archive" in at.error[0].value


def test_dataset_name_and_caption_template_for_class_folders(empty_ui_data: Path) -> None:
    data = make_zip({"red_square/a.png": png_bytes(color=(250, 0, 0)),
                     "blue_square/b.png": png_bytes(color=(0, 0, 250)),
                     "blue_square/c.png": png_bytes(color=(0, 0, 200))})
    at = ingestion_page()
    at.file_uploader(key="ingest_zip").set_value(("my squares.zip", data, "application/zip")).run()
    assert at.text_input(key="ingest_zip_dataset").value == "my squares"  # from the file's name, editable
    at.text_input(key="ingest_zip_dataset").set_value("squares")
    at.text_input(key="ingest_zip_template").set_value("a photo of a {folder}.")
    at.button(key="ingest_zip_go").click().run()
    assert not at.error and any("3 new" in s.value for s in at.success), [e.value for e in at.error]
    from app.config import Settings
    from app.db.repo import MetadataRepo

    repo = MetadataRepo.from_url(Settings().resolved_database_url)
    items, total = repo.list_items(filters={"dataset": "squares"})
    assert total == 3 and sorted({(i.caption, i.label) for i in items}) == [("a photo of a blue square.", 0),
                                                                           ("a photo of a red square.", 1)]
    at.text_input(key="ingest_zip_template").set_value("a photo of a {label}.")
    at.button(key="ingest_zip_go").click().run()
    assert at.error and "Caption template" in at.error[0].value


def test_cancel_and_a_total_for_every_job(empty_ui_data: Path) -> None:
    """The service's cancel stops a job between batches (status cancelled, what was stored stays); a job
    over a server path knows its total before it starts (the page's progress bar)."""
    from app.config import Settings
    from app.services.ingest import prepare_storage
    from app.services.serving import ServingService
    from ingestion.pipeline import ingest_source

    settings = Settings(ingest_batch_size=2)
    prepare_storage(settings)
    service = ServingService(settings, ingest_runner=ingest_source)
    try:
        manifest = subset_manifest(empty_ui_data / "datasets", per_class=2)
        job = service.start_ingest(manifest, kind="manifest")
        service.cancel_job(job.id)
        done = service.wait_for_job(job.id, timeout_s=120)
        assert done.status == "cancelled" and done.ingested < 20 and done.cancel_requested, done
        again = service.wait_for_job(service.start_ingest(manifest, kind="manifest").id, timeout_s=120)
        assert again.status == "completed" and again.total == 20 and again.ingested + again.duplicates == 20
        assert service.cancel_job(again.id).status == "completed"  # a finished job stays as it was
    finally:
        service.close()
