"""Bad input, every way in: each kind gets its outcome (accepted, or a recorded reason), the good items beside
it are all kept, nothing is lost or stored twice, no temporary file is left behind, and no worker dies.

Ways in: a folder, a CSV manifest, a JSON-lines manifest (synchronous pipeline); uploads on the UI's
Ingestion page (a zip or a manifest) and Predict page (one image); manifests unusable as a whole (CLI);
URL rows; and the CSV manifest through a real embed worker (Celery, Redis, PostgreSQL).
The corpus is :mod:`tests.fixtures.bad_inputs` (+ :mod:`tests.fixtures.bad_uploads`).
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings, get_settings
from app.imaging import ImageRejected
from app.manifest import printable
from app.schemas import RefineMode
from app.services.ingest import IngestService, prepare_storage
from app.services.predict import PredictRequest, predict_image
from ingestion.pipeline import ingest_source
from ingestion.uploads import UploadRejected, store_upload, upload_root
from tests.fixtures.bad_inputs import (
    CorpusCase,
    folder_cases,
    make_corpus,
    manifest_cases,
    manifest_line_numbers,
    write_jsonl_manifest,
    write_manifest,
)
from tests.fixtures.bad_uploads import make_upload_cases, write_whole_manifests
from tests.integration.workers_support import Stack
from tests.reliability.conftest import ReliabilitySummary
from tests.reliability.reliability_support import (
    failure_records,
    files_in,
    ledger_outcomes,
    memory_counts,
    private_tmpdir,
    temp_leftovers,
)

KEPT = "kept"  # accepted, or a duplicate of an item already in the memory


def _category(case: CorpusCase) -> str:
    if case.stage == "service" and case.expected not in ("accepted", "duplicate"):
        return "caption"
    if case.in_folder:
        return "image file"
    return "manifest row"


def _expected(case: CorpusCase) -> str:
    return KEPT if case.expected in ("accepted", "duplicate") else str(case.expected)


@pytest.fixture
def service(settings: Settings, tiny_encoder) -> IngestService:  # type: ignore[no-untyped-def]
    prepare_storage(settings)
    return IngestService(settings, encoder=tiny_encoder)


@pytest.fixture
def tmp_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with private_tmpdir(tmp_path, monkeypatch) as folder:
        yield folder


def _sources(kind: str, corpus: Path, manifest: Path | None, cases: list[CorpusCase]) -> dict[str, CorpusCase]:
    """The ``source`` a failure of each case is recorded under."""
    if kind == "folder":
        return {printable(str(corpus.absolute() / c.relpath)): c for c in folder_cases(cases)}
    assert manifest is not None
    fmt = "jsonl" if kind == "jsonl" else "csv"
    by_name = {c.name: c for c in cases}
    return {f"{printable(str(manifest))}:{line}": by_name[name]
            for name, line in manifest_line_numbers(cases, fmt).items()}


def _check_summary(summary: dict, expected: dict[str, CorpusCase], reliability: ReliabilitySummary,
                   way: str) -> dict[str, str]:
    """Each case's outcome from the job summary; compared, recorded, returned."""
    failures = {f["source"]: f for f in summary["failures"]}
    assert set(failures) <= set(expected), f"failures under unknown sources: {set(failures) - set(expected)}"
    assert all(f["detail"] for f in summary["failures"]), "every failure says why, in words"
    observed = {c.name: (failures[src]["reason"] if src in failures else KEPT) for src, c in expected.items()}
    for case in expected.values():
        reliability.outcome(_category(case), case.name, way, _expected(case), observed[case.name])
    assert observed == {c.name: _expected(c) for c in expected.values()}
    cases = list(expected.values())
    assert summary["ingested"] == sum(c.expected == "accepted" for c in cases)
    assert summary["duplicates"] == sum(c.expected == "duplicate" for c in cases)
    return observed


