"""Runs the plan: encode, build memories, train every variant per seed, evaluate on both memories.

Every evaluation goes through the project's own services: :class:`~app.refine.Refiner` (a subclass
that caches neighbour rows, since many fusions are evaluated on the same queries and memory),
:class:`~app.zeroshot.ZeroShotClassifier` and :mod:`app.evaluation.run`. Result rows are per seed;
:mod:`programs.reproduce.aggregate` reduces them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from app.encoder.base import Encoder
from app.evaluation.metrics import topk_accuracy
from app.evaluation.run import REFINES_IMAGE, evaluate_retrieval
from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion
from app.fusion.train import TrainingPairs, TrainOptions, precompute_neighbours, train_fusion
from app.memory.exact import ExactIndex
from app.refine import Refiner
from app.retrieval import Neighbours, RetrievalCfg, SearchKind, find_neighbours, gather_embeddings
from app.schemas import Modality, RefineMode
from app.zeroshot import (
    DEFAULT_TEMPLATES,
    ClassEmbeddingCache,
    ZeroShotClassifier,
    _normalise,
    caption_like_set,
    expected_calibration_error,
    fit_softmax_scale,
    resolve_templates,
)
from programs.reproduce.aggregate import choose_modes
from programs.reproduce.data import EncodedSet, encode_augmented_views, encode_dataset, held_out
from programs.reproduce.memory import CleanMemory, EvalImages, MemoryRows, calibrated_threshold, clean_memory
from programs.reproduce.plan import (
    DOMAIN_HINTS,
    DOMAIN_SETS,
    GENERIC,
    GENERIC_DOMAIN,
    MISMATCHED,
    PAPER,
    ZERO_SHOT_SETS,
    ReproPlan,
    Variant,
)

log = logging.getLogger(__name__)

ALL_MODES = list(RefineMode)
SEARCHES: tuple[SearchKind, ...] = ("uni", "cross")
GENERIC_SET = "flickr8k"
EXTRA_SETS = ("clothing10",)
UNSEEN = "flickr8k-val-half"  # Flickr8k val pairs the base never saw (the other half of val tunes)
OVERFIT_SAMPLE = 1000  # Flickr8k train images scored as a diagnostic (CLIP only): the base has seen them


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


def _retrieval_set(data: EncodedSet, split: str, images: np.ndarray | None = None,
                   image_emb: np.ndarray | None = None) -> RetrievalSet:
    images = data.images_of(split) if images is None else images
    captions = data.captions_of(images)
    position = {int(img): i for i, img in enumerate(images)}
    owner = np.asarray([position[int(i)] for i in data.caption_image[captions]], np.int64)
    emb = data.image_emb[images] if image_emb is None else image_emb
    return RetrievalSet(data.name, split, emb, data.text_emb[captions], owner)


def _pairs(rows: MemoryRows) -> TrainingPairs:
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
    retrieval = [_retrieval_set(generic, "test"), _retrieval_set(generic, "val", val_images[~unseen])]
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
        extra[name] = (_pairs(rows), rows)
    unseen_rows = MemoryRows.of(generic, val_images[unseen])
    extra[UNSEEN] = (TrainingPairs(unseen_rows.image, unseen_rows.text), unseen_rows)  # not in the memory
    return Workspace(encoder.encoder_id, sets, memories, threshold, _pairs(generic_rows), zero_shot, retrieval,
                     extra, aug_pairs, None if augmented is None else np.asarray(augmented))


# --- training --------------------------------------------------------------------------------------
def training_neighbours(ws: Workspace, memory: ExactIndex, pairs: TrainingPairs, k: int, retrieval: RetrievalCfg,
                        policy: str) -> tuple[Neighbours, Neighbours]:
    """Shared by the seeds and by the options that only change the model (one search each)."""
    digest = hashlib.sha1(np.ascontiguousarray(pairs.image[:: max(1, len(pairs) // 64)]).tobytes()).hexdigest()
    key = (memory.version, len(pairs), digest, k, retrieval.search, retrieval.fusion, retrieval.dedupe_by_image,
           policy)
    if key not in ws.training_neighbours:
        ws.training_neighbours[key] = precompute_neighbours(memory, pairs, k, retrieval, self_exclusion=policy,
                                                            near_duplicate_threshold=ws.threshold)
    return ws.training_neighbours[key]


def train_variant(ws: Workspace, plan: ReproPlan, variant: Variant, seed: int, *, progress: bool = False
                  ) -> tuple[RecoFusion, dict[str, Any]]:
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    pairs, memory = ws.pairs, ws.memories[GENERIC].index
    if variant.extra_pairs:  # the extra pairs join the training pairs and the training memory
        base = ws.memories[GENERIC]
        extra = [ws.extra_pairs[n] for n in variant.extra_pairs]
        rows = MemoryRows.concat([MemoryRows(list(base.index.ids), np.asarray(base.index.matrix(Modality.IMAGE)),
                                             np.asarray(base.index.matrix(Modality.TEXT)),
                                             list(base.index.image_hashes), base.dhashes), *[r for _, r in extra]])
        memory = rows.index(f"train:{variant.name}:{len(rows.ids)}")
        pairs = _pairs(MemoryRows.concat([MemoryRows(list(ws.pairs.ids or []), ws.pairs.image, ws.pairs.text,
                                                     list(ws.pairs.image_hashes or []), np.zeros(len(ws.pairs),
                                                                                                 np.uint64)),
                                          *[r for _, r in extra]]))
    batch_size, epochs = plan.batch_size, plan.epochs
    if variant.augmented_queries:  # same pairs and memory; the image query is an augmented view of its image
        if ws.augmented is None:
            raise ValueError(f"variant {variant.name} trains on augmented views, but none were encoded")
        views = ws.augmented
        pairs = TrainingPairs(np.concatenate(list(views)), np.concatenate([pairs.text] * len(views)),
                              ids=list(pairs.ids or []) * len(views),
                              image_hashes=list(pairs.image_hashes or []) * len(views))
        epochs = max(1, epochs // len(views))  # as many steps as the paper recipe
    if variant.train_pairs == UNSEEN:  # fewer pairs: smaller batches, as many steps as the paper recipe
        pairs, _ = ws.extra_pairs[UNSEEN]
        paper_steps = epochs * max(1, len(ws.pairs) // batch_size)
        batch_size = max(2, min(batch_size, len(pairs) // 8))
        epochs = max(1, -(-paper_steps // max(1, len(pairs) // batch_size)))
    options = TrainOptions(k=variant.k, lr=plan.lr, weight_decay=plan.weight_decay, batch_size=batch_size,
                           epochs=epochs, warmup_steps=plan.warmup_steps, seed=seed,
                           query_dropout=variant.query_dropout, gated_init=variant.gated_init,
                           score_bias=variant.score_bias, self_exclusion=variant.self_exclusion,
                           near_duplicate_threshold=ws.threshold,
                           threads=plan.threads, progress=progress, retrieval=retrieval)
    neighbours = training_neighbours(ws, memory, pairs, variant.k, retrieval, variant.self_exclusion)
    result = train_fusion(pairs, memory, FusionCfg(name="reco-fusion-b"), options, encoder_id=ws.encoder_id,
                          neighbours=neighbours)
    metrics = {key: result.metrics[key] for key in ("initial_loss", "final_loss", "temperature", "seconds", "steps",
                                                    "pairs", "memory_size")}
    metrics["options"] = options.to_dict()
    gates = [getattr(m, "gate", None) for m in (result.model.image, result.model.text)]
    gate = [float(torch.tanh(g.detach())) for g in gates if isinstance(g, torch.Tensor)]
    if gate:
        metrics["gate_tanh"] = gate
    return result.model, metrics


# --- evaluation ------------------------------------------------------------------------------------
def templates_for(dataset: str, caption_like: bool) -> str:
    if not caption_like:
        return DEFAULT_TEMPLATES
    return f"{DEFAULT_TEMPLATES}+{caption_like_set(DOMAIN_HINTS.get(dataset))}"


def knn_vote_logits(index: ExactIndex, images: np.ndarray, class_emb: np.ndarray, k: int,
                    cache: NeighbourCache) -> np.ndarray:
    """Each neighbour's caption votes for its nearest class prompt; ties go to the larger summed cosine."""
    cfg = RetrievalCfg("uni", "cross", True)
    rows = cache.rows(index, images, Modality.IMAGE, k, cfg)
    captions, valid = gather_embeddings(index, rows, Modality.TEXT)
    sims = captions @ class_emb.T  # (n, k, classes)
    votes = np.zeros((len(images), len(class_emb)), np.float32)
    best = sims.argmax(axis=2)
    for j in range(rows.shape[1]):
        np.add.at(votes, (np.arange(len(images))[valid[:, j]], best[valid[:, j], j]), 1.0)
    return cast(np.ndarray, votes + 1e-3 * np.where(valid[..., None], sims, 0).sum(axis=1) / max(1, k))


