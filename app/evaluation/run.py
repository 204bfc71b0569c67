"""Evaluation on embeddings: zero-shot classification and image<->text retrieval, for each mode.

Refined embeddings are computed once per side and shared by the modes that use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.evaluation.metrics import recall_at_k, topk_accuracy
from app.evaluation.report import TASK_RETRIEVAL, TASK_ZEROSHOT, ResultRow
from app.refine import Refiner
from app.schemas import Modality, RefineMode
from app.zeroshot import ZeroShotClassifier

REFINES_IMAGE = (RefineMode.IMAGE, RefineMode.BOTH)
REFINES_TEXT = (RefineMode.TEXT, RefineMode.BOTH)


def _check_modes(modes: Sequence[RefineMode], refiner: Refiner | None) -> list[RefineMode]:
    modes = [RefineMode(m) for m in modes]
    if refiner is None and any(m is not RefineMode.CLIP for m in modes):
        raise ValueError("RECO modes need a fusion model (a checkpoint, or the mean-fusion baseline)")
    return modes


def evaluate_zeroshot(
    dataset: str,
    image_emb: np.ndarray,
    labels: np.ndarray,
    classifier: ZeroShotClassifier,
    modes: Sequence[RefineMode],
) -> list[ResultRow]:
    """top1 (and top5 when there are more than five classes) per mode."""
    modes = _check_modes(modes, classifier.refiner)
    refined_images = None
    if any(m in REFINES_IMAGE for m in modes):
        refined_images = classifier.image_side(image_emb, RefineMode.IMAGE)
    ks = (1, 5) if len(classifier.class_names) > 5 else (1,)
    rows: list[ResultRow] = []
    for mode in modes:
        images = refined_images if mode in REFINES_IMAGE else image_emb
        assert images is not None
        acc = topk_accuracy(images @ classifier.class_embeddings(mode).T, labels, ks)
        rows += [ResultRow(dataset=dataset, task=TASK_ZEROSHOT, metric=f"top{k}", mode=mode, value=v)
                 for k, v in acc.items()]
    return rows


def evaluate_retrieval(
    dataset: str,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    image_of_text: np.ndarray,
    refiner: Refiner | None,
    modes: Sequence[RefineMode],
) -> list[ResultRow]:
    """i2t and t2i recall@1/5/10 per mode (several captions per image)."""
    modes = _check_modes(modes, refiner)
    v_bar = t_bar = None
    if refiner is not None and any(m in REFINES_IMAGE for m in modes):
        v_bar = refiner.refine_many(image_emb, Modality.IMAGE)
    if refiner is not None and any(m in REFINES_TEXT for m in modes):
        t_bar = refiner.refine_many(text_emb, Modality.TEXT)
    rows: list[ResultRow] = []
    for mode in modes:
        images = v_bar if mode in REFINES_IMAGE else image_emb
        texts = t_bar if mode in REFINES_TEXT else text_emb
        assert images is not None and texts is not None
        for metric, value in recall_at_k(images, texts, image_of_text).items():
            rows.append(ResultRow(dataset=dataset, task=TASK_RETRIEVAL, metric=metric, mode=mode, value=value))
    return rows