@pytest.mark.parametrize("way", ["folder", "csv", "jsonl"])
def test_every_kind_gets_its_outcome_and_good_items_are_kept(
    way: str, service: IngestService, settings: Settings, tmp_path: Path, tmp_private: Path,
    reliability: ReliabilitySummary,
) -> None:
    corpus = tmp_path / "corpus"
    cases = make_corpus(corpus)
    manifest = {"folder": None, "csv": write_manifest(corpus, cases), "jsonl": write_jsonl_manifest(corpus, cases)}[way]
    expected = _sources(way, corpus, manifest, cases)
    assert len(expected) >= 35
    summary = ingest_source(manifest or corpus, settings, service=service, progress=False)
    assert summary["seen"] == len(expected)
    _check_summary(summary, expected, reliability, way)

    good = {" ".join(c.caption.split()) for c in expected.values() if c.expected == "accepted"}
    stored = {item.caption for item in service.repo.list_items(limit=1000)[0]}
    assert good <= stored, f"good items lost: {good - stored}"
    counts = memory_counts(service.repo, service.memory, submitted=summary["seen"], failed=summary["failed"])
    embedded = summary["ingested"] + summary["duplicates"]
    assert counts["items"] == counts["points"] == summary["ingested"] and counts["same_ids"], counts
    assert counts["db_status"] == {"embedded": summary["ingested"]} and counts["duplicated"] == 0, counts
    lost = summary["seen"] - embedded - summary["failed"]
    reliability.scenario(f"bad inputs, {way} (sync)", submitted=summary["seen"], embedded=embedded,
                         failed=summary["failed"], lost=lost, duplicated=counts["duplicated"])
    assert lost == 0
    assert temp_leftovers(settings.data_dir, corpus) == []