Row = dict[str, Any]


@dataclass
class Logits:
    """Zero-shot logits of one (memory, set, split, mode): the material of the temperature fit and the ECE."""

    memory: str
    dataset: str
    split: str
    mode: str
    logits: np.ndarray
    labels: np.ndarray


def memory_label(memory: str) -> str:
    """The row label of a memory: every ``mismatched:<set>`` memory is reported as ``mismatched``."""
    return MISMATCHED if memory.startswith(f"{MISMATCHED}:") else memory


def _prompt_embeddings(zs: ZeroShotSet, text_encoder: CachedTexts, caption_like: bool) -> np.ndarray:
    templates = resolve_templates(templates_for(zs.dataset, caption_like))
    emb = text_encoder.encode_texts([t.replace("{c}", c) for c in zs.class_names for t in templates])
    return _normalise(emb)


def evaluate(ws: Workspace, model: RecoFusion | None, variant: Variant, memory: str, k_infer: int,
             text_encoder: CachedTexts, *, kind: str = "trained", fallback: dict[str, float] | None = None,
             splits: Sequence[str] = ("test", "val")) -> tuple[list[Row], list[Logits]]:
    """Rows for every zero-shot and retrieval set and every mode; a ``mismatched:<set>`` memory evaluates only
    that set's zero-shot. With ``fallback``, the share of queries that kept CLIP is reported per set."""
    index = ws.memories[memory].index
    label = memory_label(memory)
    only = memory.partition(":")[2] if label == MISMATCHED else None
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    refiner = None
    if model is not None:
        refiner = CachedRefiner(model, index, ws.neighbours, k=k_infer, retrieval=retrieval, batch_size=4096,
                                fallback=fallback)
    modes = ALL_MODES if refiner is not None else [RefineMode.CLIP]
    rows: list[Row] = []
    logits_out: list[Logits] = []
    extra = {"memory": label, "variant": variant.name, "k": variant.k, "k_infer": k_infer}

    def rate(dataset: str, split: str, metric: str, queries: np.ndarray, modality: Modality) -> None:
        if refiner is None or not fallback or not len(queries):
            return
        found = ws.neighbours.get(index, queries, modality, k_infer, retrieval)
        rows.append({"dataset": dataset, "task": "fallback", "metric": metric, "mode": "-",
                     "value": float(refiner.falls_back(found.scores, modality).mean()), "split": split, **extra})

    for zs in ws.zero_shot:
        if len(zs.labels) == 0 or zs.split not in splits or (only is not None and zs.dataset != only):
            continue
        classifier = ZeroShotClassifier(zs.class_names, text_encoder,
                                        templates=templates_for(zs.dataset, variant.caption_like_prompts),
                                        refiner=refiner, checkpoint_id=f"{variant.name}:{id(model)}",
                                        cache=ClassEmbeddingCache())
        ks = (1, 5) if len(zs.class_names) > 5 else (1,)
        if kind == "knn":
            logits = knn_vote_logits(index, zs.image_emb, classifier.class_embeddings(RefineMode.CLIP), k_infer,
                                     ws.neighbours)
            for kk, value in topk_accuracy(logits, zs.labels, ks).items():
                rows.append({"dataset": zs.dataset, "task": "zeroshot", "metric": f"top{kk}", "mode": "image",
                             "value": value, "split": zs.split, **extra})
            continue
        refined_images = classifier.image_side(zs.image_emb, RefineMode.IMAGE) if refiner is not None else None
        for mode in modes:
            images = refined_images if mode in REFINES_IMAGE else zs.image_emb
            assert images is not None
            logits = images @ classifier.class_embeddings(mode).T
            for kk, value in topk_accuracy(logits, zs.labels, ks).items():
                rows.append({"dataset": zs.dataset, "task": "zeroshot", "metric": f"top{kk}", "mode": mode.value,
                             "value": value, "split": zs.split, **extra})
            logits_out.append(Logits(label, zs.dataset, zs.split, mode.value, logits, zs.labels))
        rate(zs.dataset, zs.split, "image_queries", zs.image_emb, Modality.IMAGE)
        rate(zs.dataset, zs.split, "class_prompts", _prompt_embeddings(zs, text_encoder, variant.caption_like_prompts),
             Modality.TEXT)
    if kind == "knn" or only is not None:
        return rows, logits_out
    for rs in ws.retrieval:
        if len(rs.text_emb) == 0 or rs.split not in splits:
            continue
        for r in evaluate_retrieval(rs.dataset, rs.image_emb, rs.text_emb, rs.image_of_text, refiner, modes):
            rows.append({**r.model_dump(mode="json"), "split": rs.split, **extra})
        rate(rs.dataset, rs.split, "image_queries", rs.image_emb, Modality.IMAGE)
        rate(rs.dataset, rs.split, "caption_queries", rs.text_emb, Modality.TEXT)
    return rows, logits_out


