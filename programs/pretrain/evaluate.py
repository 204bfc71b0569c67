"""Figures of a base encoder: Flickr8k retrieval R@K both ways and zero-shot top-1 on class manifests.

Everything goes through the :class:`~app.encoder.base.Encoder` interface (PIL images in, the encoder's
own preprocessing), so the numbers are those of the encoder every other part of the system uses.
Values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from app.encoder.base import Encoder
from app.manifest import load_classes
from programs.pretrain.data import CaptionedImages, load_image, read_manifest

RECALL_KS = (1, 5, 10)
ZERO_SHOT_SETS = ("imagenette", "cifar10", "cub100", "flowers12")

# A CLIP-style prompt ensemble; a domain hint adds CLIP's own "a type of ..." prompt for the
# fine-grained sets (as CLIP's paper does for birds and flowers).
PROMPT_TEMPLATES = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a photo of the {c}.",
    "a close-up photo of a {c}.",
    "a blurry photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
)
DOMAIN_HINTS = {"cub100": "bird", "flowers12": "flower"}


def retrieval_recalls(
    image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """I→T: an image is right at k if any of its captions is in its top k; T→I: a caption's one image."""
    sims = image_emb @ text_emb.T  # (images, captions)
    owner = np.asarray(caption_image)
    positive = owner[None, :] == np.arange(len(image_emb))[:, None]
    best_positive = np.where(positive, sims, -np.inf).max(axis=1)
    i2t_rank = (sims > best_positive[:, None]).sum(axis=1)
    true_score = sims[owner, np.arange(len(owner))]
    t2i_rank = (sims > true_score[None, :]).sum(axis=0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
    return out


def encode_image_files(
    encoder: Encoder, paths: Sequence[Path], *, batch: int = 128, progress: bool = True, desc: str = "encode images"
) -> np.ndarray:
    chunks = []
    for start in tqdm(range(0, len(paths), batch), desc=desc, unit="batch", disable=not progress):
        images = [load_image(p) for p in paths[start : start + batch]]
        chunks.append(encoder.encode_images(images))
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)


def encode_texts_batched(
    encoder: Encoder, texts: Sequence[str], *, batch: int = 512, progress: bool = True, desc: str = "encode texts"
) -> np.ndarray:
    chunks = []
    for start in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", disable=not progress):
        chunks.append(encoder.encode_texts(list(texts[start : start + batch])))
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)


def evaluate_retrieval(
    encoder: Encoder, manifest: Path, split: str = "test", *, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    data = CaptionedImages.from_rows(read_manifest(manifest, split))
    if limit is not None:
        data = data.subset(limit)
    image_emb = encode_image_files(encoder, data.images, progress=progress, desc=f"{split} images")
    text_emb = encode_texts_batched(encoder, data.captions, progress=progress, desc=f"{split} captions")
    return {
        "split": split,
        "n_images": len(data.images),
        "n_captions": len(data.captions),
        **retrieval_recalls(image_emb, text_emb, data.caption_image),
    }


def class_text_embeddings(encoder: Encoder, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Per class: mean of its normalised prompt embeddings, renormalised (CLIP's prompt ensembling)."""
    prompts = [t.format(c=c) for c in classes for t in templates]
    emb = encoder.encode_texts(prompts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return cast(np.ndarray, (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32))


def templates_for(dataset: str) -> tuple[str, ...]:
    hint = DOMAIN_HINTS.get(dataset)
    return PROMPT_TEMPLATES + ((f"a photo of a {{c}}, a type of {hint}.",) if hint else ())


def zero_shot_top1(
    encoder: Encoder, dataset_dir: Path, split: str = "test", *, progress: bool = True
) -> dict[str, Any]:
    dataset_dir = Path(dataset_dir)
    rows = [r for r in read_manifest(dataset_dir / "manifest.csv", split) if r.label is not None]
    classes = load_classes(dataset_dir / "classes.txt")
    class_emb = class_text_embeddings(encoder, classes, templates_for(dataset_dir.name))
    image_emb = encode_image_files(encoder, [r.image for r in rows], progress=progress, desc=f"{dataset_dir.name}")
    predicted = (image_emb @ class_emb.T).argmax(axis=1)
    labels = np.asarray([r.label for r in rows])
    return {
        "split": split,
        "n": len(rows),
        "classes": len(classes),
        "chance": 1 / len(classes),
        "top1": float((predicted == labels).mean()),
    }


def evaluate_base_model(
    encoder: Encoder, data_root: Path, *, zero_shot_sets: Sequence[str] = ZERO_SHOT_SETS, progress: bool = True
) -> dict[str, Any]:
    """Flickr8k test retrieval and zero-shot top-1 on each of ``zero_shot_sets`` (test splits)."""
    data_root = Path(data_root)
    report: dict[str, Any] = {
        "encoder_id": encoder.encoder_id,
        "flickr8k": evaluate_retrieval(encoder, data_root / "flickr8k" / "manifest.csv", "test", progress=progress),
        "zero_shot": {},
    }
    for name in zero_shot_sets:
        report["zero_shot"][name] = zero_shot_top1(encoder, data_root / name, "test", progress=progress)
    return report
