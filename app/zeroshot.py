"""Zero-shot classification with class names and prompt templates, CLIP-style, optionally refined.

Class embeddings follow open_clip's ``build_zero_shot_classifier``: every template is filled with the
class name, encoded, L2-normalised, averaged over templates and normalised again. For the modes that
refine the text side (``text``, ``both``) each prompt embedding is first refined by text->text
search in the memory, then averaged: the prompts are the text queries the fusion was trained on.

Class embeddings depend only on (encoder, checkpoint, memory version, class names, templates, k and
the retrieval switches), so they are computed once and cached under that key, in process and
optionally on disk; a prediction then costs one image encode and at most one image refinement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from app.refine import Refiner
from app.schemas import Modality, RefineMode

log = logging.getLogger(__name__)

# CLIP's single prompt, and the short ensemble open_clip ships for ImageNet (SIMPLE_IMAGENET_TEMPLATES).
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {c}.",)
CLIP_SHORT_TEMPLATES: tuple[str, ...] = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)
# Worded like the captioned memory rows of ../shared/data ("a photo of a <class>, a type of bird."), so
# text->text search from a class prompt lands on the memory pairs of that class (issue 5).
CAPTION_LIKE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption-like": ("a photo of a {c}.",),
    "caption-like-bird": ("a photo of a {c}, a type of bird.",),
    "caption-like-flower": ("a photo of a {c}, a type of flower.",),
}
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": SINGLE_TEMPLATE, "clip-short": CLIP_SHORT_TEMPLATES, **CAPTION_LIKE_TEMPLATES,
}
DEFAULT_TEMPLATES = "clip-short"
CLASS_CHUNK = 64  # classes per batched step of a class set's preparation (one progress update each)


def caption_like_set(domain: str | None) -> str:
    """The caption-like template set for a domain hint ("bird", "flower") or none."""
    name = f"caption-like-{domain}" if domain else "caption-like"
    return name if name in TEMPLATE_SETS else "caption-like"


def _named_ensemble(name: str) -> tuple[str, ...] | None:
    """``"clip-short+caption-like-bird"``: named sets joined by '+' form one prompt ensemble."""
    parts = name.split("+")
    if len(parts) < 2 or not all(p in TEMPLATE_SETS for p in parts):
        return None
    return tuple(dict.fromkeys(t for p in parts for t in TEMPLATE_SETS[p]))


class TextEncoder(Protocol):
    @property
    def encoder_id(self) -> str: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def resolve_templates(templates: str | Sequence[str] | Path | None) -> tuple[str, ...]:
    """A named set (or sets joined by '+'), a file (one template per line, ``{c}`` = class name), or the
    templates themselves."""
    if templates is None:
        return TEMPLATE_SETS[DEFAULT_TEMPLATES]
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        return TEMPLATE_SETS[templates]
    if isinstance(templates, str) and (ensemble := _named_ensemble(templates)) is not None:
        return ensemble
    if isinstance(templates, str | Path):
        if not Path(templates).is_file():
            raise ValueError(f"unknown template set {templates!r}; known: {sorted(TEMPLATE_SETS)} or a file")
        lines = [ln.strip() for ln in Path(templates).read_text(encoding="utf-8").splitlines()]
        out = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    else:
        out = tuple(templates)
    if not out or any("{c}" not in t for t in out):
        raise ValueError("every template must contain '{c}' where the class name goes")
    return out


def softmax(logits: np.ndarray, scale: float) -> np.ndarray:
    """Row-wise softmax of ``scale * logits``."""
    z = scale * (logits - logits.max(axis=-1, keepdims=True))
    p = np.exp(z)
    return cast(np.ndarray, p / p.sum(axis=-1, keepdims=True))


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, scale: float, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| of the top class, weighted over ``bins`` equal-width bins."""
    probs = softmax(np.asarray(logits, np.float64), scale)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


# from near-uniform probabilities (a memory that barely helps a 100-class set) to sharper than CLIP's 100
SCALE_GRID = tuple(float(s) for s in np.round(np.geomspace(0.25, 400.0, 64), 3))


