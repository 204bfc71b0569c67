"""Payloads of a saved exact index, parsed only when a row is asked for.

A saved 1M-row memory carries ~1M JSON lines; validating them all with pydantic takes ~10-20 s, while
search needs none of them and a refinement needs ten. :class:`LazyPayloads` memory-maps the file, finds
the line boundaries once (a vectorised scan, ~0.1 s per 100 MB) and validates a line on first access.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from app.memory.base import ItemPayload


class LazyPayloads(Sequence[ItemPayload]):
    """A read-only sequence of :class:`ItemPayload` over a JSON-lines file (one payload per line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            size = self.path.stat().st_size
            self._data: bytes | mmap.mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        raw = np.frombuffer(self._data, np.uint8) if size else np.zeros(0, np.uint8)
        ends = np.flatnonzero(raw == ord("\n"))
        if size and (len(ends) == 0 or ends[-1] != size - 1):
            ends = np.append(ends, size)  # last line without a newline
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
        nonempty = ends > starts  # blank lines (a trailing one) are not rows
        self._starts, self._ends = starts[nonempty], ends[nonempty]
        self._cache: dict[int, ItemPayload] = {}

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, index: int) -> ItemPayload: ...

    @overload
    def __getitem__(self, index: slice) -> list[ItemPayload]: ...

    def __getitem__(self, index: int | slice) -> ItemPayload | list[ItemPayload]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = int(index)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(index)
        payload = self._cache.get(row)
        if payload is None:
            payload = ItemPayload.model_validate_json(self._data[self._starts[row]: self._ends[row]])
            self._cache[row] = payload
        return payload

    def __iter__(self) -> Iterator[ItemPayload]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def raw_line(self, row: int) -> bytes:
        """The stored JSON of one row, unparsed (saving a loaded index copies lines as they are)."""
        return bytes(self._data[self._starts[row]: self._ends[row]])


def write_payloads(path: Path, payloads: Sequence[ItemPayload]) -> None:
    """One JSON line per row; rows of a loaded file are copied as stored, without parsing them."""
    with path.open("wb") as out:
        for row in range(len(payloads)):
            if isinstance(payloads, LazyPayloads):
                out.write(payloads.raw_line(row))
            else:
                out.write(payloads[row].model_dump_json().encode())
            out.write(b"\n")
