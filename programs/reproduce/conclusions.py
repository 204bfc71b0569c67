"""The sentences of ``docs/reproduction.md`` that judge: goals and targets met or not, signs against the paper,
the measured chain of reasons. Each is computed from the run's numbers; a missing number is said to be missing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from programs.reproduce.aggregate import BEST
from programs.reproduce.plan import (
    ALL_MEMORIES,
    DOMAIN_SETS,
    GENERIC,
    GENERIC_DOMAIN,
    MISMATCHED,
    PAPER,
    ZERO_SHOT_SETS,
    ReproPlan,
)
from programs.reproduce.readout import (
    FLICKR_R1_BEFORE,
    LABELS,
    NO_LOSS_MARGIN,
    PAPER_RETRIEVAL,
    PAPER_ZERO_SHOT,
    TIME_BUDGET_MIN,
    Row,
    combination_means,
    delta,
    get_row,
    md_table,
    option_delta,
    pct,
    signed,
)


def targets(results: Sequence[Row], plan: ReproPlan) -> tuple[list[str], list[str]]:
    """Target checks of issue 5 and sign agreement with the paper, as sentences built from the numbers."""
    checks: list[tuple[str, bool | None, str]] = []

    def gain(ds: str, memory: str, variant: str = "paper", mode: str = BEST, metric: str = "top1") -> float | None:
        return delta(get_row(results, dataset=ds, metric=metric, mode=mode, memory=memory, variant=variant),
                     get_row(results, dataset=ds, metric=metric, mode="clip", memory=memory))

    for ds, need in (("flowers12", 5.0), ("imagenette", 5.0), ("cub100", 3.0)):
        g = gain(ds, GENERIC_DOMAIN)
        checks.append((f"RECO beats CLIP by ≥ {need:.0f} points on {LABELS[ds]} (generic+domain)",
                       None if g is None else g >= need, f"{signed(g)} points"))
    g = gain("cifar10", GENERIC_DOMAIN)
    checks.append(("no loss on CIFAR-10 (generic+domain)", None if g is None else g >= 0, f"{signed(g)} points"))
    for ds in ZERO_SHOT_SETS:
        g = gain(ds, GENERIC)
        checks.append((f"no loss with the generic memory on {LABELS[ds]}", None if g is None else g >= 0,
                       f"{signed(g)} points"))
    for metric in ("i2t_r@1", "t2i_r@1"):
        g = gain("flickr8k", GENERIC, metric=metric)
        checks.append((f"no loss with the generic memory on Flickr8k {metric}", None if g is None else g >= 0,
                       f"{signed(g)} points"))
    for baseline, mode in (("mean-fusion", BEST), ("knn-vote", "image")):
        wins = []
        for ds in DOMAIN_SETS:
            a = get_row(results, dataset=ds, metric="top1", mode=BEST, memory=GENERIC_DOMAIN)
            b = get_row(results, dataset=ds, metric="top1", mode=mode, memory=GENERIC_DOMAIN, variant=baseline)
            wins.append(delta(a, b))
        ok = None if any(w is None for w in wins) else all(w > 0 for w in wins)  # type: ignore[operator]
        checks.append((f"learned fusion beats {baseline} on every domain set (generic+domain)", ok,
                       ", ".join(f"{LABELS[d]} {signed(w)}" for d, w in zip(DOMAIN_SETS, wins, strict=True))))
    means = combination_means(results, plan)
    if means is not None:
        best = max(means, key=lambda c: means[c])
        checks.append(("uni-modal search + cross-modal fusion is the best of the four combinations",
                       best == "paper", "mean top-1 over the four sets: "
                       + ", ".join(f"{c} {100 * m:.1f}" for c, m in means.items())))
    lines = ["## Targets of issue 5", ""]
    lines += md_table(["target", "met", "measured"],
                      [[t, "–" if ok is None else ("yes" if ok else "**no**"), m] for t, ok, m in checks])
    signs = ["## Where the signs agree with the paper", ""]
    for ds in ("cub100", "flowers12", "imagenette"):
        g = gain(ds, GENERIC_DOMAIN)
        name, clip, reco = PAPER_ZERO_SHOT[ds]
        if g is None:
            continue
        agree = g > 0
        assert clip is not None and reco is not None
        signs.append(f"- {LABELS[ds]} (paper: {name} {reco - clip:+.1f}): ours {g:+.1f} with the updated memory, "
                     + ("same sign." if agree else "**opposite sign**."))
    for metric in ("t2i_r@1", "i2t_r@1"):
        g = gain("flickr8k", GENERIC, metric=metric)
        name, clip, reco = PAPER_RETRIEVAL[metric]
        if g is not None:
            signs.append(f"- Flickr8k {metric} (paper: {name} {reco - clip:+.1f}): ours {g:+.1f} with the generic "
                         "memory, " + ("same sign." if g > 0 else "**opposite sign** (or none)."))
    mf = [delta(get_row(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant="mean-fusion"),
                get_row(results, dataset=d, metric="top1", mode="clip", memory=GENERIC_DOMAIN))
          for d in ZERO_SHOT_SETS]
    if all(m is not None for m in mf):
        signs.append("- Mean fusion vs CLIP (paper: worse than CLIP everywhere, −21.7 % relative): ours "
                     + ", ".join(f"{LABELS[d]} {signed(m)}" for d, m in zip(ZERO_SHOT_SETS, mf, strict=True))
                     + (" — same sign." if all(m < 0 for m in mf if m is not None) else " — **not** the paper's "
                        "sign on every set: with a class-captioned domain memory the neighbours' captions alone "
                        "carry the label (see the purity table)."))
    return lines, signs + [""]


MEMORISED_RATIO = 2.0  # the base "knows" its training pairs when its R@1 on them is at least this times the unseen


def why(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    """The measured chain of reasons behind the learned fusion's result: each step compares the run's numbers and
    says what they show (or does not hold, or was not measured); no sentence is fixed in advance."""
    diag = meta.get("diagnostics", {})
    k = plan.variant(PAPER).k if any(v.name == PAPER for v in plan.variants) else None
    lines = ["## Why: the measured chain", "",
             _why_memorised(diag), _why_attention(diag, k), _why_purity(diag), _why_mean_fusion(results),
             _why_options(results, plan), _why_unseen_pairs(diag, meta)]
    return lines + [""]


def _why_memorised(diag: dict[str, Any]) -> str:
    overfit = {r["images"]: r for r in diag.get("base_overfit", [])}
    seen, unseen = overfit.get("train (seen by the base)"), overfit.get("test (unseen)")
    if not seen or not unseen:
        return ("1. Whether the base has memorised the fusion's training pairs (Flickr8k train): not measured in this "
                "run (no R@1 of the base on seen and unseen images).")
    a, b = seen["i2t_r@1"], unseen["i2t_r@1"]
    measured = (f"without any memory, the frozen base finds the right caption at rank 1 for {100 * a:.0f} % of "
                f"Flickr8k train images (n = {seen['n']}) and for {100 * b:.0f} % of unseen test images "
                f"(n = {unseen['n']})")
    if a >= MEMORISED_RATIO * b and a > b:
        return (f"1. **The fusion's training pairs are the base's own training pairs, and the base has memorised "
                f"them:** {measured}, {_times(a, b)} as often. During fusion training the query alone therefore "
                "nearly solves the contrastive task; neighbours (which exclude the query's own image) add little.")
    return (f"1. The fusion's training pairs are the base's own training pairs, but the base has **not** memorised "
            f"them (less than {MEMORISED_RATIO:g}× its rate on unseen images): {measured}. The query alone does not "
            "solve the contrastive task during fusion training any more than at test time.")


def _times(a: float, b: float) -> str:
    return f"{a / b:.1f}×" if b > 0 else "infinitely"


def _why_attention(diag: dict[str, Any], k: int | None) -> str:
    att = diag.get("attention_by_variant", {}).get(PAPER)
    img = [r["neighbour_attention"] for r in att or [] if r["memory"] == GENERIC_DOMAIN and "images" in r["queries"]]
    cap = [r["neighbour_attention"] for r in att or [] if "captions" in r["queries"]]
    if k is None or not img or not cap:
        return ("2. How much the trained fusion listens to its neighbours: not measured in this run (no attention "
                "of the paper recipe's fusion on test images and captions).")
    shares = {"a test image": sum(img) / len(img), "a test caption": sum(cap) / len(cap)}
    uniform = k / (k + 1)
    below = [q for q, v in shares.items() if v < uniform]
    measured = (f"the query token puts {shares['a test image']:.2f} of its attention on the {k} neighbours of a "
                f"test image and {shares['a test caption']:.2f} for a test caption, where mean fusion gives them "
                f"{uniform:.2f}")
    if len(below) == len(shares):
        return f"2. **The trained fusion listens less to its neighbours than mean fusion:** {measured}."
    if not below:
        return f"2. The trained fusion listens to its neighbours **as much as or more than** mean fusion: {measured}."
    return f"2. The trained fusion listens less than mean fusion only for {', '.join(below)}: {measured}."


SEARCH_SIDES = (("prompt_uni_search", "text→text (class prompts)"), ("image_uni_search", "image→image"),
                ("image_cross_search", "image→text"))


def _why_purity(diag: dict[str, Any]) -> str:
    purity = diag.get("purity", [])
    if not purity:
        return ("3. What the memory can tell about a query's class: not measured in this run (no neighbour purity "
                "with the domain pairs).")
    per_set = ", ".join(
        f"{LABELS[r['dataset']]}: " + ", ".join(f"{name} {_share(r.get(key))}" for key, name in SEARCH_SIDES)
        for r in purity)
    means = {name: sum(r[key] for r in purity) / len(purity) for key, name in SEARCH_SIDES
             if all(r.get(key) is not None for r in purity)}
    if len(means) < 2:
        return (f"3. Share of the 10 neighbours (generic+domain memory) of the query's own class: {per_set}; too "
                "few search sides measured to compare them.")
    order = sorted(means, key=lambda n: -means[n])
    best = order[0]
    lead = ("**With the domain pairs, the memory knows the answer best on the text side:**"
            if best.startswith("text→text") else f"With the domain pairs, the memory knows the answer best by {best} "
            "search, not on the text side:")
    return (f"3. {lead} share of the 10 neighbours of the query's own class, {per_set}. Mean over the sets: "
            + ", ".join(f"{n} {100 * means[n]:.1f} %" for n in order) + f", so {best} search is the most precise "
            f"and {order[-1]} the least ({100 * means[best]:.1f} vs {100 * means[order[-1]]:.1f} %).")


def _share(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.1f} %"


def _why_mean_fusion(results: Sequence[Row]) -> str:
    gaps: dict[str, float | None] = {}
    for ds in DOMAIN_SETS:
        learned = get_row(results, dataset=ds, metric="top1", mode=BEST, memory=GENERIC_DOMAIN)
        mean = get_row(results, dataset=ds, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant="mean-fusion")
        gaps[LABELS[ds]] = delta(learned, mean)
    measured = {name: g for name, g in gaps.items() if g is not None}
    missing = [name for name, g in gaps.items() if g is None]
    if not measured:
        return ("4. Learned vs mean fusion: not measured in this run (no top-1 of the paper recipe and of mean "
                "fusion with the generic+domain memory).")
    numbers = ("learned minus mean fusion (top-1 points, generic+domain) "
               + ", ".join(f"{name} {g:+.1f}" for name, g in measured.items())
               + (f"; not measured on {', '.join(missing)}" if missing else ""))
    worse = [name for name, g in measured.items() if g < 0]
    better = [name for name, g in measured.items() if g > 0]
    if len(worse) == len(measured):
        return ("4. Hence, when neighbours are right, weighting them with the trust learned in training **loses** "
                f"against weighting them fully, on every set measured: {numbers}.")
    if len(better) == len(measured):
        return f"4. The learned fusion **beats** mean fusion on every set measured: {numbers}."
    return (f"4. Learned vs mean fusion is mixed — better on {', '.join(better) or 'none'}, worse on "
            f"{', '.join(worse) or 'none'}: {numbers}.")


def _why_options(results: Sequence[Row], plan: ReproPlan) -> str:
    names = [v.name for v in plan.variants if v.group in ("options", "exclusion")]
    if not names:
        return "5. Options: none in this run's plan."
    ranked: list[tuple[float, str]] = []
    missing: list[str] = []
    for name in names:
        deltas = [option_delta(results, plan, name, ds) for ds in DOMAIN_SETS]
        if all(d is not None for d in deltas):
            ranked.append((sum(d for d in deltas if d is not None) / len(deltas), name))
        else:
            missing.append(name)
    tail = f" Not measured on every domain set: {', '.join(f'`{n}`' for n in missing)}." if missing else ""
    if not ranked:
        return f"5. Options vs the paper recipe: not measured in this run.{tail}"
    ranked.sort(reverse=True)
    helped = [n for d, n in ranked if d > 0]
    verdict = (f"{len(helped)} of {len(ranked)} improve on the paper recipe (best `{ranked[0][1]}` "
               f"{ranked[0][0]:+.1f})" if helped else f"none of the {len(ranked)} improves on the paper recipe "
               f"(closest `{ranked[0][1]}` {ranked[0][0]:+.1f})")
    return ("5. Options, by mean top-1 change over the three domain sets vs the paper recipe on the same seed: "
            + ", ".join(f"`{n}` {d:+.1f}" for d, n in ranked) + f" — {verdict}.{tail}")


def _why_unseen_pairs(diag: dict[str, Any], meta: dict[str, Any]) -> str:
    training = meta.get("training", [])
    unseen_run = next((t for t in training if t["variant"] == "unseen-pairs"), None)
    paper_run = next((t for t in training if t["variant"] == PAPER), None)
    if not unseen_run or not paper_run:
        return ("6. Training on pairs the base never saw: not run in this plan (no training of `unseen-pairs` and "
                "the paper recipe to compare).")
    overfit = {r["images"]: r for r in diag.get("base_overfit", [])}
    half, seen = overfit.get("val half for unseen-pairs"), overfit.get("train (seen by the base)")
    if half and seen:
        cause = ("the base finds the right caption at rank 1 for "
                 f"{100 * half['i2t_r@1']:.0f} % of those pairs' images vs "
                 f"{100 * seen['i2t_r@1']:.0f} % of its own training images, so it "
                 + ("removes cause 1" if half["i2t_r@1"] < seen["i2t_r@1"] else "does **not** remove cause 1"))
    else:
        cause = "whether it removes cause 1 is not measured"
    fits = unseen_run["final_loss"] < paper_run["final_loss"]
    return (f"6. Training on pairs the base never saw: {cause}, but leaves {unseen_run['pairs']} pairs (vs "
            f"{paper_run['pairs']}); its final training loss {unseen_run['final_loss']:.2f} is "
            + ("lower than" if fits else "not lower than")
            + f" {paper_run['final_loss']:.2f} for the paper recipe"
            + (" — it fits its few pairs instead." if fits else ", so it does not fit its few pairs better."))


def goals(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    """Issue 16's goals for the default recipe, each met or not, computed from the numbers."""
    default = meta.get("default_variant", PAPER)
    checks: list[tuple[str, bool | None, str]] = []

    def top1(ds: str, memory: str, variant: str, mode: str = BEST, metric: str = "top1") -> Row | None:
        return get_row(results, dataset=ds, metric=metric, mode=mode, memory=memory, variant=variant)

    margins = []
    for ds in DOMAIN_SETS:
        reco = top1(ds, GENERIC_DOMAIN, default)
        mean = top1(ds, GENERIC_DOMAIN, "mean-fusion")
        knn = top1(ds, GENERIC_DOMAIN, "knn-vote", "image")
        a, b = delta(reco, mean), delta(reco, knn)
        ok = None if a is None or b is None else (a >= 0 and b >= 0)
        margins.append(None if a is None or b is None else min(a, b))
        checks.append((f"{LABELS[ds]} (generic+domain): default RECO ≥ mean fusion and ≥ kNN vote", ok,
                       f"RECO {pct(reco)}; vs mean fusion {signed(a)}, vs kNN vote {signed(b)} points"))
    if all(m is not None for m in margins):
        checks.append(("stretch: ≥ 2 points above the better of the two on each", all(m >= 2 for m in margins  # type: ignore[operator]
                                                                                       ), ", ".join(
            f"{LABELS[d]} {signed(m)}" for d, m in zip(DOMAIN_SETS, margins, strict=True))))
    no_loss = [("cifar10", GENERIC_DOMAIN, "top1")] + [(d, GENERIC, "top1") for d in ZERO_SHOT_SETS] + [
        ("flickr8k", GENERIC, m) for m in ("i2t_r@1", "t2i_r@1")] + [(d, MISMATCHED, "top1") for d in DOMAIN_SETS]
    for ds, memory, metric in no_loss:
        reco = top1(ds, memory, default, metric=metric)
        clip = top1(ds, memory, default, "clip", metric)
        d = delta(reco, clip)
        checks.append((f"no loss: {LABELS[ds]} {metric if ds == 'flickr8k' else ''} ({memory}) RECO ≥ CLIP − 0.5",
                       None if d is None else d >= -100 * NO_LOSS_MARGIN, f"{signed(d)} points"))
    for metric, before in FLICKR_R1_BEFORE.items():
        reco = top1("flickr8k", GENERIC, default, metric=metric)
        checks.append((f"Flickr8k {metric} (generic) ≥ {100 * before:.1f} (the paper recipe before)",
                       None if reco is None else reco["value"] >= before - 1e-9, pct(reco)))
    worse = []
    n = 0
    for memory in ALL_MEMORIES:
        for ds in ZERO_SHOT_SETS:
            reco = top1(ds, memory, default, metric="ece")
            clip = top1(ds, memory, default, "clip", "ece")
            clip100 = top1(ds, memory, default, "clip", "ece@100")
            if reco is None or clip is None:
                continue
            n += 1
            if reco["value"] > clip["value"] or (clip100 is not None and reco["value"] > clip100["value"]):
                worse.append(f"{LABELS[ds]} {memory} (RECO {pct(reco, std=False)} vs CLIP {pct(clip, std=False)}, "
                             f"@100 {pct(clip100, std=False)})")
    checks.append(("ECE of RECO ≤ that of CLIP (own fitted scale and @100) on every set and memory",
                   None if n == 0 else not worse, "; ".join(worse) if worse else f"all {n} sets"))
    means = combination_means(results, plan)
    if means is not None:
        best = max(means, key=lambda c: means[c])
        checks.append(("uni-modal search + cross-modal fusion the best of the four (learned fusion, paper recipe)",
                       best == PAPER, "mean top-1 over the four sets (g+d): "
                       + ", ".join(f"{c} {100 * m:.1f}" for c, m in means.items())))
    minutes = meta.get("seconds", 0) / 60
    checks.append((f"`reco reproduce` within {TIME_BUDGET_MIN:.0f} minutes here", minutes <= TIME_BUDGET_MIN,
                   f"{minutes:.1f} min"))
    lines = [f"## Goals of issue 16 (default recipe `{default}`, test split, seeds as in the tables)", ""]
    return lines + md_table(["goal", "met", "measured"],
                            [[t, "–" if ok is None else ("yes" if ok else "**no**"), m] for t, ok, m in checks])


