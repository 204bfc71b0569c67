"""Training data for the base model: manifest rows (read by app/manifest.py), a decoded uint8 image cache,
cached caption features.

Decoding JPEGs and running the frozen text tower cost more than a training step of a small image
tower, so both are done once and kept under a cache folder (never in git); a cache file's name carries
a fingerprint of everything it depends on, so a changed input makes a new file instead of a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from app.imaging import open_image_safely
from app.manifest import ManifestError
from app.manifest import read_manifest as read_rows


@dataclass(frozen=True)
class ManifestRow:
    image: Path
    caption: str
    label: int | None
    split: str


def read_manifest(path: Path, split: str | None = None) -> list[ManifestRow]:
    """Rows of a dataset's ``manifest.csv`` (of ``split`` when given) through the core's reader
    (:func:`app.manifest.read_manifest`): image paths resolved and confined to the manifest's folder.

    A training or evaluation set is used whole, so a row the core refuses (a path outside the folder, a bad
    label, a broken line) stops the read with :class:`~app.manifest.ManifestError` instead of being skipped.
    """
    rows: list[ManifestRow] = []
    for row in read_rows(Path(path)):
        if row.problem is not None or row.path is None:
            detail = row.problem[1] if row.problem else "no local image path"
            raise ManifestError(f"{row.source}: {detail}")
        if split is not None and (row.split or "") != split:
            continue
        rows.append(ManifestRow(image=row.path, caption=row.caption, label=row.label, split=row.split or ""))
    return rows


@dataclass(frozen=True)
class CaptionedImages:
    """Unique images of a split and, per caption, the index of its image (Flickr8k: five per image)."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (n_captions,) int64 index into ``images``

    @classmethod
    def from_rows(cls, rows: Sequence[ManifestRow]) -> CaptionedImages:
        index: dict[Path, int] = {}
        captions: list[str] = []
        owner: list[int] = []
        for row in rows:
            idx = index.setdefault(row.image, len(index))
            if row.caption.strip():
                captions.append(row.caption.strip())
                owner.append(idx)
        return cls(list(index), captions, np.asarray(owner, dtype=np.int64))

    def subset(self, n_images: int) -> CaptionedImages:
        """The first ``n_images`` images and their captions (tests, smoke runs)."""
        keep = self.caption_image < n_images
        return CaptionedImages(
            self.images[:n_images], [c for c, k in zip(self.captions, keep, strict=True) if k], self.caption_image[keep]
        )


def load_image(path: Path) -> Image.Image:
    """A dataset file through the project's one safe decoder."""
    return open_image_safely(Path(path).read_bytes())


def square_uint8(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), centre crop: (size, size, 3) uint8, as open_clip's eval transform."""
    w, h = image.size
    scale = size / min(w, h)
    resized = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def cached_image_array(images: Sequence[Path], size: int, cache_dir: Path, *, progress: bool = True) -> np.ndarray:
    """All ``images`` decoded once to (n, size, size, 3) uint8; memory-mapped from ``cache_dir`` afterwards."""
    key = fingerprint(size, *[(p, p.stat().st_size) for p in images])
    target = Path(cache_dir) / f"images-{size}px-{len(images)}-{key}.npy"
    if target.is_file():
        return cast(np.ndarray, np.load(target, mmap_mode="r"))
    target.parent.mkdir(parents=True, exist_ok=True)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(images, desc=f"decode {size}px", unit="img", disable=not progress)):
        out[i] = square_uint8(load_image(path), size)
    partial = target.with_suffix(".partial.npy")
    np.save(partial, out)
    partial.replace(target)  # atomic: a killed run never leaves a half-written cache behind
    return out


def cached_text_features(
    captions: Sequence[str],
    encode: Callable[[Sequence[str]], torch.Tensor],
    encoder_key: str,
    cache_dir: Path,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Frozen text-tower features of ``captions`` (before the trainable projection), computed once."""
    target = Path(cache_dir) / f"text-{len(captions)}-{fingerprint(encoder_key, *captions)}.npy"
    if target.is_file():
        return torch.from_numpy(np.load(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    bar = tqdm(total=len(captions), desc="text features", unit="cap", disable=not progress)
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        chunks.append(encode(chunk).float().cpu())
        bar.update(len(chunk))
    bar.close()
    feats = torch.cat(chunks) if chunks else torch.zeros(0)
    partial = target.with_suffix(".partial.npy")
    np.save(partial, feats.numpy())
    partial.replace(target)
    return feats
