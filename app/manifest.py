"""Manifest files (CSV or JSON lines) to :class:`InputRow` s — one bad row never stops the others.

Format (DESIGN.md): ``image`` (path relative to the manifest's folder, absolute path, ``file://``, or when
allowed an ``http(s)://`` URI), ``caption`` (missing = empty), optional ``label`` (index into
``classes.txt``), ``split``, ``dataset``; any other column is kept as payload in :attr:`InputRow.extra`.

The file is read as bytes and decoded record by record: a non-UTF-8 line, an unbalanced quote, a broken
JSON line, a missing ``image``, a bad label become a row with :attr:`InputRow.problem` and a ``source``
naming the line. Paths are resolved (symlinks too) and must stay inside the manifest's folder or an allowed
root. Captions pass as written: control characters, NUL, length are the ingest service's to judge.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.schemas import RejectReason

MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson", ".json"})
KNOWN_COLUMNS = ("image", "caption", "label", "split", "dataset")
# A quoted CSV field may span lines (captions with newlines); a quote still open this many lines later is
# taken to be a stray quote on its first line rather than a very long caption.
MAX_RECORD_LINES = 256
# Limits every row's fields meet before any database sees them: the same on SQLite and PostgreSQL (the
# column sizes of app/db/models.py; PostgreSQL refuses NUL in any text, SQLite would store it).
MAX_DATASET_CHARS = 128
MAX_SPLIT_CHARS = 32
MAX_EXTRA_KEYS = 64
MAX_EXTRA_KEY_CHARS = 64
MAX_EXTRA_BYTES = 16 * 1024  # the extra columns of one row, as JSON
MAX_SOURCE_CHARS = 4096
MAX_CLASSES_FILE_BYTES = 16 * 1024 * 1024
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BOM = b"\xef\xbb\xbf"

Problem = tuple[RejectReason, str]


class ManifestError(ValueError):
    """The whole manifest is unusable (unreadable, unknown type, no ``image`` column)."""


class PathOutsideRoot(ValueError):
    """A reference resolves outside the manifest's folder and every allowed root."""


@dataclass(frozen=True)
class InputRow:
    """One image-caption pair as a source describes it, before any byte of the image is read."""

    source: str  # human-readable origin: "…/manifest.csv:12", or the file path for folders
    path: Path | None  # resolved, confined local file; None when the row is unusable or a URL
    url: str | None  # http(s) URI, only when URLs are allowed
    caption: str
    label: int | None = None
    split: str | None = None
    dataset: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    problem: Problem | None = None  # row-level failure: (reason, detail)

    @classmethod
    def failed(cls, source: str, reason: RejectReason, detail: str, dataset: str | None = None) -> InputRow:
        """A row that cannot be used, kept so that its failure is recorded against its source."""
        return cls(source=source, path=None, url=None, caption="", dataset=dataset, problem=(reason, detail))