def misses(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    """Measured facts behind the goals, each a sentence built from the run's numbers."""
    from app.zeroshot import SCALE_GRID

    default = meta.get("default_variant", PAPER)
    source = plan.variant(default).train_key() if default in {v.name for v in plan.variants} else default
    lines = ["### What the numbers say about the misses", ""]
    att = meta.get("diagnostics", {}).get("attention_by_variant", {}).get(source)
    if att:
        img = [r["neighbour_attention"] for r in att if r["memory"] == GENERIC_DOMAIN and "images" in r["queries"]]
        if img:
            share = sum(img) / len(img)
            k = plan.variant(source).k
            lines.append(f"- Trust in the neighbours: the default's fusion puts {share:.2f} of the query's "
                         "attention on its neighbours (domain test images, generic+domain), mean fusion "
                         f"{k / (k + 1):.2f}; learned minus mean fusion on the domain sets: " + ", ".join(
                             f"{LABELS[d]} {signed(delta(get_row(results, dataset=d, metric='top1', mode=BEST, memory=GENERIC_DOMAIN, variant=default), get_row(results, dataset=d, metric='top1', mode=BEST, memory=GENERIC_DOMAIN, variant='mean-fusion')))}"  # noqa: E501
                             for d in DOMAIN_SETS) + ".")
    cal = meta.get("calibration", {})
    key = next((k for k in cal if k.startswith(f"{default}/")), None)
    if key:
        scales = cal[key]["softmax_scale"]
        floor = [m for m, v in scales.items() if v <= min(SCALE_GRID)]
        lines.append("- Calibration: one softmax scale per mode is fitted over the validation images of all three "
                     "memories together, whose accuracies differ by an order of magnitude (default, CUB-100 "
                     "top-1: " + ", ".join(
                         f"{m} {pct(get_row(results, dataset='cub100', metric='top1', mode=BEST, memory=m, variant=default, split='test'), std=False)}"  # noqa: E501
                         for m in ALL_MEMORIES) + " on test); fitted scales " + ", ".join(
                         f"{m} {v:g}" for m, v in scales.items())
                     + (f" — {', '.join(floor)} at the grid's floor ({min(SCALE_GRID):g}), so lower scales were "
                        "not tried" if floor else "") + ".")
        fb = cal[key].get("fallback")
        cifar = get_row(results, dataset="cifar10", metric="image_queries", mode="-", memory=GENERIC_DOMAIN,
                        variant=default)
        if fb and cifar:
            lines.append(f"- Do no harm on CIFAR-10 with the domain pairs: only {pct(cifar, std=False)} % of its test "
                         f"images fall below the image threshold {fb.get('image', float('nan')):.3f}: the rest are "
                         "refined although the memory holds none of their classes.")
    for metric in ("i2t_r@1", "t2i_r@1"):
        d = delta(get_row(results, dataset="flickr8k", metric=metric, mode=BEST, memory=GENERIC, variant=default),
                  get_row(results, dataset="flickr8k", metric=metric, mode=BEST, memory=GENERIC, variant=PAPER))
        if d is not None:
            lines.append(f"- Flickr8k {metric}: the default minus the paper recipe on the same seed {signed(d)} "
                         "points.")
    return lines + [""]
