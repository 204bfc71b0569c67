"""Refinement service: a query embedding, its neighbours from the memory, the fusion's output.

``refine_image(v)`` gives v-bar, ``refine_text(t)`` gives t-bar, each with the neighbours it used
(ids, search scores, captions when the memory has payloads) and the query's attention over them
(what the UI shows). :meth:`Refiner.apply_mode` picks the sides for the inference modes
``clip`` (v, t), ``image`` (v-bar, t), ``text`` (v, t-bar) and ``both`` (v-bar, t-bar).

The memory is either the exact index (batched: training, evaluation) or the engine behind any
``VectorMemory`` (Qdrant Edge or a server: online queries and class prompts, HNSW). The memory may be changed or swapped
after training without retraining (paper Fig. 3 middle): the refiner only reads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.fusion.checkpoint import CheckpointMeta, load_checkpoint
from app.fusion.config import FusionCfg
from app.fusion.model import FusionOutput, MeanFusion, RecoFusion
from app.memory.base import Filters, SearchHit, VectorMemory, distinct_images
from app.memory.exact import ExactIndex
from app.retrieval import RetrievalCfg, find_neighbours, gather_embeddings, retrieve_online
from app.schemas import Modality, RefineMode


@dataclass
class NeighbourInfo:
    item_id: str
    score: float  # search similarity to the query
    attention: float  # the query's attention weight on this neighbour (heads averaged)
    caption: str | None = None
    image_hash: str | None = None


@dataclass
class Refinement:
    vector: np.ndarray  # (d,) refined, L2-normalised
    modality: Modality
    neighbours: list[NeighbourInfo] = field(default_factory=list)
    self_attention: float = 1.0  # attention of the query on itself; the rest went to the neighbours
    fell_back: bool = False  # the neighbours were too far (top score below the checkpoint's threshold): CLIP kept


def memory_version_of(memory: VectorMemory) -> str:
    """Names a memory's content for caches: the exact index hashes its ids, an engine gives name:count."""
    if isinstance(memory, ExactIndex):
        return memory.version
    name = getattr(memory, "collection", type(memory).__name__)
    return f"{name}:{memory.count()}"


TASKS = ("retrieval", "zeroshot")


def _checked_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def mode_or_recommended(mode: RefineMode | None, refiner: Refiner | None) -> RefineMode:
    """The caller's mode; none named: the refiner's checkpoint's validated zero-shot mode (both without one)."""
    if mode is not None:
        return mode
    return refiner.recommended_mode("zeroshot") if refiner is not None else RefineMode.BOTH