def evaluate_all(ws: Workspace, model: RecoFusion | None, variant: Variant, k_infer: int, texts: CachedTexts, *,
                 fallback: dict[str, float] | None = None, splits: Sequence[str] = ("test", "val"),
                 ) -> tuple[list[Row], list[Logits]]:
    rows: list[Row] = []
    logits: list[Logits] = []
    for memory in ws.memories:
        r, lg = evaluate(ws, model, variant, memory, k_infer, texts, kind=variant.kind, fallback=fallback,
                         splits=splits)
        rows += r
        logits += lg
    return rows, logits


# --- calibration on validation: softmax temperature, fallback threshold, the default recipe -------------
ECE_BINS = 15
FALLBACK_QUANTILES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # of the validation queries' top neighbour score


def calibrate_scales(logits: Sequence[Logits], extra: dict[str, Any]) -> tuple[dict[str, float], list[Row]]:
    """Per mode: the logit scale fitted on the validation logits of every memory (NLL), and ECE rows
    (15 bins) for every set at that scale (``ece``) and at CLIP's fixed 100 (``ece@100``)."""
    scales: dict[str, float] = {}
    for mode in sorted({lg.mode for lg in logits}):
        val = [(lg.logits, lg.labels) for lg in logits if lg.mode == mode and lg.split == "val"]
        if val:
            scales[mode] = fit_softmax_scale(val)
    rows: list[Row] = []
    for lg in logits:
        if lg.mode not in scales:
            continue
        base = {"dataset": lg.dataset, "task": "zeroshot", "mode": lg.mode, "split": lg.split, **extra,
                "memory": lg.memory}
        rows.append({**base, "metric": "ece",
                     "value": expected_calibration_error(lg.logits, lg.labels, scales[lg.mode], ECE_BINS)})
        rows.append({**base, "metric": "ece@100",
                     "value": expected_calibration_error(lg.logits, lg.labels, 100.0, ECE_BINS)})
    return scales, rows