def fit_softmax_scale(parts: Sequence[tuple[np.ndarray, np.ndarray]], grid: Sequence[float] = SCALE_GRID) -> float:
    """The logit scale of the grid with the lowest negative log-likelihood over every (logits, labels) part
    (temperature scaling; parts may have different class counts)."""
    best, best_nll = 100.0, np.inf
    prepared = [(np.asarray(lg, np.float64) - np.asarray(lg, np.float64).max(axis=1, keepdims=True), np.asarray(lb))
                for lg, lb in parts if len(lb)]
    if not prepared:
        return best
    for scale in grid:
        nll = 0.0
        for centred, labels in prepared:
            z = scale * centred
            nll += float(np.sum(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]))
        if nll < best_nll:
            best, best_nll = float(scale), nll
    return best


def _normalise(x: np.ndarray) -> np.ndarray:
    return cast(np.ndarray, (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32))


class ClassEmbeddingCache:
    """Class embeddings by key: a dict in process, ``<key>.npy`` files on disk when a folder is given."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._mem: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            if key in self._mem:
                self.hits += 1
                return self._mem[key]
        if self.folder is not None and (self.folder / f"{key}.npy").is_file():
            try:
                value = np.load(self.folder / f"{key}.npy", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:  # damaged (e.g. by an older non-atomic write): a miss
                log.warning("ignoring unreadable class-embedding cache %s: %s", key, exc)
                self.misses += 1
                return None
            with self._lock:
                self._mem[key] = value
                self.hits += 1
            return cast(np.ndarray, value)
        self.misses += 1
        return None

    def clear(self) -> None:
        """Forget everything (an item was taken down: no cached embedding may still carry it)."""
        with self._lock:
            self._mem.clear()
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.glob("*.npy"):
                path.unlink(missing_ok=True)

    def put(self, key: str, value: np.ndarray, *, disk: bool = True) -> None:
        with self._lock:
            self._mem[key] = value
        if self.folder is not None and disk:
            _save_atomically(self.folder, key, value)

    def get_rows(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The rows held in process among ``keys`` (one class's embedding each)."""
        with self._lock:
            return {k: self._mem[k] for k in keys if k in self._mem}


def _save_atomically(folder: Path, key: str, value: np.ndarray) -> None:
    """Write then rename (a reader never sees half a file); a full disk only costs the disk copy."""
    tmp = folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp.npy"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(tmp, value)
        os.replace(tmp, folder / f"{key}.npy")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("class embeddings kept in memory only, not written to %s: %s", folder, exc)


@dataclass
class Prediction:
    labels: list[int]  # top classes, best first
    names: list[str]
    scores: list[float]  # softmax probabilities at the checkpoint's calibrated logit scale (CLIP's 100 without)


