"""Reading the aggregated results: one row, a percentage, a difference, a markdown table, and the paper's figures.

Shared by every section of ``docs/reproduction.md`` and by the plots.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from programs.reproduce.aggregate import BEST
from programs.reproduce.plan import GENERIC_DOMAIN, PAPER, ZERO_SHOT_SETS, ReproPlan

Row = dict[str, Any]
LABELS = {"cub100": "CUB-100", "flowers12": "Flowers-12", "imagenette": "Imagenette", "cifar10": "CIFAR-10",
          "flickr8k": "Flickr8k"}
# Paper (CLIP-B/32, Tab. 1 and 3): closest counterpart of each of our sets, CLIP -> RECO top-1 / R@1 in %.
PAPER_ZERO_SHOT = {"cub100": ("CUB-200", 52.8, 63.0), "flowers12": ("Flowers-102", 62.1, 67.9),
                   "imagenette": ("ImageNet-1k", 63.5, 64.6), "cifar10": (None, None, None)}
PAPER_RETRIEVAL = {"t2i_r@1": ("Flickr30k T→I", 61.1, 65.7), "i2t_r@1": ("Flickr30k I→T", 80.9, 81.8)}
PAPER_ABLATION = {"paper": "+9.0 %", "search-cross/fusion-cross": "+1.7 %", "search-uni/fusion-uni": "−0.4 %",
                  "search-cross/fusion-uni": "−1.9 %", "mean-fusion": "−21.7 %", "knn-vote": "–"}
RETRIEVAL_METRICS = ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10")
MODES = ("clip", "image", "text", "both", BEST)
# Issue 16's bar for Flickr8k R@1 with the generic memory: the paper recipe's figures in the doc before it.
FLICKR_R1_BEFORE = {"i2t_r@1": 0.114, "t2i_r@1": 0.101}
NO_LOSS_MARGIN = 0.005  # RECO >= CLIP - 0.5 points
TIME_BUDGET_MIN = 60.0


def pct(row: Row | None, std: bool = True) -> str:
    if row is None:
        return "–"
    text = f"{100 * row['value']:.1f}"
    return f"{text} ± {100 * row['std']:.1f}" if std and len(row["seeds"]) > 1 else text


def get_row(results: Sequence[Row], *, dataset: str, metric: str, mode: str, memory: str, variant: str = "paper",
            k: int | None = None, k_infer: int | None = None, split: str = "test") -> Row | None:
    where: dict[str, Any] = {"dataset": dataset, "metric": metric, "mode": mode, "memory": memory,
                             "variant": variant, "split": split}
    rows = [r for r in results if all(r.get(a) == b for a, b in where.items())]
    if k is not None:
        rows = [r for r in rows if r["k"] == k]
    rows = [r for r in rows if r["k_infer"] == (k_infer if k_infer is not None else r["k"])]
    return rows[0] if rows else None


def delta(a: Row | None, b: Row | None) -> float | None:
    return None if a is None or b is None else 100 * (a["value"] - b["value"])


def signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}"


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines + [""]


def option_delta(results: Sequence[Row], plan: ReproPlan, name: str, dataset: str,
                 memory: str = GENERIC_DOMAIN, metric: str = "top1", mode: str = BEST) -> float | None:
    """Option minus paper recipe, the paper recipe restricted to the option's seeds."""
    row = get_row(results, dataset=dataset, metric=metric, mode=mode, memory=memory, variant=name)
    base = get_row(results, dataset=dataset, metric=metric, mode=mode, memory=memory, variant="paper")
    if row is None or base is None:
        return None
    if row["seeds"] != base["seeds"]:  # compare on the same seeds: the paper rows hold the per-seed mean only
        base = seed_subset(results, base, row["seeds"])
    return delta(row, base)


def seed_subset(results: Sequence[Row], base: Row, seeds: Sequence[int]) -> Row | None:
    per_seed = base.get("per_seed")
    if not per_seed:
        return base
    values = [per_seed[str(s)] for s in seeds if str(s) in per_seed]
    return {**base, "value": sum(values) / len(values), "seeds": list(seeds)} if values else None


ABLATION_COMBINATIONS = (PAPER, "search-cross/fusion-cross", "search-uni/fusion-uni", "search-cross/fusion-uni")


def combination_means(results: Sequence[Row], plan: ReproPlan) -> dict[str, float] | None:
    """Mean top-1 over the zero-shot sets (generic+domain, ``best``) of each search × fusion combination, each on
    the ablation seeds; None unless every combination has every set."""
    means: dict[str, float] = {}
    for c in ABLATION_COMBINATIONS:
        vals = [get_row(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant=c)
                for d in ZERO_SHOT_SETS]
        vals = [seed_subset(results, v, plan.ablation_seeds) if v else None for v in vals]
        if all(v is not None for v in vals):
            means[c] = sum(v["value"] for v in vals if v) / len(vals)
    return means if len(means) == len(ABLATION_COMBINATIONS) else None