def validation_score(rows: Sequence[Row]) -> float | None:
    """One number per run on validation only: mean of (zero-shot top-1 over the held-out domain images of every
    memory) and (Flickr8k val R@1 both directions, every memory), each in the mode chosen on validation."""
    chosen = choose_modes(rows)
    zero_shot, retrieval = [], []
    for r in rows:
        if r["split"] != "val":
            continue
        pick = chosen.get((r["variant"], r["memory"], r["k"], r["k_infer"], r["seed"]), {})
        if r["task"] == "zeroshot" and r["metric"] == "top1" and r["mode"] == pick.get("zeroshot"):
            zero_shot.append(r["value"])
        elif r["task"] == "retrieval" and r["metric"] in ("i2t_r@1", "t2i_r@1") and r["mode"] == pick.get("retrieval"):
            retrieval.append(r["value"])
    parts = [float(np.mean(x)) for x in (zero_shot, retrieval) if x]
    return float(np.mean(parts)) if parts else None


def _top_scores(ws: Workspace, variant: Variant, k_infer: int, texts: CachedTexts) -> dict[str, np.ndarray]:
    """The best neighbour's score of every validation query, per query modality, over every memory."""
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    tops: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for memory, clean in ws.memories.items():
        only = memory.partition(":")[2] if memory_label(memory) == MISMATCHED else None
        queries: list[tuple[np.ndarray, Modality]] = []
        for zs in ws.zero_shot:
            if zs.split == "val" and len(zs.labels) and (only is None or zs.dataset == only):
                queries += [(zs.image_emb, Modality.IMAGE),
                            (_prompt_embeddings(zs, texts, variant.caption_like_prompts), Modality.TEXT)]
        if only is None:
            queries += [(q, m) for rs in ws.retrieval if rs.split == "val"
                        for q, m in ((rs.image_emb, Modality.IMAGE), (rs.text_emb, Modality.TEXT))]
        for q, modality in queries:
            if len(q):
                top = ws.neighbours.get(clean.index, q, modality, k_infer, retrieval).scores[:, 0]
                tops[modality.value].append(top[np.isfinite(top)])
    return {m: np.concatenate(v) if v else np.zeros(0, np.float32) for m, v in tops.items()}


