"""Sections of ``docs/reproduction.md`` for issue 16: the default recipe, mismatched memory, calibration,
levers and fallback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from programs.reproduce.aggregate import BEST
from programs.reproduce.plan import (
    ALL_MEMORIES,
    DOMAIN_SETS,
    GENERIC,
    GENERIC_DOMAIN,
    MEMORIES,
    MISMATCHED,
    PAPER,
    ZERO_SHOT_SETS,
    ReproPlan,
)
from programs.reproduce.readout import LABELS, Row, delta, get_row, md_table, pct, seed_subset, signed


def selection_section(meta: dict[str, Any]) -> list[str]:
    default = meta.get("default_variant", PAPER)
    lines = [f"## The default recipe: `{default}`", "",
             "Chosen on validation only: the trained candidate with the highest validation score = mean of (zero-shot "
             "top-1 on the held-out domain train images, every memory) and (Flickr8k val R@1 both directions, "
             "generic and generic+domain), each in the mode chosen on validation. `reco demo`, `reco predict`, "
             "`reco eval` and the UI use the fusion of this recipe committed in `app/fusion/checkpoints/`.", ""]
    body = [[f"`{s['variant']}`" + (" **(default)**" if s["variant"] == default else ""),
             f"{100 * s['validation_score']:.2f}"] for s in sorted(meta.get("selection", []),
                                                                   key=lambda s: -s["validation_score"])]
    return lines + md_table(["candidate", "validation score"], body)


def default_zero_shot(results: Sequence[Row], default: str) -> list[str]:
    lines = ["## Zero-shot top-1 on test (%), mean ± std over the seeds of each row", "",
             "`mismatched`: each domain set with generic + the *other* domains' pairs (its own classes absent; "
             "CIFAR-10 has no domain pairs). RECO rows are mode `best` (chosen on validation).", ""]
    models = [("CLIP", default, "clip"), (f"RECO `{default}` (default)", default, BEST),
              ("RECO `paper`", PAPER, BEST), ("mean fusion", "mean-fusion", BEST), ("kNN vote", "knn-vote", "image")]
    body = []
    for memory in ALL_MEMORIES:
        for i, (label, variant, mode) in enumerate(models):
            cells = []
            for d in ZERO_SHOT_SETS:
                row = get_row(results, dataset=d, metric="top1", mode=mode, memory=memory, variant=variant)
                cells.append(pct(row) + (f" [{','.join(map(str, row['seeds']))}]" if row and i == 1 else ""))
            body.append([memory if i == 0 else "", label, *cells])
    return lines + md_table(["memory", "model", *[LABELS[d] for d in ZERO_SHOT_SETS]], body)


def default_retrieval(results: Sequence[Row], default: str) -> list[str]:
    lines = ["## Flickr8k test retrieval R@1 (%)", ""]
    body = []
    for memory in MEMORIES:
        for label, variant, mode in (("CLIP", default, "clip"), (f"RECO `{default}` (default)", default, BEST),
                                     ("RECO `paper`", PAPER, BEST), ("mean fusion", "mean-fusion", BEST)):
            body.append([memory, label, *[pct(get_row(results, dataset="flickr8k", metric=m, mode=mode, memory=memory,
                                                      variant=variant)) for m in ("i2t_r@1", "t2i_r@1")]])
    return lines + md_table(["memory", "model", "I→T R@1", "T→I R@1"], body)


def ece_section(results: Sequence[Row], default: str, meta: dict[str, Any]) -> list[str]:
    cal = meta.get("calibration", {})
    seeds = sorted({int(k.split("/")[-2]) for k in cal if k.startswith(f"{default}/")})
    scales = [cal[k]["softmax_scale"] for k in cal if k.startswith(f"{default}/")]
    scale_text = "; ".join(", ".join(f"{m} {v:g}" for m, v in sc.items()) for sc in scales[:1])
    lines = ["## Calibration: expected calibration error on test (%, 15 bins)", "",
             "The softmax logit scale of each mode is fitted on the validation logits (all memories) of each "
             f"checkpoint by negative log-likelihood, replacing the fixed 100. Default recipe, seed {seeds[:1]}: "
             f"{scale_text or '–'}. `CLIP @100` is today's product; `CLIP` uses its own validation-fitted scale.",
             ""]
    body = []
    for memory in ALL_MEMORIES:
        for d in ZERO_SHOT_SETS:
            if d not in DOMAIN_SETS and memory == MISMATCHED:
                continue
            clip100 = get_row(results, dataset=d, metric="ece@100", mode="clip", memory=memory, variant=default)
            clip = get_row(results, dataset=d, metric="ece", mode="clip", memory=memory, variant=default)
            reco = get_row(results, dataset=d, metric="ece", mode=BEST, memory=memory, variant=default)
            reco100 = get_row(results, dataset=d, metric="ece@100", mode=BEST, memory=memory, variant=default)
            paper = get_row(results, dataset=d, metric="ece", mode=BEST, memory=memory, variant=PAPER)
            body.append([memory, LABELS[d], pct(clip100), pct(clip), pct(reco100), pct(reco), pct(paper)])
    return lines + md_table(["memory", "set", "CLIP @100", "CLIP", f"RECO `{default}` @100", f"RECO `{default}`",
                             "RECO `paper`"], body)


def levers_table(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    names = [PAPER, *[v.name for v in plan.variants if v.group == "levers"], "mean-fusion"]
    selection = {s["variant"]: s["validation_score"] for s in meta.get("selection", [])}
    lines = ["## Issue 16's levers, each with and without", "",
             "Top-1 % on test, mode `best`, seeds " + str(list(plan.ablation_seeds)) + " (Δ vs CLIP in brackets); "
             "`+fallback` = the same fusion with the validation-chosen fallback toward CLIP; `+mix+fallback` = "
             "the same fusion blended with mean fusion (weights per task and query modality chosen on validation), "
             "then the fallback; `val` = the "
             "validation score the default is chosen by.", ""]
    sets = [(d, GENERIC_DOMAIN) for d in ZERO_SHOT_SETS] + [(d, MISMATCHED) for d in DOMAIN_SETS] + [
        ("cifar10", GENERIC)]
    header = ["variant", *[f"{LABELS[d]} {'g+d' if m == GENERIC_DOMAIN else m}" for d, m in sets],
              "Flickr8k I→T / T→I R@1 (generic)", "val"]
    body = []
    for name in names:
        try:
            plan.variant(name)
        except KeyError:
            continue
        cells = []
        for d, memory in sets:
            row = get_row(results, dataset=d, metric="top1", mode=BEST, memory=memory, variant=name)
            row = seed_subset(results, row, plan.ablation_seeds) if row else None
            clip = get_row(results, dataset=d, metric="top1", mode="clip", memory=memory, variant=name)
            cells.append(pct(row, std=False) + ("" if row is None else f" ({signed(delta(row, clip))})"))
        ret = [seed_subset(results, r, plan.ablation_seeds) if r else None
               for r in (get_row(results, dataset="flickr8k", metric=m, mode=BEST, memory=GENERIC, variant=name)
                         for m in ("i2t_r@1", "t2i_r@1"))]
        body.append([f"`{name}`", *cells, " / ".join(pct(r, std=False) for r in ret),
                     f"{100 * selection[name]:.2f}" if name in selection else "–"])
    return lines + md_table(header, body)


def mix_section(plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    """The blend weights toward mean fusion each ``+mix`` variant chose on validation, per task and query side."""
    names = [v.name for v in plan.variants if v.mean_mix]
    cal = meta.get("calibration", {})
    body = []
    for name in names:
        key = next((k for k in sorted(cal) if k.startswith(f"{name}/")), None)
        if key is None:
            continue
        mix = cal[key].get("mean_mix") or {}
        body.append([f"`{name}`", *[" / ".join(f"{mix.get(task, {}).get(m, 0.0):g}" for m in ("image", "text"))
                                    for task in ("zeroshot", "retrieval")]])
    if not body:
        return []
    lines = ["## Blend toward mean fusion: weights chosen on validation (first seed)", "",
             "Weight of mean fusion in the refined embedding (0 = the trained fusion alone, 1 = mean fusion), image / "
             "text queries, chosen per task by that task's half of the validation score.", ""]
    return lines + md_table(["variant", "zero-shot (image / text)", "retrieval (image / text)"], body) + [""]


def fallback_section(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    names = [v.name for v in plan.variants if v.fallback]
    if not names:
        return []
    lines = ["## Do no harm: how often each fallback keeps CLIP (test, %)", "",
             "Share of test image queries / class prompts (Flickr8k: images / captions) whose best neighbour "
             "scores below the validation-chosen threshold. Thresholds (image, text queries) and the validation "
             "quantile they came from, first seed:", ""]
    cal = meta.get("calibration", {})
    for name in names:
        key = next((k for k in cal if k.startswith(f"{name}/")), None)
        if key is None:
            continue
        fb = cal[key].get("fallback")
        cands = cal[key].get("fallback_candidates", [])
        chosen = next((c["quantile"] for c in cands if c["thresholds"] == fb), None)
        lines.append(f"- `{name}`: " + (", ".join(f"{m} {t:.3f}" for m, t in fb.items()) + f" (quantile {chosen})"
                                        if fb else "none (no threshold helped on validation)"))
    lines.append("")
    body = []
    for name in names:
        for memory in ALL_MEMORIES:
            cells = []
            for d in (*ZERO_SHOT_SETS, "flickr8k"):
                if memory == MISMATCHED and d not in DOMAIN_SETS or (d == "flickr8k" and memory == MISMATCHED):
                    cells.append("–")
                    continue
                second = "caption_queries" if d == "flickr8k" else "class_prompts"
                a = get_row(results, dataset=d, metric="image_queries", mode="-", memory=memory, variant=name)
                b = get_row(results, dataset=d, metric=second, mode="-", memory=memory, variant=name)
                cells.append(f"{pct(a, std=False)} / {pct(b, std=False)}")
            body.append([f"`{name}`", memory, *cells])
    return lines + md_table(["variant", "memory", *[LABELS[d] for d in (*ZERO_SHOT_SETS, "flickr8k")]], body)
