"""Bytes to a safe, upright RGB image — or a reason why not.

Everything that turns untrusted bytes into pixels goes through :func:`open_image_safely`: ingestion,
uploads in the UI, ``reco predict``/``search --image`` and the refine worker.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from app.schemas import RejectReason

# Formats we decode. SVG, HTML, PDF and friends are not images to Pillow and are refused earlier.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})

# Leading bytes of the formats above: a file that starts like an image but cannot be parsed is
# corrupt (or cut short), not "not an image".
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# Never silently accept half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 1
    max_aspect: float = 200.0

    @classmethod
    def from_settings(cls, settings: object) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,  # type: ignore[attr-defined]
            max_pixels=settings.max_image_pixels,  # type: ignore[attr-defined]
            min_side=settings.min_image_side,  # type: ignore[attr-defined]
            max_aspect=settings.max_aspect_ratio,  # type: ignore[attr-defined]
        )


class PixelBudget:
    """Bytes of decoded pixels allowed in flight at once, across the threads that decode.

    A decode reserves its estimate (width x height x bands x 2: the decoded buffer and one conversion) before
    its pixels are loaded and gives it back once they are downscaled; a decode that does not fit waits for
    others to finish — except when nothing else is in flight, so one image larger than the budget still
    decodes (alone). Peak memory then grows with the budget, not with the batch or the image.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(1, int(limit_bytes))
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + nbytes > self.limit:
                self._cond.wait()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


def decoded_bytes(image: Image.Image) -> int:
    """What decoding ``image`` (at its current, possibly drafted, size) costs: buffer plus one conversion."""
    return image.width * image.height * max(1, len(image.getbands())) * 2