def choose_fallback(ws: Workspace, model: RecoFusion, variant: Variant, k_infer: int, texts: CachedTexts, seed: int
                    ) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """The fallback thresholds (image, text queries) with the best validation score: candidates are quantiles of
    the validation queries' top neighbour score (0 = never fall back; ties keep the smaller quantile)."""
    tops = _top_scores(ws, variant, k_infer, texts)
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, float] | None] | None = None
    for q in FALLBACK_QUANTILES:
        thresholds = None if q == 0 else {m: float(np.quantile(v, q)) for m, v in tops.items() if len(v)}
        rows, _ = evaluate_all(ws, model, variant, k_infer, texts, fallback=thresholds, splits=("val",))
        score = validation_score([{**r, "seed": seed} for r in rows])
        tried.append({"quantile": q, "thresholds": thresholds, "validation_score": score})
        if score is not None and (best is None or score > best[0] + 1e-12):
            best = (score, thresholds)
    return (best[1] if best else None), tried


# --- the whole plan ---------------------------------------------------------------------------------
@dataclass
class RunOutput:
    rows: list[Row]
    training: list[dict[str, Any]]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)
    default_variant: str = PAPER
    selection: list[dict[str, Any]] = field(default_factory=list)  # validation score of every candidate
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)  # "variant/seed/k'" -> thresholds, scales
    models: dict[tuple[str, int], RecoFusion] = field(default_factory=dict)  # trained fusions by (variant, seed)
    train_options: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


def calibration_key(variant: str, seed: int, k_infer: int) -> str:
    return f"{variant}/{seed}/{k_infer}"


