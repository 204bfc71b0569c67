"""ingestion.sources and ingestion.decode over the bad-input corpus: every item gets its outcome, good
items beside bad ones all decode, and nothing raises."""

from __future__ import annotations

import hashlib
import http.server
import os
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.imaging import ImageLimits
from app.manifest import InputRow, printable, read_manifest
from app.schemas import RejectReason
from ingestion import decode as decode_module
from ingestion.decode import Decoded, Rejected, decode_row, decode_rows, fetch_url
from ingestion.sources import SourceError, iter_folder, iter_source, source_kind
from tests.fixtures.bad_inputs import (
    SPARSE_FILE_BYTES,
    CorpusCase,
    folder_cases,
    make_corpus,
    manifest_cases,
    noise_image,
    write_manifest,
)
from tests.unit.test_imaging import assert_pixels

LIMITS = ImageLimits()


def _status(outcome: Decoded | Rejected) -> str | RejectReason:
    return "accepted" if isinstance(outcome, Decoded) else outcome.reason


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusCase], Path]:
    folder = tmp_path_factory.mktemp("sources") / "corpus"
    cases = make_corpus(folder)
    return folder, cases, write_manifest(folder, cases)


def _source_of(folder: Path, case: CorpusCase) -> str:
    return printable(str(folder.absolute() / case.relpath))


# --- the corpus, end to end up to the service ----------------------------------------------------------------


