"""Input rows to decoded images — or a reason, never an exception.

:func:`decode_row` turns one :class:`~app.manifest.InputRow` into :class:`Decoded` (an upright RGB image
and the sha256 of the file's bytes, the content hash used for dedupe) or :class:`Rejected` (source, one
:class:`~app.schemas.RejectReason`, detail). The file's size is checked on the open descriptor before a
byte is read, so an oversized file is never loaded; pixels go through :func:`app.imaging.open_image_safely`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from http.client import HTTPMessage
from pathlib import Path
from typing import IO

from PIL import Image

from app.imaging import ImageLimits, ImageRejected, PixelBudget, open_image_safely, open_regular_file, read_capped
from app.manifest import InputRow
from app.schemas import RejectReason
from app.services.ingest_write import FailedInput

URL_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Decoded:
    row: InputRow
    image: Image.Image  # RGB, upright, first frame
    image_hash: str  # sha256 hex of the raw file bytes
    size_bytes: int

    @property
    def source(self) -> str:
        return self.row.source


# A row that could not be decoded: the one failure type of ingestion (source, reason, detail).
Rejected = FailedInput


class FileRejected(Exception):
    """A file refused before decoding (missing, not a regular file, too large)."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_file_capped(path: Path, max_bytes: int, too_large: RejectReason = RejectReason.TOO_LARGE) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else :class:`FileRejected`.

    The path is stat-ed before it is opened (a FIFO or device is never opened, so never blocks) and the
    open descriptor is stat-ed again before reading (the file checked is the file read). At most
    ``max_bytes + 1`` bytes are ever read, even from a file that grows meanwhile.
    """

    def check(info: os.stat_result) -> None:
        _check_regular(info, max_bytes, too_large)

    try:
        fd = open_regular_file(path, check)
    except FileNotFoundError as exc:
        raise FileRejected(RejectReason.MISSING, "no such file") from exc
    except OSError as exc:  # permission denied, a symlink loop, a name too long
        raise FileRejected(RejectReason.MISSING, f"unreadable: {exc.strerror or exc}") from exc
    data = read_capped(fd, max_bytes, check)
    if data is None:
        raise FileRejected(too_large, f"grew past the cap of {max_bytes} bytes while being read")
    return data


def _check_regular(info: os.stat_result, max_bytes: int, too_large: RejectReason) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise FileRejected(RejectReason.NOT_AN_IMAGE, kind)
    if info.st_size > max_bytes:
        raise FileRejected(too_large, f"{info.st_size} bytes > cap {max_bytes}")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (the default also follows ftp)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, max_bytes: int, timeout_s: float = URL_TIMEOUT_S) -> bytes:
    """GET an http(s) URL, at most ``max_bytes`` (checked on Content-Length first), else FileRejected."""
    if not url.lower().startswith(("http://", "https://")):
        raise FileRejected(RejectReason.URL_NOT_ALLOWED, f"{url!r} is not http(s)")
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "reco-ingest"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FileRejected(RejectReason.TOO_LARGE, f"Content-Length {declared} > cap {max_bytes}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise FileRejected(RejectReason.MISSING, f"HTTP {exc.code}: {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:  # DNS, refused, timeout, bad URL
        raise FileRejected(RejectReason.MISSING, f"fetch failed: {exc}") from exc
    if len(data) > max_bytes:
        raise FileRejected(RejectReason.TOO_LARGE, f"body exceeds the cap of {max_bytes} bytes")
    return data


def decode_row(
    row: InputRow, limits: ImageLimits, *, fit: int | None = None, budget: PixelBudget | None = None,
) -> Decoded | Rejected:
    """Decode one row. Never raises: every failure, expected or not, comes back as :class:`Rejected`.

    ``fit``/``budget``: downscale right after decoding, bound decoded bytes in flight (``open_image_safely``).
    """
    try:
        return _decode(row, limits, fit, budget)
    except Exception as exc:  # noqa: BLE001 - the contract is "a reason per item", whatever Pillow or the OS threw
        return Rejected(str(getattr(row, "source", "?")), RejectReason.CORRUPT, f"{type(exc).__name__}: {exc}")


def _decode(row: InputRow, limits: ImageLimits, fit: int | None = None,
            budget: PixelBudget | None = None) -> Decoded | Rejected:
    if row.problem is not None:
        reason, detail = row.problem
        return Rejected(row.source, reason, detail)
    try:
        if row.path is not None:
            data = read_file_capped(row.path, limits.max_bytes)
        elif row.url is not None:
            data = fetch_url(row.url, limits.max_bytes)
        else:
            return Rejected(row.source, RejectReason.BAD_ROW, "row has neither a path nor a URL")
        image = open_image_safely(data, limits, fit=fit, budget=budget)
    except (FileRejected, ImageRejected) as exc:
        return Rejected(row.source, exc.reason, exc.detail)
    return Decoded(row=row, image=image, image_hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def decode_rows(rows: Sequence[InputRow], limits: ImageLimits, workers: int = 0) -> list[Decoded | Rejected]:
    """:func:`decode_row` over ``rows``, in a thread pool when ``workers > 0``; results keep the rows' order.

    Threads suffice: Pillow's decoders and sha256 release the GIL on large buffers.
    """
    if workers <= 0 or len(rows) <= 1:
        return [decode_row(row, limits) for row in rows]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reco-decode") as pool:
        return list(pool.map(partial(decode_row, limits=limits), rows))
