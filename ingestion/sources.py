"""Where ingestion rows come from: a folder of images, a manifest (CSV / JSON lines), or one image file.

Every source yields :class:`~app.manifest.InputRow` s; a row that cannot be used carries its ``problem``
instead of stopping the walk. Nothing here reads image bytes (that is :mod:`ingestion.decode`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from app.config import Settings
from app.manifest import (
    MANIFEST_SUFFIXES,
    InputRow,
    PathOutsideRoot,
    default_dataset_name,
    printable,
    read_manifest,
    resolve_confined,
)
from app.schemas import RejectReason
from ingestion.decode import FileRejected, read_file_capped

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
# A sidecar caption is text, not a book: past this it is refused unread (the service's own caption cap,
# settings.max_caption_chars, is far smaller and applies to what gets through).
MAX_CAPTION_FILE_BYTES = 1 << 20
_CAPTION_SUFFIX = ".txt"


class SourceError(ValueError):
    """The source as a whole cannot be read: it does not exist, or is of an unknown kind."""


def iter_source(source: Path, settings: Settings, *, dataset: str | None = None) -> Iterator[InputRow]:
    """Rows of ``source``: a folder (recursive), a ``.csv``/``.jsonl``/``.ndjson``/``.json`` manifest, or an image.

    Raises :class:`SourceError` at once for a missing source or an unknown extension; a manifest whose
    header is unusable raises :class:`app.manifest.ManifestError` (also a ``ValueError``) when iterated.
    """
    roots = tuple(settings.allowed_roots)
    if source.is_dir():
        return iter_folder(source, allowed_roots=roots, dataset=dataset)
    if not source.exists():
        raise SourceError(f"source {printable(str(source))} does not exist")
    suffix = source.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return read_manifest(source, allowed_roots=roots, allow_urls=settings.allow_url_sources, dataset=dataset)
    if suffix in IMAGE_SUFFIXES:
        base = source.absolute().parent
        return iter([_file_row(source, base, roots, dataset or default_dataset_name(base.resolve().name))])
    known = ", ".join(sorted(MANIFEST_SUFFIXES | IMAGE_SUFFIXES))
    raise SourceError(f"source {printable(str(source))}: unknown type {suffix!r} (a folder, or one of {known})")


def iter_folder(folder: Path, *, allowed_roots: Sequence[Path] = (), dataset: str | None = None) -> Iterator[InputRow]:
    """Image files under ``folder`` by extension, depth-first in name order, each with an optional
    same-name ``.txt`` caption. Symlinks are followed only while they stay inside the folder (or an
    allowed root); one that leaves is a row with problem PATH_OUTSIDE_ROOT. ``dataset``: the folder's name.
    """
    base = folder.absolute()
    dataset = dataset or default_dataset_name(base.resolve().name)
    visited = {os.path.realpath(base)}  # folders already walked: a linked folder is walked once, loops end
    stack = [_listing(base, dataset)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif isinstance(entry, InputRow):
            yield entry
        elif _is_dir(entry):  # follows a symlink: where it leads decides whether to descend
            nested = _descend(entry, base, allowed_roots, visited, dataset)
            if isinstance(nested, InputRow):
                yield nested
            elif nested is not None:
                stack.append(nested)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            yield _file_row(Path(entry.path), base, allowed_roots, dataset)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a dangling or unreadable link: treated as a file, whose row then says what is wrong
        return False


def _listing(directory: Path, dataset: str) -> Iterator[os.DirEntry[str] | InputRow]:
    """A folder's entries sorted by name, or one problem row when it cannot be listed."""
    try:
        with os.scandir(directory) as entries:
            listing = sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        detail = f"cannot list folder: {exc.strerror or exc}"
        yield InputRow.failed(printable(str(directory)), RejectReason.MISSING, detail, dataset)
        return
    yield from listing


def _descend(
    entry: os.DirEntry[str], base: Path, allowed_roots: Sequence[Path], visited: set[str], dataset: str
) -> Iterator[os.DirEntry[str] | InputRow] | InputRow | None:
    """The listing of a sub-folder to walk, a problem row for a link leaving the roots, or None to skip."""
    try:
        real = str(resolve_confined(base, entry.path, allowed_roots))
    except PathOutsideRoot as exc:
        return InputRow.failed(printable(entry.path), RejectReason.PATH_OUTSIDE_ROOT, f"linked folder {exc}", dataset)
    except ValueError as exc:
        return InputRow.failed(printable(entry.path), RejectReason.BAD_ROW, str(exc), dataset)
    if real in visited:
        return None
    visited.add(real)
    return _listing(Path(entry.path), dataset)


def _file_row(path: Path, base: Path, allowed_roots: Sequence[Path], dataset: str) -> InputRow:
    source = printable(str(path))
    try:
        resolved = resolve_confined(base, str(path.absolute()), allowed_roots)
    except PathOutsideRoot as exc:
        return InputRow.failed(source, RejectReason.PATH_OUTSIDE_ROOT, str(exc), dataset)
    except ValueError as exc:
        return InputRow.failed(source, RejectReason.BAD_ROW, str(exc), dataset)
    caption, problem = _read_caption(path.absolute().with_suffix(_CAPTION_SUFFIX), base, allowed_roots)
    usable = resolved if problem is None else None
    return InputRow(source=source, path=usable, url=None, caption=caption, dataset=dataset, problem=problem)


def _read_caption(
    text_path: Path, base: Path, allowed_roots: Sequence[Path]
) -> tuple[str, tuple[RejectReason, str] | None]:
    """The sidecar caption: "" when there is none; confined like the image (a linked .txt could leak a file)."""
    if not os.path.lexists(text_path):
        return "", None
    try:
        resolved = resolve_confined(base, str(text_path), allowed_roots)
        data = read_file_capped(resolved, MAX_CAPTION_FILE_BYTES, too_large=RejectReason.CAPTION_TOO_LONG)
    except PathOutsideRoot as exc:
        return "", (RejectReason.PATH_OUTSIDE_ROOT, f"caption file {exc}")
    except FileRejected as exc:
        reason = exc.reason if exc.reason is RejectReason.CAPTION_TOO_LONG else RejectReason.BAD_CAPTION
        return "", (reason, f"caption file {printable(text_path.name)}: {exc.detail}")
    except ValueError as exc:
        return "", (RejectReason.BAD_ROW, f"caption file: {exc}")
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        return "", (RejectReason.BAD_ENCODING, f"caption file {printable(text_path.name)} is not UTF-8 ({exc.reason})")
    # Only the line ends an editor adds are trimmed; anything else in the caption is the service's to judge.
    return text.strip(" \t\r\n"), None


def source_kind(source: Path) -> str:
    """The ingest job's ``kind`` for ``source``: "folder", "manifest" or "file" (one image)."""
    if source.is_dir():
        return "folder"
    return "manifest" if source.suffix.lower() in MANIFEST_SUFFIXES else "file"
