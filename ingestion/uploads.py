"""Uploaded files (the UI's Ingestion page) stored safely on disk, then ingested like any other source.

A zip is checked as a whole before one byte is written: entry count, image count, declared sizes per
member and in total, compression ratio (zip bomb), and every name (absolute, ``..``, drive letters,
NUL, too deep) and type (symlinks, devices, FIFOs, encrypted members) — any of these refuses the
upload. Extraction then counts the bytes it actually writes, because a header may lie. Only images,
``.txt`` captions and manifests are extracted; other members are skipped and reported.

Uploads are stored under ``<data_dir>/uploads/<sha256 of the upload, 16 hex>/``: the same upload twice
lands in the same folder, and ingestion is idempotent anyway (content hash). A zip is extracted into a
private temporary folder first and renamed into place, so a half-extracted upload is never ingested.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.config import Settings
from app.manifest import MANIFEST_SUFFIXES, printable
from app.schemas import RejectReason
from ingestion.sources import IMAGE_SUFFIXES

ZIP_SUFFIXES = frozenset({".zip"})
CAPTION_SUFFIXES = frozenset({".txt"})
EXTRACTED_SUFFIXES = IMAGE_SUFFIXES | CAPTION_SUFFIXES | MANIFEST_SUFFIXES
PREFERRED_MANIFESTS = ("manifest.csv", "manifest.jsonl", "manifest.ndjson", "manifest.json")
MAX_DEPTH = 16
MAX_COMPONENT_BYTES = 255
# Below this size a high ratio is harmless (a caption file of repeated words compresses 100x).
RATIO_FLOOR_BYTES = 256 * 1024
CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class UploadRejected(ValueError):
    """The upload as a whole is refused; ``reason`` is a wire name shared with ingestion failures."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int  # the uploaded file itself
    max_total_bytes: int  # all extracted members together (declared and actually written)
    max_images: int  # image members
    max_entries: int  # every entry of the archive, folders and skipped members included
    max_member_bytes: int  # one member
    max_ratio: float = 100.0  # uncompressed / compressed, per member above RATIO_FLOOR_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(max_upload_bytes=settings.upload_max_total_bytes, max_total_bytes=settings.upload_max_total_bytes,
                   max_images=settings.upload_max_files, max_entries=4 * settings.upload_max_files + 16,
                   max_member_bytes=settings.max_image_bytes)


@dataclass(frozen=True)
class StoredUpload:
    folder: Path  # where the upload lives now
    source: Path  # what to ingest: the manifest inside, or the folder
    files: int  # files written (images, captions, manifests)
    images: int
    skipped: tuple[str, ...] = ()  # members not extracted (other types, macOS metadata)
    reused: bool = False  # the same upload was stored before


def upload_root(settings: Settings) -> Path:
    return settings.data_dir / "uploads"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# --- names and types ------------------------------------------------------------------------------------
def member_path(name: str) -> PurePosixPath:
    """A member's name as a safe relative path, or :class:`UploadRejected` (PATH_OUTSIDE_ROOT)."""
    shown = printable(name)
    if "\x00" in name:
        raise UploadRejected(RejectReason.PATH_OUTSIDE_ROOT, f"member name contains NUL: {shown}")
    normal = name.replace("\\", "/")
    if normal.startswith("/") or _DRIVE.match(normal):
        raise UploadRejected(RejectReason.PATH_OUTSIDE_ROOT, f"absolute member path: {shown}")
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UploadRejected(RejectReason.PATH_OUTSIDE_ROOT, f"member path leaves the archive: {shown}")
    if not parts:
        raise UploadRejected(RejectReason.BAD_ROW, f"empty member name: {shown!r}")
    if len(parts) > MAX_DEPTH or any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for p in parts):
        raise UploadRejected(RejectReason.BAD_ROW, f"member path too deep or a name too long: {shown[:200]}")
    return PurePosixPath(*parts)


