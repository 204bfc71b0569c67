"""Runs the plan: encode, build memories, train every variant per seed, evaluate on both memories.

Every evaluation goes through the project's own services: :class:`~app.refine.Refiner` (a subclass
that caches neighbour rows, since many fusions are evaluated on the same queries and memory),
:class:`~app.zeroshot.ZeroShotClassifier` and :mod:`app.evaluation.run`. Result rows are per seed;
:mod:`app.reproduce.aggregate` reduces them.
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
from app.evaluation.run import evaluate_retrieval, evaluate_zeroshot
from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion
from app.fusion.train import TrainingPairs, TrainOptions, precompute_neighbours, train_fusion
from app.memory.exact import ExactIndex
from app.refine import Refiner
from app.reproduce.data import EncodedSet, encode_dataset, held_out
from app.reproduce.memory import CleanMemory, EvalImages, MemoryRows, calibrated_threshold, clean_memory
from app.reproduce.plan import DOMAIN_HINTS, DOMAIN_SETS, GENERIC, GENERIC_DOMAIN, ZERO_SHOT_SETS, ReproPlan, Variant
from app.retrieval import Neighbours, RetrievalCfg, SearchKind, find_neighbours, gather_embeddings
from app.schemas import Modality, RefineMode
from app.zeroshot import (
    DEFAULT_TEMPLATES,
    ClassEmbeddingCache,
    ZeroShotClassifier,
    caption_like_set,
    resolve_templates,
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
        self._rows: dict[tuple[Any, ...], np.ndarray] = {}

    def rows(self, index: ExactIndex, queries: np.ndarray, modality: Modality, k: int, cfg: RetrievalCfg
             ) -> np.ndarray:
        digest = hashlib.sha1(np.ascontiguousarray(queries).tobytes()).hexdigest()
        key = (index.version, digest, str(modality), k, cfg.search, cfg.fusion, cfg.dedupe_by_image)
        if key not in self._rows:
            self._rows[key] = find_neighbours(index, queries, modality, k, cfg).rows
        return self._rows[key]


class CachedRefiner(Refiner):
    """A :class:`Refiner` over the exact index whose neighbour search is shared between fusions."""

    def __init__(self, model: RecoFusion, memory: ExactIndex, cache: NeighbourCache, **kwargs: Any) -> None:
        super().__init__(model, memory, **kwargs)
        self.neighbour_cache = cache

    def refine_many(self, vectors: np.ndarray, modality: Modality) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        assert isinstance(self.memory, ExactIndex)
        rows = self.neighbour_cache.rows(self.memory, vectors, modality, self.k, self.retrieval)
        out = np.empty_like(vectors)
        for start in range(0, len(vectors), self.batch_size):
            stop = start + self.batch_size
            emb, valid = gather_embeddings(self.memory, rows[start:stop], self.retrieval.fused(modality))
            out[start:stop] = self._fuse(vectors[start:stop], emb, modality, valid)[0]
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
    neighbours: NeighbourCache = field(default_factory=NeighbourCache)
    training_neighbours: dict[tuple[Any, ...], tuple[Neighbours, Neighbours]] = field(default_factory=dict)


def _retrieval_set(data: EncodedSet, split: str, images: np.ndarray | None = None) -> RetrievalSet:
    images = data.images_of(split) if images is None else images
    captions = data.captions_of(images)
    position = {int(img): i for i, img in enumerate(images)}
    owner = np.asarray([position[int(i)] for i in data.caption_image[captions]], np.int64)
    return RetrievalSet(data.name, split, data.image_emb[images], data.text_emb[captions], owner)


def _pairs(rows: MemoryRows) -> TrainingPairs:
    return TrainingPairs(rows.image, rows.text, ids=list(rows.ids), image_hashes=list(rows.image_hashes))


def prepare(encoder: Encoder, data_root: Path, cache_dir: Path, plan: ReproPlan, *, progress: bool = True,
            datasets: dict[str, EncodedSet] | None = None) -> Workspace:
    """Encode (cached), split validation, build and clean both memories, collect the evaluation sets."""
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
    extra = {}
    for name in EXTRA_SETS:
        rows = MemoryRows.of(sets[name], sets[name].images_of("train"))
        extra[name] = (_pairs(rows), rows)
    unseen_rows = MemoryRows.of(generic, val_images[unseen])
    extra[UNSEEN] = (TrainingPairs(unseen_rows.image, unseen_rows.text), unseen_rows)  # not in the memory
    return Workspace(encoder.encoder_id, sets, memories, threshold, _pairs(generic_rows), zero_shot, retrieval,
                     extra)


# --- training --------------------------------------------------------------------------------------
def training_neighbours(ws: Workspace, memory: ExactIndex, pairs: TrainingPairs, k: int, retrieval: RetrievalCfg,
                        policy: str) -> tuple[Neighbours, Neighbours]:
    """Shared by the seeds and by the options that only change the model (one search each)."""
    key = (memory.version, len(pairs), k, retrieval.search, retrieval.fusion, retrieval.dedupe_by_image, policy)
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
    if variant.train_pairs == UNSEEN:  # fewer pairs: smaller batches, as many steps as the paper recipe
        pairs, _ = ws.extra_pairs[UNSEEN]
        paper_steps = epochs * max(1, len(ws.pairs) // batch_size)
        batch_size = max(2, min(batch_size, len(pairs) // 8))
        epochs = max(1, -(-paper_steps // max(1, len(pairs) // batch_size)))
    options = TrainOptions(k=variant.k, lr=plan.lr, weight_decay=plan.weight_decay, batch_size=batch_size,
                           epochs=epochs, warmup_steps=plan.warmup_steps, seed=seed,
                           query_dropout=variant.query_dropout, gated_init=variant.gated_init,
                           self_exclusion=variant.self_exclusion, near_duplicate_threshold=ws.threshold,
                           threads=plan.threads, progress=progress, retrieval=retrieval)
    neighbours = training_neighbours(ws, memory, pairs, variant.k, retrieval, variant.self_exclusion)
    result = train_fusion(pairs, memory, FusionCfg(name="reco-fusion-b"), options, encoder_id=ws.encoder_id,
                          neighbours=neighbours)
    metrics = {key: result.metrics[key] for key in ("initial_loss", "final_loss", "temperature", "seconds", "steps",
                                                    "pairs", "memory_size")}
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


def evaluate(ws: Workspace, model: RecoFusion | None, variant: Variant, memory: str, k_infer: int,
             text_encoder: CachedTexts, *, kind: str = "trained") -> list[Row]:
    """Rows for every zero-shot and retrieval set (test and val) and every mode."""
    index = ws.memories[memory].index
    retrieval = RetrievalCfg(variant.search, variant.fusion, variant.dedupe_by_image)
    refiner = None
    if model is not None:
        refiner = CachedRefiner(model, index, ws.neighbours, k=k_infer, retrieval=retrieval, batch_size=4096)
    modes = ALL_MODES if refiner is not None else [RefineMode.CLIP]
    rows: list[Row] = []
    extra = {"memory": memory, "variant": variant.name, "k": variant.k, "k_infer": k_infer}
    for zs in ws.zero_shot:
        if len(zs.labels) == 0:
            continue
        classifier = ZeroShotClassifier(zs.class_names, text_encoder,
                                        templates=templates_for(zs.dataset, variant.caption_like_prompts),
                                        refiner=refiner, checkpoint_id=f"{variant.name}:{id(model)}",
                                        cache=ClassEmbeddingCache())
        if kind == "knn":
            logits = knn_vote_logits(index, zs.image_emb, classifier.class_embeddings(RefineMode.CLIP), k_infer,
                                     ws.neighbours)
            ks = (1, 5) if len(zs.class_names) > 5 else (1,)
            for kk, value in topk_accuracy(logits, zs.labels, ks).items():
                rows.append({"dataset": zs.dataset, "task": "zeroshot", "metric": f"top{kk}", "mode": "image",
                             "value": value, "split": zs.split, **extra})
            continue
        for r in evaluate_zeroshot(zs.dataset, zs.image_emb, zs.labels, classifier, modes):
            rows.append({**r.model_dump(mode="json"), "split": zs.split, **extra})
    if kind == "knn":
        return rows
    for rs in ws.retrieval:
        if len(rs.text_emb) == 0:
            continue
        for r in evaluate_retrieval(rs.dataset, rs.image_emb, rs.text_emb, rs.image_of_text, refiner, modes):
            rows.append({**r.model_dump(mode="json"), "split": rs.split, **extra})
    return rows


# --- the whole plan ---------------------------------------------------------------------------------
@dataclass
class RunOutput:
    rows: list[Row]
    training: list[dict[str, Any]]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


def run_plan(ws: Workspace, plan: ReproPlan, encoder: Encoder, *, progress: bool = True,
             on_step: Callable[[str], None] | None = None) -> RunOutput:
    """Train each (variant, seed) once and evaluate it on both memories at k' = k and the extra k'."""
    started = time.perf_counter()
    texts = CachedTexts(encoder)
    rows: list[Row] = []
    training: list[dict[str, Any]] = []
    trained: dict[tuple[str, int], RecoFusion] = {}
    jobs = [(v, s) for v in plan.variants for s in plan.seeds_of(v)]
    jobs.sort(key=lambda job: job[0].reuse is not None)  # reused fusions are trained first
    for variant, seed in tqdm(jobs, desc="reproduce", unit="run", disable=not progress):
        if on_step is not None:
            on_step(f"{variant.name} seed {seed}")
        model: RecoFusion | None = None
        if variant.kind == "trained":
            key = (variant.train_key(), seed)
            if key not in trained:
                source = plan.variant(variant.train_key())
                trained[key], metrics = train_variant(ws, plan, source, seed)
                training.append({"variant": source.name, "seed": seed, **metrics})
            model = trained[key]
        elif variant.kind == "mean":
            model = RecoFusion(FusionCfg(name="mean", kind="mean"), ws.memories[GENERIC].index.dim)
        for memory in ws.memories:
            for k_infer in (variant.k, *variant.k_infer):
                found = evaluate(ws, model, variant, memory, k_infer, texts, kind=variant.kind)
                rows += [{**r, "seed": seed} for r in found]
    paper_seed = min(plan.seeds_of(plan.variant("paper"))) if any(v.name == "paper" for v in plan.variants) else None
    diagnostics: dict[str, Any] = {
        "purity": neighbour_purity(ws, texts),
        "purity_caption_like_prompts": neighbour_purity(ws, texts, caption_like=True),
        "training_leak": training_leak(ws),
        "cone": embedding_cone(ws),
        "base_overfit": base_overfit(ws),
    }
    if paper_seed is not None:  # how much each trained fusion listens to its neighbours
        diagnostics["attention_by_variant"] = {
            v.name: neighbour_attention(ws, trained[(v.name, paper_seed)], v)
            for v in plan.variants if (v.name, paper_seed) in trained}
    return RunOutput(rows, training, time.perf_counter() - started, diagnostics)


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
        refiner = CachedRefiner(model, clean.index, ws.neighbours, k=variant.k, retrieval=retrieval)
        for query_emb, modality, label in queries:
            rows = ws.neighbours.rows(clean.index, query_emb, modality, variant.k, retrieval)
            emb, valid = gather_embeddings(clean.index, rows, retrieval.fused(modality))
            _, attention = refiner._fuse(query_emb, emb, modality, valid)
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
    return out
