"""app.manifest: CSV / JSON-lines manifests to InputRows; one bad row never stops the others."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.manifest import (
    MAX_RECORD_LINES,
    InputRow,
    ManifestError,
    PathOutsideRoot,
    load_classes,
    read_manifest,
    resolve_confined,
)
from app.schemas import RejectReason
from tests.fixtures.bad_inputs import make_corpus, manifest_cases, write_manifest

HEADER = b"image,caption,label,split\r\n"


def _manifest(folder: Path, body: bytes, name: str = "manifest.csv", header: bytes = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(header + body)
    return path


def _reasons(rows: list[InputRow]) -> list[RejectReason | None]:
    return [row.problem[0] if row.problem else None for row in rows]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / "images" / name).write_bytes(b"not decoded here")
    return folder


# --- the corpus and the shared datasets ------------------------------------------------------------------


def test_corpus_manifest_rows_get_their_source_stage_outcome(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    cases = make_corpus(folder)
    rows = list(read_manifest(write_manifest(folder, cases)))
    expected_cases = manifest_cases(cases)
    assert len(rows) == len(expected_cases)  # one row per case, even across a stray quote and bad bytes
    for row, case in zip(rows, expected_cases, strict=True):
        expected = case.expected if case.stage == "source" else None
        assert (row.problem[0] if row.problem else None) == expected, (case.name, row)
        if row.problem is None and case.name != "url_row":
            assert row.path is not None and row.path.is_relative_to(folder.resolve())
            assert row.caption == case.caption  # NUL, 100 kB, newlines and quotes pass through as written
        else:
            assert row.path is None


def test_corpus_sources_name_the_manifest_line(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    manifest = write_manifest(folder, make_corpus(folder))
    rows = list(read_manifest(manifest))
    lines = manifest.read_bytes().splitlines()  # physical lines, as the reader counts them
    bad_line = next(row for row in rows if row.problem and row.problem[0] is RejectReason.BAD_ENCODING)
    lineno = int(bad_line.source.rsplit(":", 1)[1])
    assert b"caf\xe9" in lines[lineno - 1]


def test_shared_dataset_manifest_reads_clean(shared_data: Path) -> None:
    manifest = shared_data / "clothing10" / "manifest.csv"
    classes = load_classes(shared_data / "clothing10" / "classes.txt")
    rows = list(read_manifest(manifest))
    assert len(rows) == 1141
    assert all(row.problem is None and row.path is not None and row.path.is_file() for row in rows)
    assert {row.dataset for row in rows} == {"clothing10"}
    assert all(row.label is not None and 0 <= row.label < len(classes) for row in rows)
    assert {row.split for row in rows} == {"train", "val"}
    assert rows[0].source == f"{manifest}:2"


def test_flickr_pairs_sharing_an_image_keep_their_captions(shared_data: Path) -> None:
    rows = list(itertools.islice(read_manifest(shared_data / "flickr8k" / "manifest.csv"), 300))
    assert len(rows) == 300 and all(row.problem is None for row in rows)
    first = [row for row in rows if row.path == rows[0].path]
    assert len(first) == 5 and len({row.caption for row in first}) == 5
    assert all(row.label is None for row in rows)


# --- CSV details -----------------------------------------------------------------------------------------


def test_quoted_newlines_crlf_bom_blank_lines_and_extra_columns(images: Path) -> None:
    body = b'images/a.jpg,"first line\r\nsecond, with ""quotes""",3,train,blue\r\n\r\nimages/b.jpg,plain,,test,\r\n'
    path = _manifest(images, b"\xef\xbb\xbf" + HEADER.replace(b"\r\n", b",colour\r\n") + body, header=b"")
    rows = list(read_manifest(path))
    assert _reasons(rows) == [None, None]
    assert rows[0].caption == 'first line\r\nsecond, with "quotes"'
    assert (rows[0].label, rows[0].split, rows[0].extra) == (3, "train", {"colour": "blue"})
    assert (rows[1].label, rows[1].split, rows[1].extra) == (None, "test", {"colour": ""})
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["2", "5"]


def test_one_bad_row_never_stops_the_others(images: Path) -> None:
    body = b"".join([
        b"images/a.jpg,ok one,0,train\r\n",
        b"images/a.jpg,caf\xe9,0,train\r\n",  # Latin-1
        b'images/b.jpg,"never closed,0,train\r\n',  # stray quote...
        b'images/c.jpg,"spans\r\ntwo lines",1,train\r\n',  # ...followed by a legitimate multi-line record
        b"images/a.jpg,too,many,fields,here\r\n",
        b",no image,0,train\r\n",
        b"images/b.jpg,bad label,x7,train\r\n",
        b"images/b.jpg,negative label,-1,train\r\n",
        b"images/c.jpg,ok last,2,val\r\n",
    ])
    rows = list(read_manifest(_manifest(images, body)))
    R = RejectReason
    assert _reasons(rows) == [None, R.BAD_ENCODING, R.BAD_ROW, None, R.BAD_ROW, R.BAD_ROW, R.BAD_ROW, R.BAD_ROW, None]
    assert rows[3].caption == "spans\r\ntwo lines"
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["2", "3", "4", "5", "7", "8", "9", "10", "11"]


