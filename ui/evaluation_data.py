"""Evaluation runs (``app.db.runs.eval_runs``) reshaped for the Evaluation page's table and charts.

One long table row per (run, dataset, metric, mode): the charts are views of it. A run's *variant*
names what it ablates: options (mean fusion, cross-modal search, uni-modal fusion, no de-duplication)
and the synthetic evaluation's control datasets (``synthetic/mean-fusion``, ``synthetic/shuffled-memory``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

DEFAULT_VARIANT = "RECO (default)"
CLIP = "clip"
RECO_MODES = ("image", "text", "both")
COLUMNS = ["run", "created", "dataset", "base", "task", "metric", "mode", "value", "k", "variant"]


def variant_of(options: dict[str, Any] | None, dataset: str) -> str:
    options = options or {}
    parts = []
    if "/" in dataset:
        parts.append(dataset.split("/", 1)[1])
    if options.get("fusion") == "mean":
        parts.append("mean fusion")
    if options.get("search_modality") == "cross":
        parts.append("cross-modal search")
    if options.get("fusion_modality") == "uni":
        parts.append("uni-modal fusion")
    if options.get("dedupe") is False:
        parts.append("no dedupe")
    return " + ".join(parts) or DEFAULT_VARIANT


def runs_table(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{
        "run": r["id"], "created": r["created_at"], "dataset": r["dataset"], "task": r["task"], "k": r["k"],
        "best": r["best_value"], "memory": r["memory_size"], "near-duplicates removed": r["near_duplicates_removed"],
        "encoder": r["encoder_id"], "checkpoint": (r.get("results") or {}).get("checkpoint"),
        "variant": variant_of(r.get("options"), r["dataset"]),
    } for r in runs])


def result_rows(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for row in (run.get("results") or {}).get("rows", []):
            rows.append({"run": run["id"], "created": run["created_at"], "dataset": row["dataset"],
                         "base": row["dataset"].split("/", 1)[0], "task": row["task"], "metric": row["metric"],
                         "mode": str(row["mode"]), "value": float(row["value"]), "k": int(run["k"]),
                         "variant": variant_of(run.get("options"), row["dataset"])})
    return pd.DataFrame(rows, columns=COLUMNS)


def _latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: the rows of the newest run."""
    if df.empty:
        return df
    newest = df.groupby(keys)["run"].transform("max")
    return df[df["run"] == newest]


def clip_vs_reco(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The newest default-variant run per dataset: value per mode."""
    picked = df[(df["metric"] == metric) & (df["variant"] == DEFAULT_VARIANT)]
    return _latest(picked, ["dataset"])[["dataset", "mode", "value", "k", "run"]].reset_index(drop=True)


def k_sweep(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Default-variant value per (dataset, k, mode), newest run per k; only datasets run at two k or more."""
    picked = _latest(df[(df["metric"] == metric) & (df["variant"] == DEFAULT_VARIANT)], ["dataset", "k"])
    if picked.empty:
        return picked
    ks = picked.groupby("dataset")["k"].nunique()
    swept = picked[picked["dataset"].isin(ks[ks >= 2].index)]
    return swept[["dataset", "k", "mode", "value"]].sort_values(["dataset", "k"]).reset_index(drop=True)


def ablation(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per base dataset: CLIP, and each variant's best RECO mode (``both`` when it ran), newest run each."""
    picked = _latest(df[df["metric"] == metric], ["base", "variant"])
    out = []
    for (base, variant), group in picked.groupby(["base", "variant"]):
        reco = group[group["mode"].isin(RECO_MODES)]
        if not reco.empty:
            both = reco[reco["mode"] == "both"]
            out.append({"dataset": base, "variant": variant,
                        "value": float((both if not both.empty else reco)["value"].max())})
        clip = group[group["mode"] == CLIP]
        if variant == DEFAULT_VARIANT and not clip.empty:
            out.append({"dataset": base, "variant": "CLIP", "value": float(clip["value"].max())})
    table = pd.DataFrame(out, columns=["dataset", "variant", "value"])
    counts = table.groupby("dataset")["variant"].nunique() if not table.empty else pd.Series(dtype=int)
    return table[table["dataset"].isin(counts[counts >= 3].index)].reset_index(drop=True)