def test_folder_corpus_every_item_gets_its_outcome(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, cases, _ = corpus
    rows = list(iter_folder(folder))
    expected = {_source_of(folder, case): case for case in folder_cases(cases)}
    assert sorted(row.source for row in rows) == sorted(expected)  # each file seen once; .txt/.csv are not images
    outcomes = decode_rows(rows, LIMITS, workers=2)
    statuses = {outcome.source: _status(outcome) for outcome in outcomes}
    assert statuses == {source: case.decode_expected for source, case in expected.items()}
    for outcome in outcomes:
        if isinstance(outcome, Decoded):
            case = expected[outcome.source]
            assert_pixels(outcome.image, case)
            assert outcome.row.caption == case.caption  # the .txt sidecar, or "" without one
            assert outcome.row.dataset == "corpus"


def test_manifest_corpus_every_row_gets_its_outcome(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, cases, manifest = corpus
    rows = list(read_manifest(manifest))
    expected = manifest_cases(cases)
    outcomes = decode_rows(rows, LIMITS, workers=0)
    assert [_status(outcome) for outcome in outcomes] == [case.decode_expected for case in expected]
    for outcome, case in zip(outcomes, expected, strict=True):
        if isinstance(outcome, Decoded):
            assert_pixels(outcome.image, case)
            assert outcome.row.caption == case.caption


def test_good_items_beside_bad_ones_are_all_decoded(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, cases, manifest = corpus
    for rows, seen in ((list(iter_folder(folder)), folder_cases(cases)), (list(read_manifest(manifest)),
                                                                         manifest_cases(cases))):
        decoded = [outcome for outcome in decode_rows(rows, LIMITS, workers=2) if isinstance(outcome, Decoded)]
        assert len(decoded) == sum(case.decode_expected == "accepted" for case in seen)
        assert len(decoded) >= 14
        assert len([case for case in seen if case.decode_expected != "accepted"]) >= 12  # and plenty of bad ones


def test_caption_level_cases_decode_and_carry_their_caption(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, cases, manifest = corpus
    service_cases = {case.name: case for case in manifest_cases(cases) if case.stage == "service"}
    assert {"empty_caption", "long_caption", "nul_caption", "duplicate_row", "duplicate_file"} <= set(service_cases)
    rows = list(read_manifest(manifest))
    for row, case in zip(rows, manifest_cases(cases), strict=True):
        if case.name in service_cases:
            outcome = decode_row(row, LIMITS)
            assert isinstance(outcome, Decoded), case.name
            assert outcome.row.caption == case.caption
    assert len(service_cases["long_caption"].caption) == 100_000


def test_duplicates_share_a_content_hash(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, _, _ = corpus
    rows = {Path(row.source).name: row for row in iter_folder(folder)}
    original = decode_row(rows["good_jpeg.jpg"], LIMITS)
    copy = decode_row(rows["zz_duplicate_of_good_jpeg.jpg"], LIMITS)
    assert isinstance(original, Decoded) and isinstance(copy, Decoded)
    data = (folder / "good_jpeg.jpg").read_bytes()
    assert original.image_hash == copy.image_hash == hashlib.sha256(data).hexdigest()
    assert original.size_bytes == len(data)
    assert original.row.caption == copy.row.caption


def test_threads_keep_order_and_outcomes(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, _, manifest = corpus
    rows = list(read_manifest(manifest)) + list(iter_folder(folder))
    serial = [(o.source, _status(o)) for o in decode_rows(rows, LIMITS, workers=0)]
    threaded = [(o.source, _status(o)) for o in decode_rows(rows, LIMITS, workers=3)]
    assert threaded == serial
    assert [source for source, _ in serial] == [row.source for row in rows]


# --- decode_row ------------------------------------------------------------------------------------------


def test_an_oversized_file_is_refused_by_size_without_being_read(corpus: tuple[Path, list[CorpusCase], Path]) -> None:
    folder, _, _ = corpus
    path = folder / "sparse_200mb.jpg"
    assert path.stat().st_size == SPARSE_FILE_BYTES
    tracemalloc.start()
    try:
        outcome = decode_row(InputRow(source="big", path=path, url=None, caption="x"), LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, Rejected) and outcome.reason is RejectReason.TOO_LARGE
    assert peak < 1_000_000, f"peak {peak} bytes: the file was read"


def test_row_problems_and_empty_rows_become_rejections(tmp_path: Path) -> None:
    failed = InputRow.failed("m.csv:3", RejectReason.PATH_OUTSIDE_ROOT, "../../etc/passwd")
    assert decode_row(failed, LIMITS) == Rejected("m.csv:3", RejectReason.PATH_OUTSIDE_ROOT, "../../etc/passwd")
    empty = InputRow(source="m.csv:4", path=None, url=None, caption="x")
    assert decode_row(empty, LIMITS).reason is RejectReason.BAD_ROW  # type: ignore[union-attr]
    missing = InputRow(source="m.csv:5", path=tmp_path / "gone.jpg", url=None, caption="x")
    assert decode_row(missing, LIMITS).reason is RejectReason.MISSING  # type: ignore[union-attr]


@pytest.mark.timeout(10)
def test_special_files_are_never_opened_for_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would block forever
    for path in (fifo, tmp_path, Path("/dev/zero")):
        outcome = decode_row(InputRow(source=str(path), path=path, url=None, caption="x"), LIMITS)
        assert isinstance(outcome, Rejected) and outcome.reason is RejectReason.NOT_AN_IMAGE, outcome


@pytest.mark.parametrize("error", [RuntimeError("boom"), MemoryError(), KeyError("k"), RecursionError()])
def test_any_exception_inside_decoding_becomes_a_rejection(
    corpus: tuple[Path, list[CorpusCase], Path], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    folder, _, _ = corpus

    def explode(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(decode_module, "open_image_safely", explode)
    row = InputRow(source="x", path=folder / "good_png.png", url=None, caption="x")
    outcome = decode_row(row, LIMITS)
    assert isinstance(outcome, Rejected) and outcome.reason is RejectReason.CORRUPT
    assert type(error).__name__ in outcome.detail


_SCRATCH = Path(tempfile.mkdtemp(prefix="reco-decode-prop-"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_decode_row_never_raises_for_arbitrary_bytes(data: bytes) -> None:
    path = _SCRATCH / "item.jpg"
    path.write_bytes(data)
    outcome = decode_row(InputRow(source="prop", path=path, url=None, caption="c"), ImageLimits(max_bytes=2048))
    if isinstance(outcome, Decoded):
        assert outcome.image.mode == "RGB" and outcome.image_hash == hashlib.sha256(data).hexdigest()
    else:
        assert outcome.reason in RejectReason
        assert outcome.reason is not RejectReason.TOO_LARGE or len(data) > 2048


# --- sources -------------------------------------------------------------------------------------------------


def test_iter_source_kinds_and_errors(corpus: tuple[Path, list[CorpusCase], Path], settings: Settings) -> None:
    folder, cases, manifest = corpus
    assert [source_kind(p) for p in (folder, manifest, folder / "good_png.png")] == ["folder", "manifest", "file"]
    assert len(list(iter_source(manifest, settings))) == len(manifest_cases(cases))
    assert len(list(iter_source(folder, settings))) == len(folder_cases(cases))
    single = list(iter_source(folder / "good_png.png", settings, dataset="one"))
    assert [(row.caption, row.dataset, row.problem) for row in single] == [("a photo for the good_png case", "one",
                                                                           None)]
    with pytest.raises(SourceError, match="does not exist"):
        iter_source(folder / "absent", settings)
    with pytest.raises(SourceError, match="unknown type '.txt'"):
        iter_source(folder / "good_png.txt", settings)


def test_url_rows_follow_the_setting(corpus: tuple[Path, list[CorpusCase], Path], settings: Settings) -> None:
    _, _, manifest = corpus
    rows = list(iter_source(manifest, settings.model_copy(update={"allow_url_sources": True})))
    url_rows = [row for row in rows if row.url]
    assert [row.url for row in url_rows] == ["http://example.com/cat.jpg"] and url_rows[0].problem is None


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "photos", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    noise_image(1).save(root / "inner" / "b.JPG")
    noise_image(2).save(root / "a.png")
    noise_image(3).save(outside / "secret.png")
    (outside / "secret.txt").write_text("private text")
    (root / "notes.md").write_text("not an image")
    return root, outside


def test_folder_symlinks_inside_are_walked_once_and_outside_are_refused(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    os.symlink(outside, root / "linked_out")
    os.symlink(root / "inner", root / "linked_in")
    os.symlink(root, root / "inner" / "loop")
    os.symlink(outside / "secret.txt", root / "a.txt")  # the caption of a.png leaks nothing either
    rows = {row.source.removeprefix(str(root) + "/"): row for row in iter_folder(root)}
    assert set(rows) == {"a.png", "inner/b.JPG", "linked_out"}
    assert rows["linked_out"].problem[0] is RejectReason.PATH_OUTSIDE_ROOT  # type: ignore[index]
    assert rows["a.png"].problem[0] is RejectReason.PATH_OUTSIDE_ROOT  # type: ignore[index]
    assert rows["a.png"].caption == "" and rows["a.png"].path is None
    assert rows["inner/b.JPG"].problem is None and rows["inner/b.JPG"].dataset == "photos"
    allowed = {row.source: row.problem for row in iter_folder(root, allowed_roots=[outside], dataset="d")}
    assert allowed[str(root / "linked_out" / "secret.png")] is None  # an allowed root may be linked in


def test_folder_caption_files_are_bounded(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    (root / "a.txt").write_bytes(b"x" * (1 << 20 + 1))
    rows = list(iter_folder(root))
    assert rows[0].problem is not None and rows[0].problem[0] is RejectReason.CAPTION_TOO_LONG
    (root / "a.txt").write_bytes(b"\xef\xbb\xbf  a caption\r\n")
    assert next(iter_folder(root)).caption == "a caption"


# --- URLs ------------------------------------------------------------------------------------------------------


@pytest.fixture
def http_base(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    noise_image(4).save(tmp_path / "cat.png")
    png = (tmp_path / "cat.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/cat.png":
                self._reply(200, png)
            elif self.path == "/huge.png":
                self._reply(200, b"", length=10**9)
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                self._reply(404, b"no")

        def _reply(self, code: int, body: bytes, length: int | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(20)
def test_url_rows_are_fetched_with_the_same_caps(http_base: str) -> None:
    def outcome(path: str) -> str | RejectReason:
        return _status(decode_row(InputRow(source=path, path=None, url=http_base + path, caption="c"), LIMITS))

    assert outcome("/cat.png") == "accepted"
    assert outcome("/missing.png") is RejectReason.MISSING
    assert outcome("/huge.png") is RejectReason.TOO_LARGE
    assert outcome("/to-file") is RejectReason.MISSING  # a redirect may not leave http(s)
    with pytest.raises(decode_module.FileRejected):
        fetch_url("file:///etc/passwd", 100)