def test_a_quote_left_open_reads_at_most_max_record_lines_ahead(images: Path) -> None:
    filler = b"images/a.jpg,filler,0,train\r\n" * (MAX_RECORD_LINES + 10)
    rows = list(read_manifest(_manifest(images, b'images/a.jpg,"open,0,train\r\n' + filler)))
    assert _reasons(rows) == [RejectReason.BAD_ROW] + [None] * (MAX_RECORD_LINES + 10)


def test_short_rows_pad_and_caption_column_is_optional(images: Path) -> None:
    rows = list(read_manifest(_manifest(images, b"images/a.jpg\r\nimages/b.jpg\r\n", header=b"IMAGE\r\n")))
    assert _reasons(rows) == [None, None]
    assert [row.caption for row in rows] == ["", ""]


@pytest.mark.parametrize(
    ("header", "message"),
    [(b"path,caption\r\n", "no 'image' column"), (b"image,caption,image\r\n", "duplicate"),
     (b"image,capt\xe9on\r\n", "unreadable header")],
)
def test_whole_file_problems_raise_manifest_error(images: Path, header: bytes, message: str) -> None:
    path = _manifest(images, b"images/a.jpg,x\r\n", header=header)
    with pytest.raises(ManifestError, match=message):
        list(read_manifest(path))


def test_unknown_suffix_and_missing_file_raise_at_call(tmp_path: Path) -> None:
    (tmp_path / "rows.xlsx").write_bytes(b"")
    with pytest.raises(ManifestError, match="unknown manifest type"):
        read_manifest(tmp_path / "rows.xlsx")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "absent.csv")


def test_empty_manifest_has_no_rows(tmp_path: Path) -> None:
    assert list(read_manifest(_manifest(tmp_path, b"", header=b""))) == []


def test_dataset_default_column_and_override(images: Path) -> None:
    body = b"images/a.jpg,x,,train,birds\r\nimages/b.jpg,y,,train,\r\n"
    path = _manifest(images, body, header=b"image,caption,label,split,dataset\r\n")
    assert [row.dataset for row in read_manifest(path)] == ["birds", "data"]
    assert [row.dataset for row in read_manifest(path, dataset="mine")] == ["mine", "mine"]


# --- paths and URLs --------------------------------------------------------------------------------------


