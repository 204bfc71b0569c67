"""Evaluation: zero-shot top-k, image<->text recall@k, near-duplicate removal, the JSON report."""

from app.evaluation.metrics import recall_at_k, topk_accuracy
from app.evaluation.near_duplicates import NearDuplicateRemoval, calibrate_threshold, remove_near_duplicates
from app.evaluation.report import METRICS, EvalReport, ResultRow
from app.evaluation.run import evaluate_retrieval, evaluate_zeroshot

__all__ = [
    "METRICS",
    "EvalReport",
    "NearDuplicateRemoval",
    "ResultRow",
    "calibrate_threshold",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "recall_at_k",
    "remove_near_duplicates",
    "topk_accuracy",
]
