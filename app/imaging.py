"""Bytes to a safe, upright RGB image — or a reason why not.

Everything that turns untrusted bytes into pixels goes through :func:`open_image_safely`: ingestion,
uploads in the UI, ``reco predict``/``search --image`` and the refine worker.
"""

from __future__ import annotations

import io
import os
import stat
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
    try:
        _require_regular(os.stat(path), max_bytes, shown)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError as exc:
        raise ImageRejected(RejectReason.MISSING, f"{shown}: no such file") from exc
    except OSError as exc:
        raise ImageRejected(RejectReason.MISSING, f"{shown}: unreadable ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb", buffering=0) as handle:
        _require_regular(os.fstat(handle.fileno()), max_bytes, shown)
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = handle.read(min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > max_bytes:
        raise ImageRejected(RejectReason.TOO_LARGE, f"{shown} grew past the cap of {max_bytes} bytes while read")
    return b"".join(chunks)


def _require_regular(info: os.stat_result, max_bytes: int, shown: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, f"{shown} is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected(RejectReason.NOT_AN_IMAGE,
                            f"{shown} is not a regular file (a device, FIFO or socket): give an image file")
    if info.st_size > max_bytes:
        raise ImageRejected(RejectReason.TOO_LARGE,
                            f"{shown} is {info.st_size} bytes > cap {max_bytes} (RECO_MAX_IMAGE_BYTES)")


def open_image_safely(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Decode ``data`` fully, first frame only, EXIF-rotated upright, converted to RGB.

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
        try:
            upright = ImageOps.exif_transpose(image) or image
        except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
            upright = image
        try:
            return to_rgb(upright)
        except Exception as exc:  # noqa: BLE001 - an exotic mode Pillow cannot convert
            raise ImageRejected(RejectReason.UNSUPPORTED, f"mode {upright.mode}: {type(exc).__name__}: {exc}") from exc
    finally:
        image.close()


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
