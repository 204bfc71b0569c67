"""Manifest files (CSV or JSON lines) to :class:`InputRow` s — one bad row never stops the others.

Format (DESIGN.md): ``image`` (path relative to the manifest's folder, absolute path, ``file://``, or when
allowed an ``http(s)://`` URI), ``caption`` (missing = empty), optional ``label`` (index into
``classes.txt``), ``split``, ``dataset``; any other column is kept as payload in :attr:`InputRow.extra`.

The file is read as bytes and decoded record by record: a non-UTF-8 line, an unbalanced quote, a broken
JSON line, a missing ``image``, a bad label become a row with :attr:`InputRow.problem` and a ``source``
naming the line. Paths are resolved (symlinks too) and must stay inside the manifest's folder or an allowed
root. Captions pass as written: control characters, NUL, length are the ingest service's to judge.

The checks every row's fields meet whatever its source are in :mod:`app.manifest_fields`, the splitting of a
CSV file into records in :mod:`app.manifest_csv`; both are re-exported here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.manifest_csv import MAX_RECORD_LINES, csv_records
from app.manifest_fields import (
    MAX_DATASET_CHARS,
    MAX_EXTRA_BYTES,
    MAX_EXTRA_KEY_CHARS,
    MAX_EXTRA_KEYS,
    MAX_SOURCE_CHARS,
    MAX_SPLIT_CHARS,
    Problem,
    default_dataset_name,
    field_problem,
    printable,
)
from app.schemas import RejectReason

MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson", ".json"})
KNOWN_COLUMNS = ("image", "caption", "label", "split", "dataset")
MAX_CLASSES_FILE_BYTES = 16 * 1024 * 1024
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BOM = b"\xef\xbb\xbf"

__all__ = [  # the row checks (app.manifest_fields) and the CSV record reader's cap (app.manifest_csv) too
    "KNOWN_COLUMNS", "MANIFEST_SUFFIXES", "MAX_CLASSES_FILE_BYTES", "MAX_DATASET_CHARS", "MAX_EXTRA_BYTES",
    "MAX_EXTRA_KEYS", "MAX_EXTRA_KEY_CHARS", "MAX_RECORD_LINES", "MAX_SOURCE_CHARS", "MAX_SPLIT_CHARS", "InputRow",
    "ManifestError", "PathOutsideRoot", "Problem", "default_dataset_name", "field_problem", "load_classes",
    "printable", "read_manifest", "resolve_confined",
]


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
    records = csv_records(_physical_lines(path, ctx.display))
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