def test_manifests_unusable_as_a_whole_are_refused_with_a_clear_error(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability: ReliabilitySummary,
) -> None:
    monkeypatch.setenv("RECO_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    for case, path in write_whole_manifests(tmp_path / "whole"):
        result = runner.invoke(cli, ["ingest", str(path), "--json"])
        if case.expected == "empty":
            observed = "empty" if result.exit_code == 0 and json.loads(result.stdout)["seen"] == 0 else "?"
        else:  # refused: one line on stderr, exit 2, never a traceback (regression: ManifestError escaped)
            clean = result.exit_code == 2 and "error:" in result.output and isinstance(result.exception, SystemExit)
            observed = "refused" if clean else f"exit {result.exit_code}: {result.exception!r}"
        reliability.outcome("manifest file", case.name, "cli", case.expected, observed)
        assert observed == case.expected, (case.name, result.output[-500:])


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Images, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def test_url_rows_are_refused_unless_enabled(
    settings: Settings, tiny_encoder, tmp_path: Path, http_folder: tuple[str, Path],  # type: ignore[no-untyped-def]
    reliability: ReliabilitySummary,
) -> None:
    base, www = http_folder
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    (www / "good.png").write_bytes((corpus / "good_png.png").read_bytes())
    (www / "page.jpg").write_bytes(b"<html>not an image</html>")
    rows = [(f"{base}/good.png", "fetched over http", "accepted"), (f"{base}/page.jpg", "html", "not_an_image"),
            (f"{base}/absent.png", "404", "missing"), ("ftp://127.0.0.1/x.png", "ftp", "url_not_allowed"),
            ("file:///etc/passwd", "file URI out of the folder", "path_outside_root")]
    manifest = corpus / "urls.csv"
    manifest.write_text("image,caption\n" + "".join(f"{u},{c}\n" for u, c, _ in rows))
    for enabled in (False, True):
        local = get_settings(data_dir=tmp_path / f"data-{enabled}", clip_model="reco-tiny", clip_pretrained="",
                             decode_workers=0, allow_url_sources=enabled)
        prepare_storage(local)
        summary = ingest_source(manifest, local, service=IngestService(local, encoder=tiny_encoder), progress=False)
        reasons = {int(f["source"].rsplit(":", 1)[1]) - 2: f["reason"] for f in summary["failures"]}
        observed = [reasons.get(n, "accepted") for n in range(len(rows))]
        wanted = [e if enabled or not u.startswith("http") else "url_not_allowed" for u, _, e in rows]
        for (url, _, _), want, got in zip(rows, wanted, observed, strict=True):
            name = f"url {url.split(':')[0]} {url.rsplit('/', 1)[1]}"
            reliability.outcome("manifest row", name, f"csv, URL sources {'on' if enabled else 'off'}", want, got)
        assert observed == wanted, (enabled, summary["failures"])
    assert Settings().allow_url_sources is False  # off by default


def test_uploads_each_get_their_outcome(
    service: IngestService, settings: Settings, tmp_path: Path, tmp_private: Path, reliability: ReliabilitySummary,
) -> None:
    corpus = tmp_path / "corpus"
    cases = make_corpus(corpus)
    for case, data in make_upload_cases(corpus, cases, max_files=settings.upload_max_files):
        before = sorted(p.name for p in upload_root(settings).glob("*")) if upload_root(settings).exists() else []
        try:
            stored = store_upload(case.filename, data, settings)
        except UploadRejected as exc:
            reliability.outcome("upload", case.name, "ingestion page", case.expected, exc.reason)
            assert exc.reason == case.expected, (case.name, exc.detail)
            assert exc.detail, case.name
            after = sorted(p.name for p in upload_root(settings).glob("*")) if upload_root(settings).exists() else []
            assert after == before, f"{case.name}: a refused upload wrote {set(after) - set(before)}"
            continue
        reliability.outcome("upload", case.name, "ingestion page", case.expected, "stored")
        assert case.expected == "stored", case.name
        summary = ingest_source(stored.source, settings, service=service, progress=False)
        if case.items:  # the corpus zipped: every item its corpus outcome, under its extracted path
            expected = {printable(str(stored.folder / c.relpath)): c for c in case.items}
            assert summary["seen"] == len(expected)
            _check_summary(summary, expected, reliability, "zip upload")
        else:
            assert Counter(f["reason"] for f in summary["failures"]) == Counter(map(str, case.item_failures))
    assert temp_leftovers(settings.data_dir) == []


def _predict_outcome(name: str, data: bytes, settings: Settings, encoder) -> str:  # type: ignore[no-untyped-def]
    """What the Predict page does with one uploaded file: check type and size, then decode and classify."""
    from ui.components import check_image_upload

    problem = check_image_upload(name, data, settings)
    if problem is not None:
        return problem.split("(`", 1)[1].split("`)", 1)[0]  # the reason's wire name, as the page shows it
    try:
        predict_image(settings, PredictRequest(image_bytes=data, classes=["a cat", "a dog"], mode=RefineMode.CLIP),
                      encoder=encoder)
    except ImageRejected as exc:
        return str(exc.reason)
    return "accepted"


def test_predict_page_uploads_each_get_their_outcome(
    settings: Settings, tiny_encoder, tmp_path: Path, reliability: ReliabilitySummary,  # type: ignore[no-untyped-def]
) -> None:
    corpus = tmp_path / "corpus"
    cases = [c for c in folder_cases(make_corpus(corpus)) if c.name != "latin1_name"]  # browsers send UTF-8 names
    for case in cases:
        # A browser uploads bytes: a symlink's target, and captions play no part in a prediction.
        expected = "accepted" if case.stage in ("source", "service") else str(case.decode_expected)
        observed = _predict_outcome(Path(case.relpath).name, (corpus / case.relpath).read_bytes(), settings,
                                    tiny_encoder)
        reliability.outcome("image file", case.name, "predict upload", expected, observed)
        assert observed == expected, case.name
    observed = _predict_outcome("notes.svg", b"<svg/>", settings, tiny_encoder)
    reliability.outcome("image file", "svg_upload", "predict upload", "unsupported", observed)
    assert observed == "unsupported"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_corpus_through_a_real_embed_worker(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability: ReliabilitySummary
) -> None:
    """The CSV corpus through ``reco ingest --async``'s path and one real embed worker: each row its outcome
    in the ledger, each failure recorded once, the worker alive at the end, no temp file left."""
    from ingestion.dispatch import dispatch_source, wait_for_job
    from tests.integration.test_workers import _ledger, _sender, exactly_once_counts

    tmp = tmp_path / "worker-tmp"
    tmp.mkdir()
    stack.env["TMPDIR"] = str(tmp)
    settings = get_settings()
    corpus = tmp_path / "corpus"
    written = make_corpus(corpus)
    cases = manifest_cases(written)
    manifest = write_manifest(corpus, written)
    worker = stack.worker("embed,maintenance", "embed")
    summary = dispatch_source(manifest, settings, _sender(settings), progress=False)
    assert summary["submitted"] == len(cases)
    done = wait_for_job(_ledger(settings), summary["job_id"], timeout_s=120, poll_s=0.5)
    assert worker.alive() and "exited with" not in worker.text() and "WorkerLostError" not in worker.text()
    stack.stop_all()

    ledger = _ledger(settings)
    outcomes = ledger_outcomes(ledger.repo, summary["job_id"])
    for case, (_, state, reason) in zip(cases, outcomes, strict=True):
        observed = KEPT if state == "embedded" else str(reason)
        reliability.outcome(_category(case), case.name, "async worker", _expected(case), observed)
    assert [KEPT if s == "embedded" else r for _, s, r in outcomes] == [_expected(c) for c in cases]
    counts = exactly_once_counts(settings, summary["job_id"])
    reliability.scenario("bad inputs, csv through an embed worker", submitted=counts["submitted"],
                         embedded=counts["embedded"], failed=counts["failed"], lost=counts["lost"],
                         duplicated=counts["duplicated"])
    assert (counts["lost"], counts["duplicated"]) == (0, 0), counts
    assert counts["failed"] == failure_records(ledger.repo, summary["job_id"]) == done["failed"] > 0
    assert counts["qdrant_points"] == counts["db_items"] == sum(c.expected == "accepted" for c in cases)
    assert temp_leftovers(settings.data_dir) == [] and files_in(tmp) == []
