"""Runs the plan: train every variant per seed, evaluate it on every memory, choose the default recipe.

:mod:`programs.reproduce.workspace` prepares the material, :mod:`~programs.reproduce.training` trains,
:mod:`~programs.reproduce.evaluation` evaluates and calibrates on validation, and
:mod:`~programs.reproduce.diagnostics` measures the reasons. Result rows are per seed;
:mod:`programs.reproduce.aggregate` reduces them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from app.encoder.base import Encoder
from app.fusion.config import FusionCfg
from app.fusion.model import RecoFusion
from programs.reproduce.diagnostics import (
    base_overfit,
    embedding_cone,
    neighbour_attention,
    neighbour_purity,
    training_leak,
)
from programs.reproduce.evaluation import (
    Row,
    calibrate_scales,
    choose_fallback,
    choose_mean_mix,
    evaluate_all,
    validation_score,
)
from programs.reproduce.plan import GENERIC, PAPER, ReproPlan, Variant
from programs.reproduce.training import train_variant
from programs.reproduce.workspace import CachedTexts, Workspace


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
        self.mixes: dict[tuple[str, int, int], tuple[dict[str, dict[str, float]] | None, list[dict[str, Any]]]] = {}

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
            mean_mix: dict[str, dict[str, float]] | None = None
            tried: list[dict[str, Any]] = []
            mixes: list[dict[str, Any]] = []
            if variant.mean_mix and model is not None:  # one grid per trained fusion, shared by its variants
                key = (variant.train_key(), seed, k_infer)
                if key not in self.mixes:
                    self.mixes[key] = choose_mean_mix(self.ws, model, variant, k_infer, self.texts, seed)
                mean_mix, mixes = self.mixes[key]
            if variant.fallback and model is not None:
                fallback, tried = choose_fallback(self.ws, model, variant, k_infer, self.texts, seed, mean_mix)
            rows, logits = evaluate_all(self.ws, model, variant, k_infer, self.texts, fallback=fallback,
                                        mean_mix=mean_mix)
            extra = {"variant": variant.name, "k": variant.k, "k_infer": k_infer}
            scales, ece_rows = calibrate_scales(logits, extra)
            self.out.rows += [{**r, "seed": seed} for r in (*rows, *ece_rows)]
            self.out.calibration[calibration_key(variant.name, seed, k_infer)] = {
                "fallback": fallback, "fallback_candidates": tried, "mean_mix": mean_mix, "mean_mix_candidates": mixes,
                "softmax_scale": scales}


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