class ImageRejected(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_image_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else :class:`ImageRejected` (never blocks).

    For query images (``reco search --image``, ``reco predict --image``) and re-reads of stored items: the
    path is stat-ed before it is opened, so a FIFO, a device (``/dev/zero``) or a folder is refused without
    a read; the descriptor is stat-ed again, and at most ``max_bytes + 1`` bytes are ever read.
    """
    shown = str(path)

    def check(info: os.stat_result) -> None:
        _require_regular(info, max_bytes, shown)

    try:
        fd = open_regular_file(path, check)
    except FileNotFoundError as exc:
        raise ImageRejected(RejectReason.MISSING, f"{shown}: no such file") from exc
    except OSError as exc:
        raise ImageRejected(RejectReason.MISSING, f"{shown}: unreadable ({exc.strerror or exc})") from exc
    data = read_capped(fd, max_bytes, check)
    if data is None:
        raise ImageRejected(RejectReason.TOO_LARGE, f"{shown} grew past the cap of {max_bytes} bytes while read")
    return data


StatCheck = Callable[[os.stat_result], None]  # raises to refuse a file by its stat
_READ_CHUNK = 1 << 20


def open_regular_file(path: str | Path, check: StatCheck) -> int:
    """A descriptor of ``path`` opened for reading, never blocking: ``check`` judges the path's stat first, so
    a FIFO or a device refused by it is never opened. An ``OSError`` (no such file, no permission) propagates."""
    check(os.stat(path))
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))


def read_capped(fd: int, max_bytes: int, check: StatCheck) -> bytes | None:
    """The bytes behind ``fd`` (closed after): ``check`` judges the open descriptor's stat first (the file
    checked is the file read), then at most ``max_bytes + 1`` bytes are read, even from a file that grows
    meanwhile. None when it held more than ``max_bytes``."""
    with os.fdopen(fd, "rb", buffering=0) as handle:
        check(os.fstat(handle.fileno()))
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = handle.read(min(_READ_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return None if total > max_bytes else b"".join(chunks)


def _require_regular(info: os.stat_result, max_bytes: int, shown: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, f"{shown} is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected(RejectReason.NOT_AN_IMAGE,
                            f"{shown} is not a regular file (a device, FIFO or socket): give an image file")
    if info.st_size > max_bytes:
        raise ImageRejected(RejectReason.TOO_LARGE,
                            f"{shown} is {info.st_size} bytes > cap {max_bytes} (RECO_MAX_IMAGE_BYTES)")


def open_image_safely(
    data: bytes, limits: ImageLimits | None = None, *, fit: int | None = None, budget: PixelBudget | None = None,
) -> Image.Image:
    """Decode ``data`` fully, first frame only, EXIF-rotated upright, converted to RGB.

    ``fit``: the side the encoder needs (its input size). Then the image is made small right after decoding —
    JPEG decoded at a reduced scale (draft mode), any other format reduced by an integer factor — so its
    shorter side stays at least ``2 * fit`` (the encoder resizes from there; quality is unchanged in practice)
    and a 40-Mpx image costs a few hundred KB once decoded instead of 120 MB. The original size is kept in
    ``image.info["original_size"]``. ``budget``: decoded bytes in flight across threads (:class:`PixelBudget`).

    Raises :class:`ImageRejected` with one :class:`RejectReason` for anything unusable.
    """
    limits = limits or ImageLimits()
    if not data:
        raise ImageRejected(RejectReason.EMPTY_FILE, "zero bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected(RejectReason.TOO_LARGE, f"{len(data)} bytes > cap {limits.max_bytes}")
    image = _open_header(data, limits)
    try:
        _check_geometry(image, limits)
        original = image.size
        if fit and image.format == "JPEG" and min(image.size) >= 4 * fit:
            with contextlib.suppress(Exception):  # draft is an optimisation: a decoder without it loads in full
                image.draft(image.mode, (2 * fit, 2 * fit))
        with budget.hold(decoded_bytes(image)) if budget is not None else contextlib.nullcontext():
            out = _decode_upright_rgb(image, data, fit)
        out.info["original_size"] = original
        return out
    finally:
        image.close()


def _decode_upright_rgb(image: Image.Image, data: bytes, fit: int | None) -> Image.Image:
    try:
        image.seek(0)  # animated GIF/WebP: the first frame stands for the file
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
    except OSError as exc:
        if "truncated" in str(exc).lower() or _cut_short(data):
            raise ImageRejected(RejectReason.TRUNCATED, str(exc)) from exc
        raise ImageRejected(RejectReason.CORRUPT, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile input; all of it is "corrupt"
        raise ImageRejected(RejectReason.CORRUPT, f"{type(exc).__name__}: {exc}") from exc
    small = shrink(image, fit)
    try:
        upright = ImageOps.exif_transpose(small) or small
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        upright = small
    try:
        return to_rgb(upright)
    except Exception as exc:  # noqa: BLE001 - an exotic mode Pillow cannot convert
        raise ImageRejected(RejectReason.UNSUPPORTED, f"mode {upright.mode}: {type(exc).__name__}: {exc}") from exc


def shrink(image: Image.Image, fit: int | None) -> Image.Image:
    """``image`` reduced by the largest integer factor that keeps its shorter side >= ``2 * fit`` (or itself).

    ``Image.reduce`` is a box filter over the loaded buffer (no resampling kernel, no float copy); modes it
    does not handle (palette, 16-bit) are converted to RGB first. The EXIF block travels with the image.
    """
    if not fit:
        return image
    factor = min(image.size) // (2 * fit)
    if factor < 2:
        return image
    try:
        small = image.reduce(factor)
    except (ValueError, NotImplementedError):
        small = to_rgb(image).reduce(factor)
    exif = image.info.get("exif") or (image.getexif().tobytes() if image.getexif() else None)
    if exif:
        small.info["exif"] = exif
        with contextlib.suppress(Exception):
            small.getexif().load(exif)  # exif_transpose reads the orientation from getexif()
    return small


def _open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    # No warnings.catch_warnings() here: it swaps process-wide state and is not thread-safe (decode_rows
    # runs this in a pool). Pillow raises DecompressionBombError itself past 2x its own cap; below that,
    # _check_geometry applies limits.max_pixels, the cap that matters.
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _cut_short(data):
            raise ImageRejected(RejectReason.TRUNCATED, _cut_short_detail(data)) from exc
        if data.startswith(_SIGNATURES):
            raise ImageRejected(RejectReason.CORRUPT, "image signature, but the header cannot be parsed") from exc
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, "not a recognised image format") from exc
    except Exception as exc:  # noqa: BLE001 - header parsers raise anything on hostile input
        if _cut_short(data):  # WebP decodes at open: a cut file fails here, as "could not create decoder"
            raise ImageRejected(RejectReason.TRUNCATED, f"{_cut_short_detail(data)} ({exc})") from exc
        reason = RejectReason.TRUNCATED if "truncated" in str(exc).lower() else RejectReason.CORRUPT
        raise ImageRejected(reason, f"{type(exc).__name__}: {exc}") from exc
    if image.format not in ALLOWED_FORMATS:
        image.close()
        raise ImageRejected(RejectReason.UNSUPPORTED, f"format {image.format} is not accepted")
    return image


def _cut_short(data: bytes) -> bool:
    """A RIFF container (WebP) whose header declares more bytes than the file holds was cut short."""
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data)


def _cut_short_detail(data: bytes) -> str:
    return f"WebP declares {int.from_bytes(data[4:8], 'little') + 8} bytes, the file holds {len(data)}"


def _check_geometry(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            RejectReason.DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} px > cap {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(RejectReason.TOO_SMALL, f"{width}x{height} below {limits.min_side} px")
    if max(width, height) / max(1, min(width, height)) > limits.max_aspect:
        raise ImageRejected(RejectReason.BAD_ASPECT, f"{width}x{height} exceeds aspect {limits.max_aspect:g}:1")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white, 16-bit is rescaled."""
    mode = image.mode
    if mode in {"P", "L", "RGB"} and "transparency" in image.info:
        # a tRNS colour key (palette, grey or RGB) is transparency like an alpha channel: same white backdrop
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode in {"I", "F"}:
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