class _Runner:
    def __init__(self, ws: Workspace, plan: ReproPlan, texts: CachedTexts, progress: bool) -> None:
        self.ws, self.plan, self.texts, self.progress = ws, plan, texts, progress
        self.out = RunOutput([], [], 0.0)
        self.done: set[tuple[str, int]] = set()

    def model_for(self, variant: Variant, seed: int) -> RecoFusion | None:
        if variant.kind == "mean":
            return RecoFusion(FusionCfg(name="mean", kind="mean"), self.ws.memories[GENERIC].index.dim)
        if variant.kind != "trained":
            return None
        key = (variant.train_key(), seed)
        if key not in self.out.models:
            source = self.plan.variant(variant.train_key())
            self.out.models[key], metrics = train_variant(self.ws, self.plan, source, seed)
            self.out.train_options[key] = metrics.pop("options")
            self.out.training.append({"variant": source.name, "seed": seed, **metrics})
        return self.out.models[key]

    def run(self, variant: Variant, seed: int) -> None:
        if (variant.name, seed) in self.done:
            return
        self.done.add((variant.name, seed))
        model = self.model_for(variant, seed)
        for k_infer in (variant.k, *variant.k_infer):
            fallback: dict[str, float] | None = None
            tried: list[dict[str, Any]] = []
            if variant.fallback and model is not None:
                fallback, tried = choose_fallback(self.ws, model, variant, k_infer, self.texts, seed)
            rows, logits = evaluate_all(self.ws, model, variant, k_infer, self.texts, fallback=fallback)
            extra = {"variant": variant.name, "k": variant.k, "k_infer": k_infer}
            scales, ece_rows = calibrate_scales(logits, extra)
            self.out.rows += [{**r, "seed": seed} for r in (*rows, *ece_rows)]
            self.out.calibration[calibration_key(variant.name, seed, k_infer)] = {
                "fallback": fallback, "fallback_candidates": tried, "softmax_scale": scales}


def choose_default(rows: Sequence[Row], plan: ReproPlan) -> tuple[str, list[dict[str, Any]]]:
    """The candidate (trained) variant with the best validation score at k' = k, on the ablation seeds."""
    table: list[dict[str, Any]] = []
    for v in plan.variants:
        if not v.candidate or v.kind != "trained":
            continue
        scores = []
        for seed in plan.ablation_seeds:
            mine = [r for r in rows if r["variant"] == v.name and r["seed"] == seed and r["k_infer"] == v.k]
            score = validation_score(mine)
            if score is not None:
                scores.append(score)
        if scores:
            table.append({"variant": v.name, "validation_score": float(np.mean(scores)),
                          "seeds": list(plan.ablation_seeds)})
    if not table:
        return PAPER, table
    best = max(table, key=lambda t: float(t["validation_score"]))  # first maximum: the earlier (simpler) variant
    return str(best["variant"]), table


def run_plan(ws: Workspace, plan: ReproPlan, encoder: Encoder, *, progress: bool = True,
             on_step: Callable[[str], None] | None = None) -> RunOutput:
    """Every variant on the ablation seeds (the paper recipe on every main seed); the default recipe chosen on
    validation; then the default on every main seed. Each run is evaluated on every memory."""
    started = time.perf_counter()
    texts = CachedTexts(encoder)
    runner = _Runner(ws, plan, texts, progress)
    jobs = [(v, s) for v in plan.variants for s in plan.ablation_seeds]
    if any(v.name == PAPER for v in plan.variants):
        jobs += [(plan.variant(PAPER), s) for s in plan.seeds_of(plan.variant(PAPER)) if s not in plan.ablation_seeds]
        jobs += [(v, s) for v in plan.variants if v.reuse == PAPER
                 for s in plan.seeds_of(plan.variant(PAPER)) if s not in plan.ablation_seeds]
    for variant, seed in tqdm(jobs, desc="reproduce", unit="run", disable=not progress):
        if on_step is not None:
            on_step(f"{variant.name} seed {seed}")
        runner.run(variant, seed)
    default, selection = choose_default(runner.out.rows, plan)
    chosen = plan.variant(default)
    for seed in sorted(set(plan.seeds) - set(plan.ablation_seeds)):  # the default recipe on every main seed
        if on_step is not None:
            on_step(f"{default} seed {seed}")
        runner.run(chosen, seed)
    out = runner.out
    out.default_variant, out.selection = default, selection
    paper_seed = min(plan.seeds_of(plan.variant(PAPER))) if any(v.name == PAPER for v in plan.variants) else None
    out.diagnostics = {
        "purity": neighbour_purity(ws, texts),
        "purity_caption_like_prompts": neighbour_purity(ws, texts, caption_like=True),
        "training_leak": training_leak(ws),
        "cone": embedding_cone(ws),
        "base_overfit": base_overfit(ws),
    }
    if paper_seed is not None:  # how much each trained fusion listens to its neighbours
        out.diagnostics["attention_by_variant"] = {
            v.name: neighbour_attention(ws, out.models[(v.name, paper_seed)], v)
            for v in plan.variants if (v.name, paper_seed) in out.models}
    out.seconds = time.perf_counter() - started
    return out


