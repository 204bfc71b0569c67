"""Per-seed rows to mean ± std, and the RECO mode chosen on validation (never on test).

``best`` rows: for each (variant, memory, k, k', seed) the mode among ``text`` and ``both`` with the
higher validation score (zero-shot: mean top-1 over the held-out domain sets; retrieval: mean of the
two R@1 on Flickr8k val) gives that seed's test value; the mean over seeds is then taken as usual.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

Row = dict[str, Any]
GROUP_KEYS = ("dataset", "task", "metric", "mode", "memory", "variant", "split", "k", "k_infer")
CANDIDATE_MODES = ("text", "both")
BEST = "best"


def _run_key(row: Row) -> tuple[Any, ...]:
    return row["variant"], row["memory"], row["k"], row["k_infer"], row["seed"]


def choose_modes(rows: Iterable[Row]) -> dict[tuple[Any, ...], dict[str, str]]:
    """Per run and task: the mode (text/both) with the best validation score."""
    scores: dict[tuple[Any, ...], dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        if row["split"] != "val" or row["mode"] not in CANDIDATE_MODES:
            continue
        if row["task"] == "zeroshot" and row["metric"] == "top1":
            scores[_run_key(row)]["zeroshot"][row["mode"]].append(row["value"])
        elif row["task"] == "retrieval" and row["metric"] in ("i2t_r@1", "t2i_r@1"):
            scores[_run_key(row)]["retrieval"][row["mode"]].append(row["value"])
    chosen: dict[tuple[Any, ...], dict[str, str]] = {}
    for key, tasks in scores.items():
        chosen[key] = {task: _best_mode(modes) for task, modes in tasks.items()}
    return chosen


def _best_mode(values: dict[str, list[float]]) -> str:
    """Highest mean; ties go to the first candidate ("text"), as max keeps the first maximum."""
    def score(mode: str) -> float:
        return float(np.mean(values[mode])) if values[mode] else -1.0

    return max(CANDIDATE_MODES, key=score)


def with_best_rows(rows: list[Row]) -> list[Row]:
    """``rows`` plus, for every test row of the chosen mode, a copy with mode ``best``."""
    chosen = choose_modes(rows)
    out = list(rows)
    for row in rows:
        pick = chosen.get(_run_key(row), {}).get(row["task"])
        if pick is not None and row["mode"] == pick and row["split"] == "test":
            out.append({**row, "mode": BEST, "chosen_mode": pick})
    return out


def aggregate(rows: Iterable[Row]) -> list[Row]:
    """Mean and sample std (0 for one seed) of ``value`` over seeds, per group."""
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in GROUP_KEYS)].append(row)
    out: list[Row] = []
    for key, members in groups.items():
        values = np.asarray([m["value"] for m in members], np.float64)
        seeds = sorted(m["seed"] for m in members)
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"duplicate seeds in group {key}: {seeds}")
        record = dict(zip(GROUP_KEYS, key, strict=True))
        record.update(value=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                      seeds=seeds, per_seed={str(m["seed"]): float(m["value"]) for m in members})
        picks = sorted({m["chosen_mode"] for m in members if "chosen_mode" in m})
        if picks:
            record["chosen_modes"] = [m["chosen_mode"] for m in sorted(members, key=lambda m: m["seed"])]
        out.append(record)
    return out
