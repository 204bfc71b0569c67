"""A CSV manifest's bytes split into records, one bad record never swallowing the others: a quoted field may
span lines, a non-UTF-8 record is still parsed (to know where it ends) but reported, and a quote left open
is taken to be a stray quote on its first line (:data:`MAX_RECORD_LINES`). Used by :mod:`app.manifest`."""

from __future__ import annotations

import csv
from collections.abc import Iterator

from app.manifest_fields import Problem
from app.schemas import RejectReason

# A quoted CSV field may span lines (captions with newlines); a quote still open this many lines later is
# taken to be a stray quote on its first line rather than a very long caption.
MAX_RECORD_LINES = 256


def csv_records(lines: Iterator[bytes]) -> Iterator[tuple[int, list[str] | None, Problem | None]]:
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
