"""A synthetic world with a known answer, for testing the method (not the code) in seconds on CPU.

Embeddings are drawn directly (there are no pixels). The world is built to have the properties the
paper's argument rests on:

- Fine-grained images: every image shares a large "image cone" direction ``g_I`` (the modality gap),
  its concept adds a small part, so image->image search works but raw similarities are all alike.
- Texts likewise share a "text cone" direction ``g_T`` plus a small concept part; memory and training
  captions name their concept, so text->text search works.
- The frozen text encoder maps *bare class names* poorly: a prompt such as "a photo of a synthetic
  species 1012." carries a spurious component along ``g_I`` of a random size per class. Every image
  then looks most like the same few class names: zero-shot CLIP sits at chance. Captions carry a
  smaller spurious part of a random size per caption, so training sees the effect too.
- Training concepts and evaluation classes are disjoint; the memory holds pairs of both. The fusion
  must learn a generic way of using the memory, not class-specific mappings.

Expected (tests/unit/test_synthetic_world.py, ``reco eval --dataset synthetic``): CLIP at chance;
RECO ``both`` far above it; untrained mean fusion far below the transformer (its cross terms are
dominated by the cone directions); a memory with shuffled captions gives RECO nothing to use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import numpy as np

from app.evaluation.report import EvalReport, ResultRow
from app.evaluation.run import evaluate_zeroshot
from app.fusion.model import RecoFusion
from app.fusion.recipe import PAPER_RECIPE
from app.fusion.train import TrainingPairs, TrainOptions
from app.memory.base import ItemPayload, item_id_for
from app.memory.exact import ExactIndex
from app.refine import Refiner, mean_fusion_refiner
from app.retrieval import RetrievalCfg
from app.schemas import RefineMode
from app.zeroshot import ZeroShotClassifier

DATASET = "synthetic"
_NAME = re.compile(r"synthetic species (\d{4})")
ALL_MODES = (RefineMode.CLIP, RefineMode.IMAGE, RefineMode.TEXT, RefineMode.BOTH)


@dataclass(frozen=True)
class SyntheticCfg:
    dim: int = 64
    train_concepts: int = 600
    eval_classes: int = 100
    memory_per_concept: int = 5
    train_per_concept: int = 3
    eval_per_class: int = 10
    image_cone: float = 1.0  # weight of g_I in every image
    image_concept: float = 0.3  # fine-grained: the concept part is small
    image_noise: float = 0.3
    text_cone: float = 1.0
    text_concept: float = 0.4
    caption_noise: float = 0.15
    caption_spurious: float = 0.3  # std of the per-caption spurious g_I component
    name_spurious: float = 0.5  # std of the per-class spurious g_I component of bare class names
    prompt_noise: float = 0.1
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return cast(np.ndarray, (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SyntheticWorld:
    def __init__(self, cfg: SyntheticCfg | None = None) -> None:
        self.cfg = cfg or SyntheticCfg()
        c, d = self.cfg, self.cfg.dim
        rng = self._rng(0)
        self.n_concepts = c.train_concepts + c.eval_classes
        self.g_image, self.g_text = _unit(rng.normal(size=d)), _unit(rng.normal(size=d))
        self.image_codes = _unit(rng.normal(size=(self.n_concepts, d)))
        self.text_codes = _unit(rng.normal(size=(self.n_concepts, d)))
        self.name_spurious = rng.normal(size=self.n_concepts) * c.name_spurious

    def _rng(self, part: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, part])  # one stream per part: sizes don't interact

    @property
    def encoder_id(self) -> str:
        return f"synthetic/d{self.cfg.dim}/s{self.cfg.seed}"

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @staticmethod
    def concept_name(concept: int) -> str:
        return f"synthetic species {concept:04d}"

    @property
    def eval_concepts(self) -> np.ndarray:
        return np.arange(self.cfg.train_concepts, self.n_concepts)

    @property
    def class_names(self) -> list[str]:
        return [self.concept_name(int(i)) for i in self.eval_concepts]

    # --- embeddings ----------------------------------------------------------------------------
    def images(self, concepts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        noise = rng.normal(size=(len(concepts), c.dim)) * c.image_noise / np.sqrt(c.dim)
        return _unit(c.image_cone * self.g_image + c.image_concept * self.image_codes[concepts] + noise)

    def captions(self, concepts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        spurious = rng.normal(size=len(concepts)) * c.caption_spurious
        noise = rng.normal(size=(len(concepts), c.dim)) * c.caption_noise / np.sqrt(c.dim)
        return _unit(c.text_cone * self.g_text + c.text_concept * self.text_codes[concepts]
                     + spurious[:, None] * self.g_image + noise)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The frozen text encoder on strings: a text naming a concept is a bare class-name prompt."""
        c = self.cfg
        out = np.empty((len(texts), c.dim), np.float32)
        for i, text in enumerate(texts):
            noise = np.random.default_rng(int(_sha(f"{c.seed}:{text}")[:15], 16)).normal(size=c.dim)
            vector = c.text_cone * self.g_text + c.prompt_noise * noise / np.sqrt(c.dim)
            match = _NAME.search(text)
            if match and int(match.group(1)) < self.n_concepts:
                concept = int(match.group(1))
                vector = vector + c.text_concept * self.text_codes[concept] + self.name_spurious[concept] * self.g_image
            out[i] = _unit(vector)
        return out

    # --- data sets ---------------------------------------------------------------------------
    @cached_property
    def _memory_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        concepts = np.repeat(np.arange(self.n_concepts), self.cfg.memory_per_concept)
        rng = self._rng(1)
        return concepts, self.images(concepts, rng), self.captions(concepts, rng)

    def memory(self, *, shuffled_captions: bool = False) -> ExactIndex:
        """Pairs of every concept; ``shuffled_captions`` breaks every pair (a memory without signal)."""
        concepts, images, texts = self._memory_parts
        captions = [f"a photo of a {self.concept_name(int(cn))} seen in the wild, shot {i}."
                    for i, cn in enumerate(concepts)]
        labels = concepts.copy()
        if shuffled_captions:
            order = self._rng(4).permutation(len(concepts))
            texts, captions, labels = texts[order], [captions[i] for i in order], labels[order]
        hashes = [_sha(f"synthetic-image:{self.cfg.seed}:{row}") for row in range(len(concepts))]
        ids = [item_id_for(h, cap) for h, cap in zip(hashes, captions, strict=True)]
        payloads = [ItemPayload(item_id=i, image_hash=h, caption=cap, dataset=DATASET, split="memory", label=int(lb))
                    for i, h, cap, lb in zip(ids, hashes, captions, labels, strict=True)]
        version = f"{self.encoder_id}/memory{'-shuffled' if shuffled_captions else ''}"
        return ExactIndex(ids, images, texts, hashes, payloads=payloads, version=version)

    def training_pairs(self) -> TrainingPairs:
        """Pairs of the training concepts only, none of them in the memory."""
        concepts = np.repeat(np.arange(self.cfg.train_concepts), self.cfg.train_per_concept)
        rng = self._rng(2)
        return TrainingPairs(image=self.images(concepts, rng), text=self.captions(concepts, rng))

    def eval_images(self) -> tuple[np.ndarray, np.ndarray]:
        """Images of the evaluation classes and their labels (0-based into :attr:`class_names`)."""
        labels = np.repeat(np.arange(self.cfg.eval_classes), self.cfg.eval_per_class)
        return self.images(self.eval_concepts[labels], self._rng(3)), labels


