"""The datasets of ``../shared/data`` encoded once per encoder and cached on disk.

Per dataset: its unique images (embedding, sha256 of the file, 64-bit dHash, split, label) and its
captions (embedding, index of their image). A cache file's name carries the encoder id and a
fingerprint of the manifest and the row limit, so a changed model or manifest makes a new file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from app.encoder.base import Encoder
from app.evaluation.near_duplicates import dhash
from app.manifest import load_classes
from app.services.method_common import safe_name
from programs.pretrain.data import ManifestRow, fingerprint, load_image, read_manifest

log = logging.getLogger(__name__)

IMAGE_BATCH = 256
TEXT_BATCH = 512


@dataclass
class EncodedSet:
    """One dataset: image rows (unique images) and caption rows, all embeddings L2-normalised."""

    name: str
    image_files: list[str]  # path relative to the dataset folder
    image_emb: np.ndarray  # (n_images, d)
    image_sha256: list[str]
    image_dhash: np.ndarray  # (n_images,) uint64
    image_split: np.ndarray  # (n_images,) str
    image_label: np.ndarray  # (n_images,) int64, -1 = none
    captions: list[str]
    text_emb: np.ndarray  # (n_captions, d)
    caption_image: np.ndarray  # (n_captions,) int64 index into the image rows
    class_names: list[str] | None = None

    def images_of(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.image_split == split)

    def captions_of(self, images: np.ndarray) -> np.ndarray:
        """Caption rows whose image is among ``images``."""
        return np.flatnonzero(np.isin(self.caption_image, images))


def _select_rows(rows: list[ManifestRow], limit: int | None) -> list[ManifestRow]:
    """All rows, or the rows of the first ``limit`` images of each split (smoke runs)."""
    if limit is None:
        return rows
    kept_images: dict[str, set[Path]] = {}
    out = []
    for row in rows:
        images = kept_images.setdefault(row.split, set())
        if row.image in images or len(images) < limit:
            images.add(row.image)
            out.append(row)
    return out


def _encode_images(encoder: Encoder, paths: Sequence[Path], progress: bool, desc: str
                   ) -> tuple[np.ndarray, list[str], np.ndarray]:
    embeddings, digests, hashes = [], [], []
    for start in tqdm(range(0, len(paths), IMAGE_BATCH), desc=desc, unit="batch", disable=not progress):
        images = []
        for path in paths[start: start + IMAGE_BATCH]:
            data = Path(path).read_bytes()
            digests.append(hashlib.sha256(data).hexdigest())
            image = load_image(path)
            hashes.append(dhash(image))
            images.append(image)
        embeddings.append(encoder.encode_images(images))
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, encoder.dim), np.float32)
    return emb.astype(np.float32), digests, np.asarray(hashes, np.uint64)


def _encode_texts(encoder: Encoder, texts: Sequence[str], progress: bool, desc: str) -> np.ndarray:
    chunks = [encoder.encode_texts(list(texts[s: s + TEXT_BATCH]))
              for s in tqdm(range(0, len(texts), TEXT_BATCH), desc=desc, unit="batch", disable=not progress)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, encoder.dim), np.float32)


def cache_file(cache_dir: Path, encoder_id: str, dataset_dir: Path, limit: int | None) -> Path:
    manifest = Path(dataset_dir) / "manifest.csv"
    stat = manifest.stat()
    key = fingerprint(encoder_id, manifest.resolve(), stat.st_size, stat.st_mtime_ns, limit)
    return Path(cache_dir) / safe_name(encoder_id) / f"{Path(dataset_dir).name}-{key}.npz"


def encode_dataset(
    encoder: Encoder, dataset_dir: Path, cache_dir: Path, *, limit: int | None = None, progress: bool = True
) -> EncodedSet:
    """Encode (or load from the cache) every image and caption of one dataset."""
    dataset_dir = Path(dataset_dir)
    name = dataset_dir.name
    classes = load_classes(dataset_dir / "classes.txt") if (dataset_dir / "classes.txt").is_file() else None
    target = cache_file(cache_dir, encoder.encoder_id, dataset_dir, limit)
    if target.is_file():
        with np.load(target, allow_pickle=False) as z:
            return EncodedSet(name, z["image_files"].tolist(), z["image_emb"], z["image_sha256"].tolist(),
                              z["image_dhash"], z["image_split"], z["image_label"], z["captions"].tolist(),
                              z["text_emb"], z["caption_image"], classes)
    rows = _select_rows(read_manifest(dataset_dir / "manifest.csv"), limit)
    index: dict[Path, int] = {}
    splits: list[str] = []
    labels: list[int] = []
    captions: list[str] = []
    owner: list[int] = []
    for row in rows:
        if row.image not in index:
            index[row.image] = len(index)
            splits.append(row.split)
            labels.append(-1 if row.label is None else row.label)
        if row.caption.strip():
            captions.append(row.caption.strip())
            owner.append(index[row.image])
    paths = list(index)
    image_emb, digests, hashes = _encode_images(encoder, paths, progress, f"{name} images")
    text_emb = _encode_texts(encoder, captions, progress, f"{name} captions")
    out = EncodedSet(name, [str(p.relative_to(dataset_dir.resolve())) for p in paths], image_emb, digests, hashes,
                     np.asarray(splits, dtype=str), np.asarray(labels, np.int64), captions, text_emb,
                     np.asarray(owner, np.int64), classes)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.npz")
    np.savez(partial, image_files=np.asarray(out.image_files, dtype=str), image_emb=out.image_emb,
             image_sha256=np.asarray(out.image_sha256, dtype=str), image_dhash=out.image_dhash,
             image_split=out.image_split, image_label=out.image_label,
             captions=np.asarray(out.captions, dtype=str), text_emb=out.text_emb, caption_image=out.caption_image)
    partial.replace(target)  # atomic: a killed run leaves no half-written cache
    log.info("cached %s embeddings at %s", name, target)
    return out


def held_out(files: Sequence[str], fraction_denominator: int, salt: str) -> np.ndarray:
    """Deterministic hold-out: sha1 of ``salt:file name`` mod ``fraction_denominator`` == 0.

    The salt matters: the data's own splits are sha1(file name) mod 8, so an unsalted mod 2 inside one
    split would select all or none of it.
    """
    return np.asarray([int(hashlib.sha1(f"{salt}:{Path(f).name}".encode()).hexdigest(), 16) % fraction_denominator
                       == 0 for f in files], bool)


# --- strongly augmented views: queries the base has not memorised (issue 16, lever a) -------------------
AUGMENT_VERSION = "strong-v1"


def strong_augment() -> Any:  # a torchvision transform (random state: torch's global generator)
    """Stronger than the base's own training augmentation (scale 0.4-1, jitter 0.3): random resized crop
    to 15-50 % of the area, colour jitter 0.5, blur, grayscale 0.2, flip."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(160, scale=(0.15, 0.5), ratio=(0.75, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1),
        T.RandomGrayscale(p=0.2),
        T.GaussianBlur(kernel_size=9, sigma=(0.5, 2.5)),
    ])