def _check_type(info: zipfile.ZipInfo, shown: str) -> None:
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # Unix attributes are meaningful
        if stat.S_ISLNK(mode):
            raise UploadRejected(RejectReason.PATH_OUTSIDE_ROOT, f"symbolic link in the archive: {shown}")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UploadRejected(RejectReason.UNSUPPORTED, f"special file in the archive: {shown}")
    if info.flag_bits & 0x1:
        raise UploadRejected(RejectReason.UNSUPPORTED, f"encrypted member: {shown}")


def _check_size(info: zipfile.ZipInfo, limits: UploadLimits, shown: str) -> None:
    if info.file_size > limits.max_member_bytes:
        raise UploadRejected(RejectReason.TOO_LARGE,
                             f"{shown}: {info.file_size} bytes uncompressed > cap {limits.max_member_bytes}")
    if info.file_size > RATIO_FLOOR_BYTES:
        ratio = info.file_size / max(1, info.compress_size)
        if ratio > limits.max_ratio:
            raise UploadRejected(RejectReason.DECOMPRESSION_BOMB,
                                 f"{shown}: compression ratio {ratio:.0f}:1 > cap {limits.max_ratio:g}:1 (zip bomb)")


def _is_metadata(path: PurePosixPath) -> bool:
    return path.parts[0] == "__MACOSX" or path.name.startswith("._") or path.name == ".DS_Store"


@dataclass(frozen=True)
class _Plan:
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]]
    skipped: list[str]
    images: int


def plan_extraction(archive: zipfile.ZipFile, limits: UploadLimits) -> _Plan:
    """Every check that needs no extraction; raises :class:`UploadRejected` on the first problem."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise UploadRejected(RejectReason.TOO_LARGE, f"{len(infos)} archive entries > cap {limits.max_entries}")
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    skipped: list[str] = []
    seen: set[PurePosixPath] = set()
    declared = images = 0
    for info in infos:
        shown = printable(info.filename)
        path = member_path(info.filename)
        _check_type(info, shown)
        if info.is_dir():
            continue
        _check_size(info, limits, shown)
        if path in seen:
            raise UploadRejected(RejectReason.BAD_ROW, f"member stored twice: {shown}")
        seen.add(path)
        if _is_metadata(path) or path.suffix.lower() not in EXTRACTED_SUFFIXES:
            skipped.append(shown)
            continue
        declared += info.file_size
        images += path.suffix.lower() in IMAGE_SUFFIXES
        members.append((info, path))
    if declared > limits.max_total_bytes:
        raise UploadRejected(RejectReason.DECOMPRESSION_BOMB,
                             f"{declared} bytes uncompressed in total > cap {limits.max_total_bytes}")
    if images > limits.max_images:
        raise UploadRejected(RejectReason.TOO_LARGE, f"{images} images > cap {limits.max_images}")
    if not members:
        raise UploadRejected(RejectReason.EMPTY_FILE, "no images, captions or manifests in the archive")
    return _Plan(members, skipped, images)


# --- extraction -----------------------------------------------------------------------------------------
def _write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int,
                  limits: UploadLimits) -> int:
    """Stream one member to a new file (never following or replacing anything); returns bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    cap = min(info.file_size, limits.max_member_bytes, budget)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    written = 0
    with os.fdopen(fd, "wb") as out, archive.open(info) as member:
        while chunk := member.read(CHUNK):
            written += len(chunk)
            if written > cap:  # the header declared less than the member holds
                raise UploadRejected(RejectReason.DECOMPRESSION_BOMB,
                                     f"{printable(info.filename)} inflates past its declared size")
            out.write(chunk)
    return written


def _extract(archive: zipfile.ZipFile, plan: _Plan, dest: Path, limits: UploadLimits) -> int:
    root = os.path.realpath(dest)
    budget = limits.max_total_bytes
    for info, path in plan.members:
        target = dest.joinpath(*path.parts)
        if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:  # belt and braces
            raise UploadRejected(RejectReason.PATH_OUTSIDE_ROOT, f"{printable(info.filename)} leaves the folder")
        try:
            budget -= _write_member(archive, info, target, budget, limits)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise UploadRejected(RejectReason.CORRUPT, f"{printable(info.filename)}: {exc}") from exc
    return len(plan.members)


