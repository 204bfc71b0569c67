"""What every ingested row's fields must meet before any database sees them, whatever its source (a manifest,
a class-folder tree, an upload): the limits, the check (:func:`field_problem`), and text made safe to log,
store and print (:func:`printable`). :mod:`app.manifest` re-exports all of it."""

from __future__ import annotations

import json
from collections.abc import Mapping

from app.schemas import RejectReason

# Limits every row's fields meet before any database sees them: the same on SQLite and PostgreSQL (the
# column sizes of app/db/models.py; PostgreSQL refuses NUL in any text, SQLite would store it).
MAX_DATASET_CHARS = 128
MAX_SPLIT_CHARS = 32
MAX_EXTRA_KEYS = 64
MAX_EXTRA_KEY_CHARS = 64
MAX_EXTRA_BYTES = 16 * 1024  # the extra columns of one row, as JSON
MAX_SOURCE_CHARS = 4096

Problem = tuple[RejectReason, str]


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
