"""The run's material: encoded sets, cleaned memories, evaluation sets, and the caches every fusion shares.

:func:`prepare` encodes (cached), splits validation, builds and cleans the memories and collects the
evaluation sets; :class:`NeighbourCache`, :class:`CachedRefiner` and :class:`CachedTexts` let many fusions
share one neighbour search and one encoding of the class prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.encoder.base import Encoder
from app.fusion.model import RecoFusion
from app.fusion.train import TrainingPairs
from app.memory.exact import ExactIndex
from app.refine import Refiner
from app.retrieval import Neighbours, RetrievalCfg, find_neighbours, gather_embeddings
from app.schemas import Modality
from programs.reproduce.data import EncodedSet, encode_augmented_views, encode_dataset, held_out
from programs.reproduce.memory import CleanMemory, EvalImages, MemoryRows, calibrated_threshold, clean_memory
from programs.reproduce.plan import DOMAIN_SETS, GENERIC, GENERIC_DOMAIN, MISMATCHED, ZERO_SHOT_SETS, ReproPlan

GENERIC_SET = "flickr8k"
EXTRA_SETS = ("clothing10",)
UNSEEN = "flickr8k-val-half"  # Flickr8k val pairs the base never saw (the other half of val tunes)


# --- neighbour cache ---------------------------------------------------------------------------------
class NeighbourCache:
    """Neighbour rows by (memory, queries, modality, k', switches): they do not depend on the fusion."""

    def __init__(self) -> None:
        self._found: dict[tuple[Any, ...], Neighbours] = {}

    def get(self, index: ExactIndex, queries: np.ndarray, modality: Modality, k: int, cfg: RetrievalCfg
            ) -> Neighbours:
        digest = hashlib.sha1(np.ascontiguousarray(queries).tobytes()).hexdigest()
        key = (index.version, digest, str(modality), k, cfg.search, cfg.fusion, cfg.dedupe_by_image)
        if key not in self._found:
            self._found[key] = find_neighbours(index, queries, modality, k, cfg)
        return self._found[key]

    def rows(self, index: ExactIndex, queries: np.ndarray, modality: Modality, k: int, cfg: RetrievalCfg
             ) -> np.ndarray:
        return self.get(index, queries, modality, k, cfg).rows


class CachedRefiner(Refiner):
    """A :class:`Refiner` over the exact index whose neighbour search is shared between fusions."""

    def __init__(self, model: RecoFusion, memory: ExactIndex, cache: NeighbourCache, **kwargs: Any) -> None:
        super().__init__(model, memory, **kwargs)
        self.neighbour_cache = cache

    def refine_many(self, vectors: np.ndarray, modality: Modality) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        assert isinstance(self.memory, ExactIndex)
        found = self.neighbour_cache.get(self.memory, vectors, modality, self.k, self.retrieval)
        out = np.empty_like(vectors)
        for start in range(0, len(vectors), self.batch_size):
            stop = start + self.batch_size
            emb, valid = gather_embeddings(self.memory, found.rows[start:stop], self.retrieval.fused(modality))
            out[start:stop] = self._fuse(vectors[start:stop], emb, modality, valid, found.scores[start:stop])[0]
        return out


class CachedTexts:
    """The encoder's text side with a memo: class prompts are encoded once for all fusions."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._memo: dict[str, np.ndarray] = {}

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if missing:
            for text, emb in zip(missing, self.encoder.encode_texts(missing), strict=True):
                self._memo[text] = emb
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, self.encoder.dim), np.float32)


# --- the evaluation sets ----------------------------------------------------------------------------
@dataclass
class ZeroShotSet:
    dataset: str
    split: str  # "test", or "val" (held-out part of the domain train split)
    image_emb: np.ndarray
    labels: np.ndarray
    class_names: list[str]


@dataclass
class RetrievalSet:
    dataset: str
    split: str
    image_emb: np.ndarray
    text_emb: np.ndarray
    image_of_text: np.ndarray


@dataclass
class Workspace:
    encoder_id: str
    sets: dict[str, EncodedSet]
    memories: dict[str, CleanMemory]
    threshold: float
    pairs: TrainingPairs
    zero_shot: list[ZeroShotSet]
    retrieval: list[RetrievalSet]
    extra_pairs: dict[str, tuple[TrainingPairs, MemoryRows]] = field(default_factory=dict)
    augmented: np.ndarray | None = None  # (views, len(pairs), d): augmented views of each pair's image
    augmented_images: np.ndarray | None = None  # (views, Flickr8k train images, d)
    neighbours: NeighbourCache = field(default_factory=NeighbourCache)
    training_neighbours: dict[tuple[Any, ...], tuple[Neighbours, Neighbours]] = field(default_factory=dict)


def retrieval_set(data: EncodedSet, split: str, images: np.ndarray | None = None,
                  image_emb: np.ndarray | None = None) -> RetrievalSet:
    images = data.images_of(split) if images is None else images
    captions = data.captions_of(images)
    position = {int(img): i for i, img in enumerate(images)}
    owner = np.asarray([position[int(i)] for i in data.caption_image[captions]], np.int64)
    emb = data.image_emb[images] if image_emb is None else image_emb
    return RetrievalSet(data.name, split, emb, data.text_emb[captions], owner)


def pairs_of(rows: MemoryRows) -> TrainingPairs:
    return TrainingPairs(rows.image, rows.text, ids=list(rows.ids), image_hashes=list(rows.image_hashes))


def mismatched_name(dataset: str) -> str:
    return f"{MISMATCHED}:{dataset}"


def prepare(encoder: Encoder, data_root: Path, cache_dir: Path, plan: ReproPlan, *, progress: bool = True,
            datasets: dict[str, EncodedSet] | None = None, augmented: np.ndarray | None = None) -> Workspace:
    """Encode (cached), split validation, build and clean the memories, collect the evaluation sets.

    ``augmented``: (views, Flickr8k train images, d) embeddings of augmented views; encoded (cached) from
    the images under ``data_root`` when not given and any variant trains on augmented queries.
    """
    names = (GENERIC_SET, *ZERO_SHOT_SETS, *EXTRA_SETS)
    sets = datasets or {n: encode_dataset(encoder, Path(data_root) / n, cache_dir, limit=plan.limit,
                                          progress=progress) for n in names}
    generic = sets[GENERIC_SET]
    domain_rows, zero_shot, eval_parts = [], [], []
    for name in ZERO_SHOT_SETS:
        data = sets[name]
        test = data.images_of("test")
        zero_shot.append(ZeroShotSet(name, "test", data.image_emb[test], data.image_label[test],
                                     data.class_names or []))
        eval_parts.append((data, test))
        if name in DOMAIN_SETS:
            train = data.images_of("train")
            is_val = held_out([data.image_files[i] for i in train], plan.validation_every, "validation")
            val, memory_part = train[is_val], train[~is_val]
            zero_shot.append(ZeroShotSet(name, "val", data.image_emb[val], data.image_label[val],
                                         data.class_names or []))
            eval_parts.append((data, val))
            domain_rows.append(MemoryRows.of(data, memory_part))
    # Flickr8k val is halved (sha1 of the file name): one half tunes (mode choice), the other gives the
    # `unseen-pairs` variant pairs the base encoder never trained on.
    val_images = generic.images_of("val")
    unseen = held_out([generic.image_files[i] for i in val_images], 2, UNSEEN)
    retrieval = [retrieval_set(generic, "test"), retrieval_set(generic, "val", val_images[~unseen])]
    eval_parts += [(generic, generic.images_of("test")), (generic, val_images)]
    evaluation = EvalImages.concat(eval_parts)
    generic_rows = MemoryRows.of(generic, generic.images_of("train"))
    full_rows = MemoryRows.concat([generic_rows, *domain_rows])
    threshold = calibrated_threshold(full_rows, plan.near_duplicate_percentile)
    memories = {GENERIC: clean_memory(GENERIC, generic_rows, evaluation, threshold, plan.dhash_distance),
                GENERIC_DOMAIN: clean_memory(GENERIC_DOMAIN, full_rows, evaluation, threshold, plan.dhash_distance)}
    full = memories[GENERIC_DOMAIN]
    for name in DOMAIN_SETS:  # generic + the other domains' pairs: the set's own classes are absent
        keep = np.flatnonzero([not i.startswith(f"{name}:") for i in full.index.ids])
        ids = [full.index.ids[i] for i in keep]
        index = ExactIndex(ids, np.asarray(full.index.matrix(Modality.IMAGE))[keep],
                           np.asarray(full.index.matrix(Modality.TEXT))[keep],
                           [full.index.image_hashes[i] for i in keep], version=f"{mismatched_name(name)}:{len(ids)}")
        memories[mismatched_name(name)] = CleanMemory(mismatched_name(name), index, full.dhashes[keep],
                                                      {**full.counts, "rows_after": len(ids)})
    train_images = generic.images_of("train")
    if augmented is None and any(v.augmented_queries for v in plan.variants):
        augmented = encode_augmented_views(encoder, Path(data_root) / GENERIC_SET, generic, train_images, cache_dir,
                                           views=plan.augmented_views, limit=plan.limit, progress=progress)
    aug_pairs = None
    if augmented is not None:  # per training pair (caption row): the views of its image
        position = {int(img): i for i, img in enumerate(train_images)}
        owner = np.asarray([position[int(generic.caption_image[int(i.partition(":")[2])])]
                            for i in generic_rows.ids], np.int64)
        aug_pairs = np.asarray(augmented)[:, owner]
    extra = {}
    for name in EXTRA_SETS:
        rows = MemoryRows.of(sets[name], sets[name].images_of("train"))
        extra[name] = (pairs_of(rows), rows)
    unseen_rows = MemoryRows.of(generic, val_images[unseen])
    extra[UNSEEN] = (TrainingPairs(unseen_rows.image, unseen_rows.text), unseen_rows)  # not in the memory
    return Workspace(encoder.encoder_id, sets, memories, threshold, pairs_of(generic_rows), zero_shot, retrieval,
                     extra, aug_pairs, None if augmented is None else np.asarray(augmented))