class ZeroShotClassifier:
    """One class set with one template list; class embeddings per mode, cached."""

    def __init__(
        self,
        class_names: Sequence[str],
        text_encoder: TextEncoder,
        *,
        templates: str | Sequence[str] | Path | None = None,
        refiner: Refiner | None = None,
        checkpoint_id: str = "none",
        cache: ClassEmbeddingCache | None = None,
        clip_softmax_scale: float | None = None,
    ) -> None:
        if not class_names:
            raise ValueError("no class names")
        self.class_names = list(class_names)
        self.text_encoder = text_encoder
        self.templates = resolve_templates(templates)
        self.refiner = refiner.for_task("zeroshot") if refiner is not None else None  # its validated blend
        self.checkpoint_id = checkpoint_id
        self.cache = cache or ClassEmbeddingCache()
        self.clip_softmax_scale = clip_softmax_scale

    def softmax_scale(self, mode: RefineMode) -> float:
        """Logit scale of the probabilities: the checkpoint's, chosen on validation per mode; CLIP's 100 without."""
        if self.refiner is not None:
            return self.refiner.softmax_scale(mode)
        return float(self.clip_softmax_scale or 100.0)

    def cache_key(self, refined: bool) -> str:
        return hashlib.sha256(json.dumps(self._key_parts(refined), sort_keys=True).encode()).hexdigest()[:32]

    def row_key(self, name: str, refined: bool) -> str:
        """One class's key: a class set is assembled from rows computed earlier (in chunks, or for another set)."""
        return "row-" + hashlib.sha256(json.dumps({"set": self._key_parts(refined) | {"classes": None},
                                                   "class": name}, sort_keys=True).encode()).hexdigest()[:32]

    def _key_parts(self, refined: bool) -> dict[str, Any]:
        parts: dict[str, Any] = {"encoder": self.text_encoder.encoder_id, "classes": self.class_names,
                                 "templates": list(self.templates), "refined": refined}
        if refined:
            assert self.refiner is not None
            parts.update(checkpoint=self.checkpoint_id, memory=self.refiner.memory_version, k=self.refiner.k,
                         retrieval=self.refiner.retrieval.to_dict())
            if self.refiner.fallback:
                parts["fallback"] = self.refiner.fallback
            mix = {m.value: self.refiner.mix_for(m) for m in Modality if self.refiner.mix_for(m)}
            if mix:
                parts["mean_mix"] = mix
        return parts

    def class_embeddings(self, mode: RefineMode = RefineMode.CLIP,
                         progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(n_classes, d): refined prompts for modes ``text``/``both``, CLIP's classifier otherwise.

        Batched: the prompts of every class not cached yet are encoded in the encoder's batches, and (refined)
        retrieved and fused in the refiner's batches — one text encode serves both the CLIP and the refined
        embeddings. The whole set is cached (in process and on disk: it survives restarts) and each class's row
        in process (a set prepared in chunks, or sharing classes with another, is assembled, not recomputed).
        ``progress(done, total)``: classes ready so far."""
        refined = RefineMode(mode) in (RefineMode.TEXT, RefineMode.BOTH)
        if refined and self.refiner is None:
            raise ValueError(f"mode {mode} refines the class prompts and needs a fusion checkpoint")
        key = self.cache_key(refined)
        cached = self.cache.get(key)
        if cached is not None:
            if progress is not None:
                progress(len(self.class_names), len(self.class_names))
            return cached
        keys = [self.row_key(n, refined) for n in self.class_names]
        rows = self.cache.get_rows(keys)
        todo = [i for i, k in enumerate(keys) if k not in rows]
        total = len(self.class_names)
        if progress is not None:
            progress(total - len(todo), total)
        step = max(1, CLASS_CHUNK)
        for start in range(0, len(todo), step):
            chunk = todo[start: start + step]
            for i, row in zip(chunk, self._compute([self.class_names[i] for i in chunk], refined), strict=True):
                rows[keys[i]] = row
                self.cache.put(keys[i], row, disk=False)
            if progress is not None:
                progress(total - len(todo) + start + len(chunk), total)
        weights = np.stack([rows[k] for k in keys]).astype(np.float32)
        self.cache.put(key, weights)
        return weights

    def _compute(self, names: list[str], refined: bool) -> np.ndarray:
        """(len(names), d) for classes not cached: one batched encode (reused from the CLIP rows when they are
        cached in process), then for the refined side one batched retrieval + fusion."""
        n_t = len(self.templates)
        prompts = [t.replace("{c}", name) for name in names for t in self.templates]
        emb = self._prompt_embeddings(names, prompts)
        if refined:
            assert self.refiner is not None
            emb = self.refiner.refine_many(emb, Modality.TEXT)
        return _normalise(emb.reshape(len(names), n_t, -1).mean(axis=1))

    def _prompt_embeddings(self, names: list[str], prompts: list[str]) -> np.ndarray:
        keys = ["prompts-" + self.row_key(n, False) for n in names]
        held = self.cache.get_rows(keys)
        if len(held) == len(keys):
            return np.concatenate([held[k] for k in keys])
        emb = _normalise(self.text_encoder.encode_texts(prompts))
        n_t = len(self.templates)
        for i, k in enumerate(keys):
            self.cache.put(k, emb[i * n_t: (i + 1) * n_t], disk=False)
        return emb

    def image_side(self, image_embeddings: np.ndarray, mode: RefineMode) -> np.ndarray:
        images = np.atleast_2d(np.asarray(image_embeddings, np.float32))
        if RefineMode(mode) in (RefineMode.IMAGE, RefineMode.BOTH):
            if self.refiner is None:
                raise ValueError(f"mode {mode} refines the image and needs a fusion checkpoint")
            images = self.refiner.refine_many(images, Modality.IMAGE)
        return images

    def logits(self, image_embeddings: np.ndarray, mode: RefineMode = RefineMode.CLIP) -> np.ndarray:
        """(n_images, n_classes) cosine similarities."""
        return cast(np.ndarray, self.image_side(image_embeddings, mode) @ self.class_embeddings(mode).T)

    def predict(self, image_embedding: np.ndarray, mode: RefineMode = RefineMode.CLIP, top: int = 5) -> Prediction:
        logits = self.logits(image_embedding, mode)[0]
        probs = np.exp(self.softmax_scale(mode) * (logits - logits.max()))
        probs /= probs.sum()
        order = np.argsort(-logits)[:top]
        return Prediction([int(i) for i in order], [self.class_names[i] for i in order],
                          [float(probs[i]) for i in order])