def encode_augmented_views(
    encoder: Encoder, dataset_dir: Path, data: EncodedSet, images: np.ndarray, cache_dir: Path, *,
    views: int = 1, seed: int = 0, limit: int | None = None, progress: bool = True,
) -> np.ndarray:
    """(views, len(images), d) embeddings of strongly augmented views of the given image rows, cached.

    The memory keeps the clean embeddings; the fusion is trained with these as image queries, which the
    frozen base has not seen in this form (its R@1 on them is reported next to clean train and test).
    """
    import torch

    dataset_dir = Path(dataset_dir)
    manifest = dataset_dir / "manifest.csv"
    stat = manifest.stat()
    key = fingerprint(encoder.encoder_id, manifest.resolve(), stat.st_size, stat.st_mtime_ns, limit,
                      AUGMENT_VERSION, views, seed, len(images), hashlib.sha1(np.asarray(images).tobytes()).hexdigest())
    target = Path(cache_dir) / safe_name(encoder.encoder_id) / f"{dataset_dir.name}-aug-{key}.npy"
    if target.is_file():
        return cast(np.ndarray, np.load(target, allow_pickle=False))
    out = np.empty((views, len(images), encoder.dim), np.float32)
    root = dataset_dir.resolve()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transform = strong_augment()
        for view in range(views):
            for start in tqdm(range(0, len(images), IMAGE_BATCH), desc=f"{dataset_dir.name} augmented view {view}",
                              unit="batch", disable=not progress):
                chunk = images[start: start + IMAGE_BATCH]
                batch = [transform(load_image(root / data.image_files[i])) for i in chunk]
                emb = encoder.encode_images(batch)
                out[view, start: start + len(chunk)] = emb / np.maximum(
                    np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.npy")
    with partial.open("wb") as fh:
        np.save(fh, out)
    partial.replace(target)
    return out