# --- diagnostics: the measured reasons behind the numbers ----------------------------------------------
def row_labels(ws: Workspace, index: ExactIndex) -> tuple[np.ndarray, np.ndarray]:
    """(dataset name, label) of every memory row; label -1 for caption-only rows."""
    names, labels = [], []
    for item in index.ids:
        name, _, row = item.partition(":")
        data = ws.sets[name]
        names.append(name)
        labels.append(int(data.image_label[data.caption_image[int(row)]]))
    return np.asarray(names, dtype=str), np.asarray(labels, np.int64)


def neighbour_purity(ws: Workspace, texts: CachedTexts | None, k: int = 10, caption_like: bool = False
                     ) -> list[dict[str, Any]]:
    """Fraction of the k neighbours in the generic+domain memory that carry the query's class.

    Image queries (test images) by image->image and image->text search; class prompts by text->text
    and text->image search. This is what any fusion can at best read from the memory.
    """
    index = ws.memories[GENERIC_DOMAIN].index
    names, labels = row_labels(ws, index)
    out = []
    for zs in ws.zero_shot:
        if zs.split != "test" or zs.dataset not in DOMAIN_SETS or len(zs.labels) == 0:
            continue
        record: dict[str, Any] = {"dataset": zs.dataset, "k": k}
        for search in SEARCHES:
            rows = ws.neighbours.rows(index, zs.image_emb, Modality.IMAGE, k, RetrievalCfg(search, "cross", True))
            hit = (rows >= 0) & (names[np.maximum(rows, 0)] == zs.dataset) & (
                labels[np.maximum(rows, 0)] == zs.labels[:, None])
            record[f"image_{search}_search"] = float(hit.mean())
        if texts is not None:
            templates = resolve_templates(templates_for(zs.dataset, caption_like))
            prompts = [t.replace("{c}", c) for c in zs.class_names for t in templates]
            prompt_labels = np.repeat(np.arange(len(zs.class_names)), len(templates))
            emb = texts.encode_texts(prompts)
            for search in SEARCHES:
                rows = ws.neighbours.rows(index, emb, Modality.TEXT, k, RetrievalCfg(search, "cross", True))
                hit = (rows >= 0) & (names[np.maximum(rows, 0)] == zs.dataset) & (
                    labels[np.maximum(rows, 0)] == prompt_labels[:, None])
                record[f"prompt_{search}_search"] = float(hit.mean())
        out.append(record)
    return out


def neighbour_attention(ws: Workspace, model: RecoFusion, variant: Variant) -> list[dict[str, Any]]:
    """Mean attention of the query on its neighbours (1 - on itself), per memory and query kind."""
    out = []
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    queries = [(zs.image_emb, Modality.IMAGE, f"{zs.dataset} test images")
               for zs in ws.zero_shot if zs.split == "test" and len(zs.image_emb)]
    queries += [(rs.text_emb, Modality.TEXT, f"{rs.dataset} test captions")
                for rs in ws.retrieval if rs.split == "test" and len(rs.text_emb)]
    for memory, clean in ws.memories.items():
        if memory_label(memory) == MISMATCHED:
            continue
        refiner = CachedRefiner(model, clean.index, ws.neighbours, k=variant.k, retrieval=retrieval)
        for query_emb, modality, label in queries:
            found = ws.neighbours.get(clean.index, query_emb, modality, variant.k, retrieval)
            emb, valid = gather_embeddings(clean.index, found.rows, retrieval.fused(modality))
            _, attention = refiner._fuse(query_emb, emb, modality, valid, found.scores)
            out.append({"memory": memory, "queries": label,
                        "neighbour_attention": float(1.0 - attention[:, 0].mean())})
    return out


