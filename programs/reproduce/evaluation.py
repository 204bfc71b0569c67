"""Evaluating a fusion on every memory and set, and the choices made on validation only.

Every evaluation goes through the project's own services: :class:`~app.refine.Refiner` (a cached subclass),
:class:`~app.zeroshot.ZeroShotClassifier` and :mod:`app.evaluation.run`. Calibration on validation: the
softmax temperature per mode, the fallback threshold toward CLIP, and the validation score the default
recipe is chosen by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from app.evaluation.metrics import topk_accuracy
from app.evaluation.run import REFINES_IMAGE, evaluate_retrieval
from app.fusion.model import RecoFusion
from app.memory.exact import ExactIndex
from app.refine import TASKS
from app.retrieval import RetrievalCfg, gather_embeddings
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
from programs.reproduce.plan import DOMAIN_HINTS, MISMATCHED, Variant
from programs.reproduce.workspace import CachedRefiner, CachedTexts, NeighbourCache, Workspace, ZeroShotSet

ALL_MODES = list(RefineMode)
Row = dict[str, Any]
MeanMix = dict[str, dict[str, float]]  # task -> query modality -> weight (app.refine's calibration["mean_mix"])


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
             mean_mix: MeanMix | None = None,
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
                                fallback=fallback, calibration={"mean_mix": mean_mix} if mean_mix else None)
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
                 fallback: dict[str, float] | None = None, mean_mix: MeanMix | None = None,
                 splits: Sequence[str] = ("test", "val")) -> tuple[list[Row], list[Logits]]:
    rows: list[Row] = []
    logits: list[Logits] = []
    for memory in ws.memories:
        r, lg = evaluate(ws, model, variant, memory, k_infer, texts, kind=variant.kind, fallback=fallback,
                         mean_mix=mean_mix, splits=splits)
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
    parts = validation_parts(rows)
    return float(np.mean(list(parts.values()))) if parts else None


def validation_parts(rows: Sequence[Row]) -> dict[str, float]:
    """The two halves of :func:`validation_score`: ``zeroshot`` and ``retrieval`` (each present when measured)."""
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
    return {task: float(np.mean(x)) for task, x in (("zeroshot", zero_shot), ("retrieval", retrieval)) if x}


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


MEAN_MIX_GRID = (0.0, 0.5, 1.0)  # weight of mean fusion in the refined embedding (3 x 3 pairs: ~1 min a fusion)


def choose_mean_mix(ws: Workspace, model: RecoFusion, variant: Variant, k_infer: int, texts: CachedTexts, seed: int
                    ) -> tuple[MeanMix | None, list[dict[str, Any]]]:
    """Per task (zero-shot, retrieval), the weights of mean fusion blended into the fusion's output for image and
    text queries (a grid over both) with that task's best validation score; ties keep the smaller weights."""
    tried: list[dict[str, Any]] = []
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for wi in MEAN_MIX_GRID:
        for wt in MEAN_MIX_GRID:
            weights = {"image": wi, "text": wt}
            rows, _ = evaluate_all(ws, model, variant, k_infer, texts, splits=("val",),
                                   mean_mix={task: weights for task in TASKS})
            parts = validation_parts([{**r, "seed": seed} for r in rows])
            tried.append({"mean_mix": weights, "validation": parts})
            for task, score in parts.items():
                if task not in best or score > best[task][0] + 1e-12:
                    best[task] = (score, weights)
    chosen = {task: weights for task, (_, weights) in best.items()}
    return (chosen if any(w for weights in chosen.values() for w in weights.values()) else None), tried


def choose_fallback(ws: Workspace, model: RecoFusion, variant: Variant, k_infer: int, texts: CachedTexts, seed: int,
                    mean_mix: MeanMix | None = None) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """The fallback thresholds (image, text queries) with the best validation score: candidates are quantiles of
    the validation queries' top neighbour score (0 = never fall back; ties keep the smaller quantile)."""
    tops = _top_scores(ws, variant, k_infer, texts)
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, float] | None] | None = None
    for q in FALLBACK_QUANTILES:
        thresholds = None if q == 0 else {m: float(np.quantile(v, q)) for m, v in tops.items() if len(v)}
        rows, _ = evaluate_all(ws, model, variant, k_infer, texts, fallback=thresholds, mean_mix=mean_mix,
                               splits=("val",))
        score = validation_score([{**r, "seed": seed} for r in rows])
        tried.append({"quantile": q, "thresholds": thresholds, "validation_score": score})
        if score is not None and (best is None or score > best[0] + 1e-12):
            best = (score, thresholds)
    return (best[1] if best else None), tried