def printable(text: str) -> str:
    """``text`` safe to log, store and print: undecodable bytes and control characters escaped."""
    try:  # a file name's undecodable bytes come as surrogate escapes (PEP 383)
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from JSON "\ud800"
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _control_chars(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def field_problem(
    *, dataset: str | None, split: str | None, extra: Mapping[str, object] | None = None,
) -> Problem | None:
    """Why a row's metadata cannot be stored (too long, NUL or control characters, too much extra), or None.

    Applied to every row, whatever its source, before the database: the same limits on SQLite and PostgreSQL.
    """
    for name, value, cap in (("dataset", dataset, MAX_DATASET_CHARS), ("split", split, MAX_SPLIT_CHARS)):
        if value is None:
            continue
        if "\x00" in value or _control_chars(value):
            return RejectReason.BAD_ROW, f"{name} contains NUL or control characters: {printable(value)[:80]}"
        if len(value) > cap:
            return RejectReason.BAD_ROW, f"{name} is {len(value)} characters > cap {cap}: {printable(value)[:40]}…"
    if not extra:
        return None
    if len(extra) > MAX_EXTRA_KEYS:
        return RejectReason.BAD_ROW, f"{len(extra)} extra columns > cap {MAX_EXTRA_KEYS}"
    for key, item in extra.items():
        if not key or len(key) > MAX_EXTRA_KEY_CHARS or _control_chars(key):
            return RejectReason.BAD_ROW, (f"extra column name {printable(key)[:40]!r}: empty, over "
                                          f"{MAX_EXTRA_KEY_CHARS} characters, or with control characters")
        if isinstance(item, str) and "\x00" in item:
            return RejectReason.BAD_ROW, f"extra column {printable(key)!r} contains NUL"
    try:
        size = len(json.dumps(dict(extra), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError) as exc:
        return RejectReason.BAD_ROW, f"extra columns are not JSON: {exc}"
    if size > MAX_EXTRA_BYTES or "\\u0000" in json.dumps(dict(extra)):
        return RejectReason.BAD_ROW, (f"extra columns are {size} bytes of JSON > cap {MAX_EXTRA_BYTES}"
                                      if size > MAX_EXTRA_BYTES else "extra columns contain NUL")
    return None


def default_dataset_name(name: str) -> str:
    """A folder's name as a dataset name: printable, within the cap (a long folder name is cut, not refused)."""
    return printable(name)[:MAX_DATASET_CHARS]


def resolve_confined(base: Path, ref: str, allowed_roots: Sequence[Path] = ()) -> Path:
    """Resolve ``ref`` (relative to ``base`` unless absolute) and require it inside ``base`` or a root.

    Symlinks are followed before the check, so a link that leaves the roots is refused. Raises
    :class:`PathOutsideRoot` for an escape and :class:`ValueError` for a reference that is not a path.
    """
    return _confine(base, ref, _resolve_roots(base, allowed_roots))


def _resolve_roots(base: Path, allowed_roots: Iterable[Path]) -> tuple[str, ...]:
    try:
        return tuple(os.path.realpath(root.absolute()) for root in (base, *allowed_roots))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot resolve the allowed roots: {exc}") from exc


def _confine(base: Path, ref: str, roots: tuple[str, ...], parents: dict[str, str] | None = None) -> Path:
    """:func:`resolve_confined` on strings; ``parents`` caches resolved folders across the rows of one file."""
    if not ref:
        raise ValueError("empty image path")
    if "\x00" in ref:
        raise ValueError(f"image path contains a NUL byte: {printable(ref)}")
    joined = os.path.join(base.absolute(), ref)  # an absolute ref replaces base
    head, tail = os.path.split(joined)
    try:
        if parents is None or tail in ("", ".", ".."):
            resolved = os.path.realpath(joined)
        else:
            # realpath(head/tail) == realpath(head)/tail unless tail itself is a link: one lstat per row
            real_head = parents.get(head) or parents.setdefault(head, os.path.realpath(head))
            resolved = os.path.join(real_head, tail)
            resolved = os.path.realpath(resolved) if os.path.islink(resolved) else resolved
    except (OSError, ValueError) as exc:  # ENAMETOOLONG, an unencodable name
        raise ValueError(f"cannot resolve {printable(ref)}: {exc}") from exc
    if any(resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        return Path(resolved)
    raise PathOutsideRoot(f"{printable(ref)} resolves outside {', '.join(printable(r) for r in roots)}")


def load_classes(path: Path) -> list[str]:
    """``classes.txt``: line i is the name of label i. Trailing blank lines are ignored."""
    import stat as stat_module

    try:
        info = os.stat(path)
        if not stat_module.S_ISREG(info.st_mode):  # /dev/zero, a FIFO: refused before a byte is read
            raise ManifestError(f"{printable(str(path))} is not a regular file: give a classes.txt file")
        if info.st_size > MAX_CLASSES_FILE_BYTES:
            raise ManifestError(f"{printable(str(path))} is {info.st_size} bytes > cap {MAX_CLASSES_FILE_BYTES}")
        with open(path, "rb") as fh:
            text = fh.read(MAX_CLASSES_FILE_BYTES + 1).removeprefix(_BOM).decode("utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read {printable(str(path))}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{printable(str(path))} is not UTF-8 (byte {exc.start})") from exc
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ManifestError(f"{printable(str(path))} lists no classes")
    if "" in names:
        raise ManifestError(f"{printable(str(path))}: blank class name on line {names.index('') + 1}")
    return names


@dataclass(frozen=True)
class _Context:
    """What every row of one manifest shares."""

    display: str
    base: Path
    roots: tuple[str, ...]
    allow_urls: bool
    dataset: str | None  # explicit override
    default_dataset: str
    parents: dict[str, str] = field(default_factory=dict)  # resolved folder per folder, see _confine

    def failed(self, source: str, reason: RejectReason, detail: str) -> InputRow:
        return InputRow.failed(source, reason, detail, dataset=self.dataset or self.default_dataset)


def read_manifest(
    path: Path, *, allowed_roots: Sequence[Path] = (), allow_urls: bool = False, dataset: str | None = None
) -> Iterator[InputRow]:
    """Rows of a ``.csv`` or a JSON-lines (``.jsonl``, ``.ndjson``, ``.json``) manifest.

    Whole-file problems (unreadable, unknown suffix, header without ``image``) raise :class:`ManifestError`;
    the suffix is checked here, the rest when iteration starts. ``dataset``, when given, overrides a row's
    ``dataset`` column, which overrides the default: the name of the manifest's folder.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ManifestError(f"manifest {printable(str(path))} does not exist or is not a file")
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{printable(str(path))}: unknown manifest type {suffix!r} (.csv, .jsonl or .json)")
    base = path.absolute().parent
    ctx = _Context(
        display=printable(str(path)),
        base=base,
        roots=_resolve_roots(base, allowed_roots),
        allow_urls=allow_urls,
        dataset=dataset,
        default_dataset=default_dataset_name(base.resolve().name),
    )
    return _iter_csv(path, ctx) if suffix == ".csv" else _iter_json(path, ctx)


def _physical_lines(path: Path, display: str) -> Iterator[bytes]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {display}: {exc}") from exc
    with handle:
        first = True
        for chunk in handle:
            if first:
                chunk, first = chunk.removeprefix(_BOM), False
            yield from chunk.splitlines(keepends=True)  # also splits a bare CR (old Mac line ends)


# --- CSV --------------------------------------------------------------------------------------------------


def _iter_csv(path: Path, ctx: _Context) -> Iterator[InputRow]:
    records = _csv_records(_physical_lines(path, ctx.display))
    header = _read_header(records, ctx.display)
    for lineno, fields, problem in records:
        source = f"{ctx.display}:{lineno}"
        if fields is not None and len(fields) > len(header):
            detail = f"{len(fields)} fields but the header has {len(header)} (unquoted comma?)"
            problem = (RejectReason.BAD_ROW, detail)
        if problem is not None or fields is None:
            yield ctx.failed(source, *(problem or (RejectReason.BAD_ROW, "unreadable")))
            continue
        # a short row leaves its trailing columns empty, as csv.DictReader would
        padded = [*fields, *[""] * (len(header) - len(fields))]
        yield _row_from_mapping(dict(zip(header, padded, strict=True)), source, ctx)


def _read_header(records: Iterator[tuple[int, list[str] | None, Problem | None]], display: str) -> list[str]:
    first = next(records, None)
    if first is None:
        return list(KNOWN_COLUMNS[:2])  # an empty file is an empty manifest
    lineno, fields, problem = first
    if problem is not None or fields is None:
        raise ManifestError(f"{display}:{lineno}: unreadable header ({problem[1] if problem else 'empty'})")
    header = [name.strip().lower() if name.strip().lower() in KNOWN_COLUMNS else name.strip() for name in fields]
    if "image" not in header:
        raise ManifestError(f"{display}:{lineno}: the header has no 'image' column: {fields!r}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ManifestError(f"{display}:{lineno}: duplicate columns {duplicates}")
    return header


def _csv_records(lines: Iterator[bytes]) -> Iterator[tuple[int, list[str] | None, Problem | None]]:
    """(first line number, fields or None, problem or None) per CSV record, blank lines skipped."""
    buffer: list[bytes] = []
    lineno = 1
    exhausted = False
    while True:
        if not buffer and not exhausted:
            nxt = next(lines, None)
            exhausted = nxt is None
            buffer.extend([] if nxt is None else [nxt])
        if not buffer:
            return
        if not buffer[0].strip():
            buffer.pop(0)
            lineno += 1
            continue
        exhausted = _fill(buffer, lines, exhausted)
        end = _record_end(buffer)
        result = _parse_record(buffer[:end]) if end else None
        # Only a structurally bad multi-line record falls back to "the first line alone is the bad row".
        if result is None or (end > 1 and result[1] is not None and result[1][0] is RejectReason.BAD_ROW):
            end = 1
            result = _parse_record(buffer[:1])
        yield lineno, *result
        del buffer[:end]
        lineno += end


def _fill(buffer: list[bytes], lines: Iterator[bytes], exhausted: bool) -> bool:
    """Read ahead while the record at ``buffer[0]`` still has an open quote; True once input is done."""
    quotes = sum(line.count(b'"') for line in buffer)
    while quotes % 2 and not exhausted and len(buffer) < MAX_RECORD_LINES:
        nxt = next(lines, None)
        if nxt is None:
            return True
        buffer.append(nxt)
        quotes += nxt.count(b'"')
    return exhausted


def _record_end(buffer: list[bytes]) -> int:
    """Number of lines that close the record's quotes (0: never closed). '"' is one byte in UTF-8."""
    quotes = 0
    for index, line in enumerate(buffer[:MAX_RECORD_LINES]):
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            return index + 1
    return 0


def _parse_record(chunk: list[bytes]) -> tuple[list[str] | None, Problem | None]:
    raw = b"".join(chunk)
    problem: Problem | None = None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", "replace")  # still parsed, to know where the record ends
        problem = (RejectReason.BAD_ENCODING, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as exc:
        return None, (RejectReason.BAD_ROW, f"malformed CSV: {exc}")
    if len(rows) != 1:
        return None, (RejectReason.BAD_ROW, "malformed CSV record")
    return (None if problem else rows[0]), problem


# --- JSON lines -------------------------------------------------------------------------------------------


def _iter_json(path: Path, ctx: _Context) -> Iterator[InputRow]:
    for lineno, raw in enumerate(_physical_lines(path, ctx.display), start=1):
        if raw.strip():
            yield _row_from_json(raw, f"{ctx.display}:{lineno}", ctx)


def _row_from_json(raw: bytes, source: str, ctx: _Context) -> InputRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        return ctx.failed(source, RejectReason.BAD_ENCODING, detail)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int too long, nesting too deep
        return ctx.failed(source, RejectReason.BAD_ROW, f"broken JSON: {exc}")
    if not isinstance(obj, dict):
        detail = f"expected a JSON object, got {type(obj).__name__}"
        return ctx.failed(source, RejectReason.BAD_ROW, detail)
    return _row_from_mapping(obj, source, ctx)


# --- one row ----------------------------------------------------------------------------------------------


def _row_from_mapping(values: Mapping[str, object], source: str, ctx: _Context) -> InputRow:
    """Validate one row's values; the first problem found wins, later checks are skipped."""
    caption, caption_problem = _text_field(values.get("caption"), "caption")
    split, split_problem = _text_field(values.get("split"), "split")
    row_dataset, dataset_problem = _text_field(values.get("dataset"), "dataset")
    label, label_problem = _label_field(values.get("label"))
    extra = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in values.items() if k not in KNOWN_COLUMNS}
    image = values.get("image")
    problem = caption_problem or split_problem or dataset_problem or label_problem
    if problem is None:  # lengths, NUL, extra size: refused here, before a database could choke on them
        problem = field_problem(dataset=ctx.dataset or row_dataset or None, split=split or None, extra=extra)
        if problem is not None:
            return ctx.failed(source, *problem)
    if problem is None and (not isinstance(image, str) or not image.strip()):
        problem = (RejectReason.BAD_ROW, "no image path" if not image else f"image is a {type(image).__name__}")
    if problem is None and not _all_utf8([str(image), caption, split, row_dataset, *extra, *extra.values()]):
        problem = (RejectReason.BAD_ENCODING, "text is not valid Unicode (lone surrogate)")
    path, url = None, None
    if problem is None:
        path, url, problem = _locate(str(image), ctx)
    return InputRow(
        source=source,
        path=path,
        url=url,
        caption=caption,
        label=label,
        split=split or None,
        dataset=ctx.dataset or row_dataset or ctx.default_dataset,
        extra=extra,
        problem=problem,
    )


def _text_field(value: object, name: str) -> tuple[str, Problem | None]:
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value), None
    return "", (RejectReason.BAD_ROW, f"{name} must be text, got {type(value).__name__}")


def _label_field(value: object) -> tuple[int | None, Problem | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, int) and not isinstance(value, bool):
        label: int | None = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) < 12:
        label = int(value.strip())
    else:
        label = None
    if label is None or not 0 <= label < 2**31:  # an index into classes.txt; must fit an SQL INTEGER
        return None, (RejectReason.BAD_ROW, f"label must be a non-negative integer, got {printable(repr(value))}")
    return label, None


def _all_utf8(texts: Iterable[str]) -> bool:
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _locate(ref: str, ctx: _Context) -> tuple[Path | None, str | None, Problem | None]:
    """A manifest's image reference to a confined local path or an allowed URL."""
    match = _URI_SCHEME.match(ref)
    if match:
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            if ctx.allow_urls:
                return None, ref, None
            return None, None, (RejectReason.URL_NOT_ALLOWED, f"{printable(ref)}: URL sources are disabled")
        parts = urlsplit(ref)
        if scheme != "file" or parts.netloc not in ("", "localhost"):
            return None, None, (RejectReason.URL_NOT_ALLOWED, f"{printable(ref)}: scheme {scheme!r} not supported")
        ref = unquote(parts.path)
    try:
        return _confine(ctx.base, ref, ctx.roots, ctx.parents), None, None
    except PathOutsideRoot as exc:
        return None, None, (RejectReason.PATH_OUTSIDE_ROOT, str(exc))
    except ValueError as exc:
        return None, None, (RejectReason.BAD_ROW, str(exc))