def choose_source(folder: Path) -> Path:
    """The manifest to ingest when the upload holds one (``manifest.*`` first, else the only one), else the folder."""
    manifests = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES),
                       key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    for name in PREFERRED_MANIFESTS:
        for manifest in manifests:
            if manifest.name.lower() == name:
                return manifest
    return manifests[0] if len(manifests) == 1 else folder


def _open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise UploadRejected(RejectReason.CORRUPT, f"not a readable zip archive: {exc}") from exc


def store_zip(data: bytes, settings: Settings, *, limits: UploadLimits | None = None) -> StoredUpload:
    """Check and extract a zip under the uploads folder; raises :class:`UploadRejected`."""
    limits = limits or UploadLimits.from_settings(settings)
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(RejectReason.TOO_LARGE, f"{len(data)} bytes > upload cap {limits.max_upload_bytes}")
    with _open_zip(data) as archive:
        plan = plan_extraction(archive, limits)
        final = upload_root(settings) / _digest(data)
        if final.is_dir():
            return StoredUpload(final, choose_source(final), len(plan.members), plan.images, tuple(plan.skipped), True)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=final.parent))
        try:
            files = _extract(archive, plan, staging, limits)
            try:
                staging.rename(final)
            except OSError:  # the same upload finished in parallel: keep that one
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return StoredUpload(final, choose_source(final), files, plan.images, tuple(plan.skipped))


def safe_file_name(name: str, default: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(name.replace("\\", "/")).name).strip("._")
    return base[:100] or default


def store_manifest(name: str, data: bytes, settings: Settings, *, limits: UploadLimits | None = None) -> StoredUpload:
    """A manifest on its own: its relative paths resolve inside its upload folder (so they must come with
    a zip), absolute ones must lie under ``RECO_ALLOWED_ROOTS`` — ingestion confines them as usual."""
    limits = limits or UploadLimits.from_settings(settings)
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        known = ", ".join(sorted(MANIFEST_SUFFIXES))
        raise UploadRejected(RejectReason.UNSUPPORTED, f"{printable(name)}: not a manifest ({known})")
    if not data:
        raise UploadRejected(RejectReason.EMPTY_FILE, f"{printable(name)} is empty")
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(RejectReason.TOO_LARGE, f"{len(data)} bytes > upload cap {limits.max_upload_bytes}")
    folder = upload_root(settings) / _digest(data)
    target = folder / safe_file_name(name, f"manifest{suffix}")
    reused = target.is_file()
    if not reused:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.name}.part"
        tmp.write_bytes(data)
        tmp.replace(target)
    return StoredUpload(folder, target, 1, 0, (), reused)


def store_upload(name: str, data: bytes, settings: Settings, *, limits: UploadLimits | None = None) -> StoredUpload:
    """A zip of images (with captions and/or a manifest) or a manifest file, by its name's suffix."""
    suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    if suffix in ZIP_SUFFIXES:
        return store_zip(data, settings, limits=limits)
    if suffix in MANIFEST_SUFFIXES:
        return store_manifest(name, data, settings, limits=limits)
    known = ", ".join(sorted(ZIP_SUFFIXES | MANIFEST_SUFFIXES))
    raise UploadRejected(RejectReason.UNSUPPORTED, f"{printable(name)}: upload a zip or a manifest ({known})")


def ingest_upload(name: str, data: bytes, settings: Settings, **kwargs: Any) -> dict[str, Any]:
    """Store, then ingest in this process (``kwargs`` go to :func:`ingestion.pipeline.ingest_source`)."""
    from ingestion.pipeline import ingest_source

    stored = store_upload(name, data, settings)
    return ingest_source(stored.source, settings, **kwargs) | {"upload": str(stored.folder)}