def training_leak(ws: Workspace, k: int = 10) -> list[dict[str, Any]]:
    """Per self-exclusion policy: how often a training caption's own image is among its text->text neighbours.

    Under "pair" the other four captions of the query's image stay in the memory, so the fusion is
    handed the answer during training, which it never gets at test time.
    """
    index = ws.memories[GENERIC].index
    out = []
    for policy in ("pair", "image", "near-duplicates"):
        _, text_nb = training_neighbours(ws, index, ws.pairs, k, RetrievalCfg(), policy)
        hashes = np.asarray(index.image_hashes)
        own = np.asarray(ws.pairs.image_hashes)
        found = (text_nb.rows >= 0) & (hashes[np.maximum(text_nb.rows, 0)] == own[:, None])
        out.append({"self_exclusion": policy, "own_image_in_neighbours": float(found.any(axis=1).mean())})
    return out


def embedding_cone(ws: Workspace, sample: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean cosine of random pairs: near 1 means every embedding sits in a narrow cone (a weak encoder),
    so a neighbour's embedding differs from any other's only in a small component."""
    index = ws.memories[GENERIC].index
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(index), (2, min(sample, len(index))))
    image = np.asarray(index.matrix(Modality.IMAGE), np.float32)
    text = np.asarray(index.matrix(Modality.TEXT), np.float32)
    distinct = np.asarray(index.image_hashes)[a] != np.asarray(index.image_hashes)[b]
    return {"image_image": float((image[a] * image[b]).sum(1)[distinct].mean()),
            "text_text": float((text[a] * text[b]).sum(1)[distinct].mean()),
            "image_text_unpaired": float((image[a] * text[b]).sum(1)[distinct].mean()),
            "image_text_paired": float((image * text).sum(1).mean())}


def base_overfit(ws: Workspace) -> list[dict[str, Any]]:
    """CLIP R@1 on Flickr8k images the base trained on vs unseen ones (1,000 images each at most).

    On its own training pairs the frozen base already matches image and caption well, so a fusion
    trained on those pairs learns that the query alone suffices.
    """
    from app.evaluation.metrics import recall_at_k

    generic = ws.sets[GENERIC_SET]
    val_images = generic.images_of("val")
    unseen = held_out([generic.image_files[i] for i in val_images], 2, UNSEEN)
    parts = {"train (seen by the base)": generic.images_of("train")[:OVERFIT_SAMPLE],
             "val (unseen)": val_images[:OVERFIT_SAMPLE], "test (unseen)": generic.images_of("test")[:OVERFIT_SAMPLE],
             "val half for unseen-pairs": val_images[unseen][:OVERFIT_SAMPLE]}
    out = []
    for name, images in parts.items():
        rs = _retrieval_set(generic, "", images)
        if len(rs.text_emb) == 0:
            continue
        recall = recall_at_k(rs.image_emb, rs.text_emb, rs.image_of_text, ks=(1, 10))
        out.append({"images": name, "n": len(images), **recall})
    if ws.augmented_images is not None:  # the same train images as strongly augmented views (lever a's queries)
        images = generic.images_of("train")[:OVERFIT_SAMPLE]
        rs = _retrieval_set(generic, "", images, ws.augmented_images[0][:len(images)])
        if len(rs.text_emb):
            recall = recall_at_k(rs.image_emb, rs.text_emb, rs.image_of_text, ks=(1, 10))
            out.insert(1, {"images": "train, augmented views (queries of `aug`)", "n": len(images), **recall})
    return out