def test_paths_must_stay_inside_the_folder_or_allowed_roots(tmp_path: Path, images: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jpg").write_bytes(b"x")
    os.symlink(elsewhere / "x.jpg", images / "link_out.jpg")
    os.symlink(images / "images" / "a.jpg", images / "link_in.jpg")
    body = "\r\n".join([
        "../../etc/passwd,t,,", "/etc/passwd,t,,", f"{elsewhere / 'x.jpg'},t,,", "link_out.jpg,t,,",
        "link_in.jpg,t,,", "images/../images/b.jpg,t,,", f"file://{images / 'images' / 'c.jpg'},t,,",
        "file:///etc/passwd,t,,", "images/a\x00.jpg,t,,", "",
    ]).encode()
    path = _manifest(images, body)
    R = RejectReason
    expected = [R.PATH_OUTSIDE_ROOT] * 4 + [None, None, None, R.PATH_OUTSIDE_ROOT, R.BAD_ROW]
    assert _reasons(list(read_manifest(path))) == expected
    rows = list(read_manifest(path, allowed_roots=[elsewhere]))
    assert _reasons(rows)[2:4] == [None, None]
    assert rows[2].path == (elsewhere / "x.jpg").resolve()
    assert rows[4].path == (images / "images" / "a.jpg").resolve()  # symlinks are resolved in the row


def test_urls_only_when_allowed(images: Path) -> None:
    body = b"http://example.com/a.jpg,t,,\r\nHTTPS://example.com/b.jpg,t,,\r\nftp://example.com/c.jpg,t,,\r\n"
    path = _manifest(images, body)
    R = RejectReason
    assert _reasons(list(read_manifest(path))) == [R.URL_NOT_ALLOWED] * 3
    rows = list(read_manifest(path, allow_urls=True))
    assert _reasons(rows) == [None, None, R.URL_NOT_ALLOWED]
    assert (rows[0].url, rows[0].path) == ("http://example.com/a.jpg", None)


def test_resolve_confined_examples(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert resolve_confined(tmp_path, "d/x.jpg") == tmp_path.resolve() / "d" / "x.jpg"
    assert resolve_confined(tmp_path, ".") == tmp_path.resolve()
    for ref in ("..", "d/../../x", "/etc/passwd", "../" + tmp_path.name + "x/y"):
        with pytest.raises(PathOutsideRoot):
            resolve_confined(tmp_path, ref)
    with pytest.raises(ValueError, match="NUL"):
        resolve_confined(tmp_path, "a\x00b")


@pytest.fixture(scope="module")
def maze(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A root with nested folders and links that point in, out, to the extra root, and in a loop."""
    top = tmp_path_factory.mktemp("maze")
    root, extra, outside = top / "root", top / "extra", top / "outside"
    for folder in (root / "a" / "b", extra, outside):
        folder.mkdir(parents=True)
    os.symlink(outside, root / "out")
    os.symlink(root / "a", root / "a" / "b" / "up")
    os.symlink(extra, root / "a" / "extra")
    os.symlink("../../..", root / "a" / "b" / "rel_out")
    os.symlink(root / "loop1", root / "loop2")
    os.symlink(root / "loop2", root / "loop1")
    return root, extra, outside


SEGMENTS = st.sampled_from(["..", ".", "a", "b", "up", "out", "extra", "rel_out", "loop1", "x.jpg", "", "/"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(SEGMENTS, max_size=8), st.booleans())
def test_resolve_confined_never_returns_a_path_outside_the_roots(
    maze: tuple[Path, Path, Path], segments: list[str], absolute: bool
) -> None:
    root, extra, _ = maze
    ref = ("/" if absolute else "") + "/".join(segments)
    try:
        resolved = resolve_confined(root, ref, [extra])
    except ValueError:  # PathOutsideRoot included
        return
    real = Path(os.path.realpath(resolved))  # what opening it would actually reach
    assert real.is_relative_to(root.resolve()) or real.is_relative_to(extra.resolve()), (ref, real)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_resolve_confined_on_arbitrary_text_returns_inside_or_raises_value_error(
    maze: tuple[Path, Path, Path], ref: str
) -> None:
    root, _, _ = maze
    try:
        resolved = resolve_confined(root, ref)
    except ValueError:
        return
    assert Path(os.path.realpath(resolved)).is_relative_to(root.resolve())


# --- JSON lines ------------------------------------------------------------------------------------------


def test_jsonl_rows_and_their_problems(images: Path) -> None:
    lines = [
        json.dumps({"image": "images/a.jpg", "caption": "a\u0000b", "label": 2, "split": "train", "tags": ["x"]}),
        "{broken json",
        json.dumps(["not", "an", "object"]),
        json.dumps({"caption": "no image"}),
        json.dumps({"image": "images/b.jpg", "caption": {"nested": 1}}),
        json.dumps({"image": "images/b.jpg", "label": True}),
        '{"image": "images/b.jpg", "caption": "lone \\ud800 surrogate"}',
        "",
        json.dumps({"image": "images/c.jpg", "caption": None, "label": "4", "score": 0.5}),
    ]
    path = images / "rows.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"image": "images/a.jpg", "caption": "caf\xe9"}\n')
    rows = list(read_manifest(path))
    R = RejectReason
    assert _reasons(rows) == [None, R.BAD_ROW, R.BAD_ROW, R.BAD_ROW, R.BAD_ROW, R.BAD_ROW, R.BAD_ENCODING, None,
                              R.BAD_ENCODING]
    assert (rows[0].caption, rows[0].label, rows[0].extra) == ("a\x00b", 2, {"tags": '["x"]'})
    assert (rows[7].caption, rows[7].label, rows[7].extra) == ("", 4, {"score": "0.5"})
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["1", "2", "3", "4", "5", "6", "7", "9", "10"]


# --- classes.txt -----------------------------------------------------------------------------------------


def test_load_classes(shared_data: Path, tmp_path: Path) -> None:
    assert len(load_classes(shared_data / "cub100" / "classes.txt")) == 100
    (tmp_path / "ok.txt").write_bytes(b"cat\r\ndog\r\n\r\n")
    assert load_classes(tmp_path / "ok.txt") == ["cat", "dog"]
    (tmp_path / "gap.txt").write_bytes(b"cat\n\ndog\n")
    with pytest.raises(ManifestError, match="blank class name on line 2"):
        load_classes(tmp_path / "gap.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_classes(tmp_path / "latin.txt")


# --- properties ------------------------------------------------------------------------------------------

CAPTIONS = st.text(st.characters(blacklist_categories=["Cs"]), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(CAPTIONS, min_size=1, max_size=8))
def test_csv_written_by_the_csv_module_reads_back_caption_for_caption(images: Path, captions: list[str]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["image", "caption", "label", "split"])
    writer.writerows([["images/a.jpg", caption, "1", "train"] for caption in captions])
    path = images / "prop.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8"))
    rows = list(read_manifest(path))
    assert [row.caption for row in rows] == captions
    assert all(row.problem is None for row in rows)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.sampled_from(["manifest.csv", "rows.jsonl"]))
def test_arbitrary_bytes_after_the_header_never_raise(images: Path, body: bytes, name: str) -> None:
    path = _manifest(images, body, name=name, header=HEADER if name.endswith(".csv") else b"")
    rows = list(read_manifest(path))
    numbers = [int(row.source.rsplit(":", 1)[1]) for row in rows]
    assert numbers == sorted(set(numbers))  # each row names its own line, in order
    for row in rows:
        assert (row.problem is None) == (row.path is not None)
        row.source.encode("utf-8")
        if row.path is not None:
            assert row.path.is_relative_to(images.resolve())