def synthetic_train_options(**overrides: object) -> TrainOptions:
    """Small batches and a short schedule: under 300 steps of a d=64 model, seconds on one CPU thread
    (more threads only add OpenMP overhead at this size, and much more on a busy machine)."""
    values: dict[str, object] = {"k": PAPER_RECIPE.k, "lr": 5e-3, "weight_decay": PAPER_RECIPE.weight_decay,
                                 "batch_size": 256, "epochs": 40, "warmup_steps": 10, "seed": PAPER_RECIPE.seed,
                                 "threads": 1}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainOptions(**values)  # type: ignore[arg-type]


def evaluate_synthetic(
    world: SyntheticWorld,
    model: RecoFusion | None,
    *,
    k: int = 10,
    retrieval: RetrievalCfg | None = None,
    templates: str | Sequence[str] | None = None,
    checkpoint: str | None = None,
) -> EvalReport:
    """Zero-shot top-1/top-5 of CLIP and each RECO mode, plus the two controls as extra datasets:
    ``synthetic/mean-fusion`` (untrained averaging) and ``synthetic/shuffled-memory`` (same model,
    memory whose captions were shuffled)."""
    images, labels = world.eval_images()
    memory = world.memory()
    rows: list[ResultRow] = []
    refiners: list[tuple[str, Refiner | None]] = [
        (f"{DATASET}/mean-fusion", mean_fusion_refiner(memory, world.dim, k=k, retrieval=retrieval)),
    ]
    if model is not None:
        refiners.insert(0, (DATASET, Refiner(model, memory, k=k, retrieval=retrieval)))
        refiners.append((f"{DATASET}/shuffled-memory",
                         Refiner(model, world.memory(shuffled_captions=True), k=k, retrieval=retrieval)))
    for dataset, refiner in refiners:
        classifier = ZeroShotClassifier(world.class_names, world, templates=templates, refiner=refiner,
                                        checkpoint_id=f"{checkpoint}:{dataset}")
        rows += evaluate_zeroshot(dataset, images, labels, classifier, ALL_MODES)
    return EvalReport(results=rows, memory_size=len(memory), k=k, encoder_id=world.encoder_id,
                      checkpoint=checkpoint, near_duplicates_removed=0)