def _mean_mix_of(value: Any) -> dict[str, dict[str, float]]:
    """``{task: {modality: weight}}`` from a checkpoint's ``mean_mix`` (a flat ``{modality: weight}`` applies to
    every task); each weight in [0, 1]."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"mean_mix must be a mapping, got {value!r}")
    per_task = value if set(value) <= set(TASKS) else {task: value for task in TASKS}
    out: dict[str, dict[str, float]] = {}
    for task, weights in per_task.items():
        out[task] = {}
        for modality, weight in (weights or {}).items():
            if not 0.0 <= float(weight) <= 1.0:
                raise ValueError(f"mean_mix for {task} {modality} queries must be in [0, 1], got {weight}")
            out[task][str(Modality(modality).value)] = float(weight)
    return out


DEFAULT_SOFTMAX_SCALE = 100.0  # CLIP's fixed logit scale: used when a checkpoint carries no calibrated one


class Refiner:
    """Refines embeddings with one trained fusion model over one memory.

    ``fallback``: per query modality ("image"/"text"), a similarity threshold chosen on validation: a query
    whose best neighbour scores below it keeps its CLIP embedding (do no harm where the memory cannot help).
    ``calibration``: the checkpoint's calibration (fallback thresholds, softmax scale per mode, recommended mode,
    and ``mean_mix``: per task and query modality, the weight of mean fusion blended into the fusion's output).
    ``task``: what the refined embeddings are for, ``retrieval`` (search, the default) or ``zeroshot`` (class
    prompts and the images classified against them): validation chose the blend per task.
    """

    def __init__(
        self,
        model: RecoFusion,
        memory: VectorMemory,
        *,
        k: int,
        retrieval: RetrievalCfg | None = None,
        device: str | torch.device = "cpu",
        filters: Filters | None = None,
        batch_size: int = 1024,
        fallback: dict[str, float] | None = None,
        calibration: dict[str, Any] | None = None,
        task: str = "retrieval",
    ) -> None:
        if filters and isinstance(memory, ExactIndex):
            raise ValueError("filter the exact index when building it (ExactIndex.subset), not per query")
        self.model = model.to(device).eval()
        self.memory = memory
        self.k = k
        self.retrieval = retrieval or RetrievalCfg()
        self.device = torch.device(device)
        self.filters = filters
        self.batch_size = batch_size
        self.calibration = dict(calibration or {})
        if fallback is None:
            fallback = self.calibration.get("fallback") or None
        self.fallback = {str(Modality(m).value): float(t) for m, t in (fallback or {}).items()}
        self.task = _checked_task(task)
        self.mean_mix = _mean_mix_of(self.calibration.get("mean_mix"))

    @property
    def memory_version(self) -> str:
        return memory_version_of(self.memory)

    def softmax_scale(self, mode: RefineMode | str) -> float:
        """The logit scale of this checkpoint's probabilities for ``mode`` (chosen on validation), else 100."""
        scales = self.calibration.get("softmax_scale") or {}
        return float(scales.get(str(RefineMode(mode).value), DEFAULT_SOFTMAX_SCALE))

    def recommended_mode(self, task: str = "zeroshot") -> RefineMode:
        """The inference mode chosen on validation for ``task`` ("zeroshot"/"retrieval"), so that a caller who
        names none gets what this checkpoint was measured best with; none recorded (or unknown): the paper's both."""
        modes = self.calibration.get("recommended_mode")
        chosen = modes.get(task) if isinstance(modes, dict) else None
        try:
            return RefineMode(chosen) if chosen is not None else RefineMode.BOTH
        except ValueError:
            return RefineMode.BOTH

    def falls_back(self, scores: np.ndarray, modality: Modality) -> np.ndarray:
        """(n,) bool: queries whose best neighbour score is below the fallback threshold (none: all False)."""
        scores = np.atleast_2d(np.asarray(scores, np.float32))
        threshold = self.fallback.get(str(Modality(modality).value))
        if threshold is None:
            return np.zeros(len(scores), bool)
        top = scores.max(axis=1) if scores.shape[1] else np.full(len(scores), -np.inf, np.float32)
        return np.asarray(top < threshold)

    def for_task(self, task: str) -> Refiner:
        """The same model and memory refining for ``task`` (its own blend with mean fusion); shares the weights."""
        if task == self.task:
            return self
        clone = copy.copy(self)
        clone.task = _checked_task(task)
        return clone

    def mix_for(self, modality: Modality) -> float:
        """Weight of mean fusion in this task's refined ``modality`` queries (0: the fusion alone)."""
        return self.mean_mix.get(self.task, {}).get(str(Modality(modality).value), 0.0)

    def with_k(self, k: int | None) -> Refiner:
        """The same model and memory with another k' (a request's own); shares the weights."""
        if k is None or k == self.k:
            return self
        clone = copy.copy(self)
        clone.k = k
        return clone

    # --- one query, with explanations --------------------------------------------------------
    def refine_image(self, v: np.ndarray, *, exclude_ids: tuple[str, ...] = ()) -> Refinement:
        return self.refine_one(v, Modality.IMAGE, exclude_ids=exclude_ids)

    def refine_text(self, t: np.ndarray, *, exclude_ids: tuple[str, ...] = ()) -> Refinement:
        return self.refine_one(t, Modality.TEXT, exclude_ids=exclude_ids)

    def refine_one(self, vector: np.ndarray, modality: Modality, *, exclude_ids: tuple[str, ...] = ()) -> Refinement:
        vector = np.asarray(vector, np.float32).reshape(-1)
        infos, neighbours = self._neighbours_of_one(vector, modality, exclude_ids)
        scores = np.asarray([[info.score for info in infos]], np.float32).reshape(1, len(infos))
        refined, attention = self._fuse(vector[None], neighbours[None], modality, scores=scores)
        for i, info in enumerate(infos):
            info.attention = float(attention[0, 1 + i])
        return Refinement(refined[0], Modality(modality), infos, float(attention[0, 0]),
                          fell_back=bool(self.falls_back(scores, modality)[0]))

    def _neighbours_of_one(
        self, vector: np.ndarray, modality: Modality, exclude_ids: tuple[str, ...]
    ) -> tuple[list[NeighbourInfo], np.ndarray]:
        fused = self.retrieval.fused(modality)
        if isinstance(self.memory, ExactIndex):
            index = self.memory
            found = find_neighbours(index, vector[None], modality, self.k, self.retrieval,
                                    exclude_ids=[list(exclude_ids)])
            rows = found.rows[0][found.valid[0]]
            infos = [
                NeighbourInfo(index.ids[r], float(s), 0.0, index.payloads[r].caption if index.payloads else None,
                              index.image_hashes[r])
                for r, s in zip(rows, found.scores[0][found.valid[0]], strict=True)
            ]
            return infos, np.asarray(index.matrix(fused)[rows], np.float32).reshape(len(rows), -1)
        online = retrieve_online(self.memory, vector, modality, self.k, self.retrieval,
                                 filters=self.filters, exclude_ids=exclude_ids)
        infos = [
            NeighbourInfo(hit.item_id, hit.score, 0.0, hit.payload.caption if hit.payload else None,
                          hit.payload.image_hash if hit.payload else None)
            for hit in online.hits
        ]
        embeddings = online.embeddings if online.hits else np.zeros((0, len(vector)), np.float32)
        return infos, embeddings.astype(np.float32).reshape(len(online.hits), len(vector))

    # --- many queries (batched over the exact index) ------------------------------------------
    def refine_many(self, vectors: np.ndarray, modality: Modality) -> np.ndarray:
        """(n, d) refined embeddings: one batched search per chunk (exact index or the engine)."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        out = np.empty_like(vectors)
        for start in range(0, len(vectors), self.batch_size):
            chunk = vectors[start: start + self.batch_size]
            if isinstance(self.memory, ExactIndex):
                found = find_neighbours(self.memory, chunk, modality, self.k, self.retrieval)
                emb, valid = gather_embeddings(self.memory, found.rows, self.retrieval.fused(modality))
                scores = found.scores
            else:
                emb, valid, scores = self._online_batch(chunk, modality)
            out[start: start + len(chunk)] = self._fuse(chunk, emb, modality, valid, scores)[0]
        return out

    def _online_batch(self, queries: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Neighbour embeddings (n, k, d) and mask for many queries: one batch search, one read by id."""
        dedupe = self.retrieval.dedupe_by_image
        fetch = self.k * 5 if dedupe else self.k
        found = self.memory.search_batch(queries, self.retrieval.searched(modality), fetch, filters=self.filters)
        kept: list[list[SearchHit]] = []
        for query, hits in zip(queries, found, strict=True):
            chosen = distinct_images(hits, self.k) if dedupe else hits[: self.k]
            if dedupe and len(chosen) < self.k and len(hits) == fetch:  # an image with many rows: ask again
                chosen = retrieve_online(self.memory, query, modality, self.k, self.retrieval,
                                         filters=self.filters).hits
            kept.append(chosen)
        ids = list(dict.fromkeys(h.item_id for hits in kept for h in hits))
        dim = queries.shape[1]
        emb = np.zeros((len(queries), self.k, dim), np.float32)
        valid = np.zeros((len(queries), self.k), bool)
        scores = np.full((len(queries), self.k), -np.inf, np.float32)
        if ids:
            vectors = self.memory.fetch_vectors(ids, self.retrieval.fused(modality))
            row_of = {item_id: n for n, item_id in enumerate(ids)}
            for q, hits in enumerate(kept):
                for j, hit in enumerate(hits):
                    emb[q, j] = vectors[row_of[hit.item_id]]
                    valid[q, j] = True
                    scores[q, j] = hit.score
        return emb, valid, scores

    def _fuse(
        self, queries: np.ndarray, neighbours: np.ndarray, modality: Modality, valid: np.ndarray | None = None,
        scores: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Refined embeddings and attention; queries below the fallback threshold keep their CLIP embedding."""
        if scores is None:  # no scores given: every neighbour counts as a perfect match (no bias, no fallback)
            scores = np.ones(neighbours.shape[:2], np.float32)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
            nb = torch.from_numpy(np.ascontiguousarray(neighbours)).to(self.device)
            mask = None if valid is None else torch.from_numpy(valid).to(self.device)
            sc = torch.from_numpy(np.ascontiguousarray(scores, np.float32)).to(self.device)
            out = self.model.refine(modality, q, nb, mask, None, sc)
            mix = self.mix_for(modality)
            if mix > 0:  # toward mean fusion, which validation showed trusts an in-domain memory better
                mean = MeanFusion()(q, nb, mask)
                out = FusionOutput(F.normalize((1 - mix) * out.embedding + mix * mean.embedding, dim=-1),
                                   (1 - mix) * out.attention + mix * mean.attention)
        embedding = out.embedding.float().cpu().numpy()
        attention = out.attention.float().cpu().numpy()
        back = self.falls_back(scores, modality)
        if back.any():
            kept = np.asarray(queries, np.float32)[back]
            embedding[back] = kept / np.maximum(np.linalg.norm(kept, axis=1, keepdims=True), 1e-12)
            attention[back] = 0.0
            attention[back, 0] = 1.0
        return embedding, attention

    def apply_mode(
        self, images: np.ndarray, texts: np.ndarray, mode: RefineMode
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (image, text) embeddings an inference mode compares."""
        mode = RefineMode(mode)
        if mode in (RefineMode.IMAGE, RefineMode.BOTH):
            images = self.refine_many(images, Modality.IMAGE)
        if mode in (RefineMode.TEXT, RefineMode.BOTH):
            texts = self.refine_many(texts, Modality.TEXT)
        return images, texts


def refiner_from_checkpoint(
    path: Path,
    memory: VectorMemory,
    *,
    k: int,
    retrieval: RetrievalCfg | None = None,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> tuple[Refiner, CheckpointMeta]:
    """The retrieval switches default to those the checkpoint was trained with."""
    model, meta = load_checkpoint(path, expected_sha256=expected_sha256, device=device)
    if retrieval is None:
        retrieval = RetrievalCfg.from_dict(meta.options.get("retrieval", {}))
    kwargs.setdefault("calibration", meta.calibration)
    return Refiner(model, memory, k=k, retrieval=retrieval, device=device, **kwargs), meta


def mean_fusion_refiner(
    memory: VectorMemory, dim: int, *, k: int, retrieval: RetrievalCfg | None = None, **kwargs: Any
) -> Refiner:
    """The untrained averaging baseline of the ablation (no checkpoint needed)."""
    model = RecoFusion(FusionCfg(name="mean", kind="mean"), dim)
    return Refiner(model, memory, k=k, retrieval=retrieval, **kwargs)
