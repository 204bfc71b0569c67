"""``docs/reproduction.json``, ``docs/reproduction.md`` and the PNG plots, from one run's rows only.

Every number in the markdown is read from the aggregated results of the run; the sentences that
compare with the paper are chosen by those numbers (signs, orderings), never written by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from programs.reproduce.aggregate import BEST, aggregate, with_best_rows
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

Row = dict[str, Any]
LABELS = {"cub100": "CUB-100", "flowers12": "Flowers-12", "imagenette": "Imagenette", "cifar10": "CIFAR-10",
          "flickr8k": "Flickr8k"}
# Paper (CLIP-B/32, Tab. 1 and 3): closest counterpart of each of our sets, CLIP -> RECO top-1 / R@1 in %.
PAPER_ZERO_SHOT = {"cub100": ("CUB-200", 52.8, 63.0), "flowers12": ("Flowers-102", 62.1, 67.9),
                   "imagenette": ("ImageNet-1k", 63.5, 64.6), "cifar10": (None, None, None)}
PAPER_RETRIEVAL = {"t2i_r@1": ("Flickr30k T→I", 61.1, 65.7), "i2t_r@1": ("Flickr30k I→T", 80.9, 81.8)}
PAPER_ABLATION = {"paper": "+9.0 %", "search-cross/fusion-cross": "+1.7 %", "search-uni/fusion-uni": "−0.4 %",
                  "search-cross/fusion-uni": "−1.9 %", "mean-fusion": "−21.7 %", "knn-vote": "–"}
REQUIRED_KEYS = ("dataset", "task", "metric", "mode", "memory", "value", "std", "seeds")
RETRIEVAL_METRICS = ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10")
MODES = ("clip", "image", "text", "both", BEST)
# Issue 16's bar for Flickr8k R@1 with the generic memory: the paper recipe's figures in the doc before it.
FLICKR_R1_BEFORE = {"i2t_r@1": 0.114, "t2i_r@1": 0.101}
NO_LOSS_MARGIN = 0.005  # RECO >= CLIP - 0.5 points
TIME_BUDGET_MIN = 60.0


def build_results(rows: list[Row]) -> list[Row]:
    """Aggregated rows, required keys first, sorted for stable diffs."""
    results = aggregate(with_best_rows(rows))
    ordered = [{**{k: r[k] for k in REQUIRED_KEYS}, **{k: v for k, v in r.items() if k not in REQUIRED_KEYS}}
               for r in results]
    return sorted(ordered, key=lambda r: (r["variant"], r["memory"], r["split"], r["k"], r["k_infer"], r["dataset"],
                                          r["task"], r["metric"], r["mode"]))


def _pct(row: Row | None, std: bool = True) -> str:
    if row is None:
        return "–"
    text = f"{100 * row['value']:.1f}"
    return f"{text} ± {100 * row['std']:.1f}" if std and len(row["seeds"]) > 1 else text


def _get(results: Sequence[Row], *, dataset: str, metric: str, mode: str, memory: str, variant: str = "paper",
         k: int | None = None, k_infer: int | None = None, split: str = "test") -> Row | None:
    where: dict[str, Any] = {"dataset": dataset, "metric": metric, "mode": mode, "memory": memory,
                             "variant": variant, "split": split}
    rows = [r for r in results if all(r.get(a) == b for a, b in where.items())]
    if k is not None:
        rows = [r for r in rows if r["k"] == k]
    rows = [r for r in rows if r["k_infer"] == (k_infer if k_infer is not None else r["k"])]
    return rows[0] if rows else None


def _delta(a: Row | None, b: Row | None) -> float | None:
    return None if a is None or b is None else 100 * (a["value"] - b["value"])


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines + [""]


# --- plots ---------------------------------------------------------------------------------------
def write_plots(results: Sequence[Row], plan: ReproPlan, folder: Path, default: str = PAPER) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    # 1. zero-shot top-1: CLIP, RECO (both memories), mean fusion, kNN vote
    series = [("CLIP", default, "clip", GENERIC_DOMAIN), (f"RECO {default} generic", default, BEST, GENERIC),
              (f"RECO {default} generic+domain", default, BEST, GENERIC_DOMAIN),
              ("mean fusion g+d", "mean-fusion", BEST, GENERIC_DOMAIN),
              ("kNN vote g+d", "knn-vote", "image", GENERIC_DOMAIN)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.16
    for i, (label, variant, mode, memory) in enumerate(series):
        vals, errs = [], []
        for ds in ZERO_SHOT_SETS:
            row = _get(results, dataset=ds, metric="top1", mode=mode, memory=memory, variant=variant)
            vals.append(100 * row["value"] if row else 0.0)
            errs.append(100 * row["std"] if row else 0.0)
        ax.bar([j + (i - 2) * width for j in range(len(ZERO_SHOT_SETS))], vals, width, yerr=errs, label=label)
    ax.set_xticks(range(len(ZERO_SHOT_SETS)), [LABELS[d] for d in ZERO_SHOT_SETS])
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.legend(fontsize=7)
    ax.set_title("Zero-shot top-1 on test (RECO mode chosen on validation)")
    fig.tight_layout()
    written.append(folder / "zeroshot.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    # 2. k and k'
    k_variants = sorted({(r["variant"], r["k"]) for r in results if r["variant"] in ("paper", "k=1", "k=5", "k=20")},
                        key=lambda x: x[1])
    if len(k_variants) < 2:
        k_variants = []
    fig, axes = plt.subplots(1, len(DOMAIN_SETS), figsize=(10, 3.2))
    for ax, ds in zip(axes, DOMAIN_SETS, strict=True):
        for variant, k in k_variants:
            pts = sorted((r["k_infer"], 100 * r["value"]) for r in results
                         if r["variant"] == variant and r["dataset"] == ds and r["metric"] == "top1"
                         and r["mode"] == BEST and r["memory"] == GENERIC_DOMAIN and r["split"] == "test")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"k={k}")
        clip = _get(results, dataset=ds, metric="top1", mode="clip", memory=GENERIC_DOMAIN)
        if clip:
            ax.axhline(100 * clip["value"], color="grey", linestyle="--", label="CLIP")
        ax.set_xscale("log")
        ax.set_xlabel("k' (inference)")
        ax.set_title(LABELS[ds])
    axes[0].set_ylabel("top-1 (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    if k_variants:
        written.append(folder / "k.png")
        fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    # 3. options: gain of each option over the paper fusion on the same seeds (generic+domain, best mode)
    options = [v.name for v in plan.variants if v.group in ("options", "exclusion", "levers")]
    if options:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        for i, ds in enumerate(ZERO_SHOT_SETS):
            deltas = [_option_delta(results, plan, name, ds) or 0.0 for name in options]
            ax.bar([j + (i - 1.5) * 0.2 for j in range(len(options))], deltas, 0.2, label=LABELS[ds])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(options)), options, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("Δ top-1 vs paper recipe (points)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "options.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _option_delta(results: Sequence[Row], plan: ReproPlan, name: str, dataset: str,
                  memory: str = GENERIC_DOMAIN, metric: str = "top1", mode: str = BEST) -> float | None:
    """Option minus paper recipe, the paper recipe restricted to the option's seeds."""
    row = _get(results, dataset=dataset, metric=metric, mode=mode, memory=memory, variant=name)
    base = _get(results, dataset=dataset, metric=metric, mode=mode, memory=memory, variant="paper")
    if row is None or base is None:
        return None
    if row["seeds"] != base["seeds"]:  # compare on the same seeds: the paper rows hold the per-seed mean only
        base = _seed_subset(results, base, row["seeds"])
    return _delta(row, base)


def _seed_subset(results: Sequence[Row], base: Row, seeds: Sequence[int]) -> Row | None:
    per_seed = base.get("per_seed")
    if not per_seed:
        return base
    values = [per_seed[str(s)] for s in seeds if str(s) in per_seed]
    return {**base, "value": sum(values) / len(values), "seeds": list(seeds)} if values else None


# --- markdown ------------------------------------------------------------------------------------
def _near_duplicate_section(meta: dict[str, Any]) -> list[str]:
    nd = meta["near_duplicates"]
    lines = ["## Near-duplicates of the evaluation images removed from the memory", "",
             f"Evaluation images: every test and validation image ({nd['evaluation_images']}). Embedding "
             f"threshold calibrated for this encoder: cosine > **{nd['threshold']:.4f}**, the "
             f"{meta['plan']['near_duplicate_percentile']}th percentile of the nearest-neighbour cosine between "
             f"distinct images of the generic+domain memory; dHash: ≤ {meta['plan']['dhash_distance']} of 64 bits "
             "differ. Rows are (image, caption) pairs; a removed image takes all its captions.", ""]
    body = []
    for memory in MEMORIES:
        c = nd["memories"][memory]
        body.append([memory, str(c["rows_before"]), str(c["by_content_hash"]), str(c["by_perceptual_hash"]),
                     str(c["by_embedding"]), str(c["removed_rows"]), str(c["rows_after"]),
                     f"{c['images_before']} → {c['images_after']}"])
    return lines + _table(["memory", "rows", "content hash", "dHash (not content)", "embedding (neither hash)",
                           "removed rows", "rows kept", "images"], body)


def _main_zero_shot(results: Sequence[Row], seeds: Sequence[int]) -> list[str]:
    lines = [f"## Zero-shot top-1 on test (%), mean ± std over seeds {list(seeds)}", "",
             "`best` = `text` or `both`, chosen per seed on validation (held-out domain train images). "
             "Paper: CLIP-B/32 → RECO on the closest counterpart (Tab. 1), for direction only.", ""]
    body = []
    for memory in MEMORIES:
        for mode in MODES:
            cells = [_pct(_get(results, dataset=d, metric="top1", mode=mode, memory=memory)) for d in ZERO_SHOT_SETS]
            body.append([memory if mode == "clip" else "", "CLIP" if mode == "clip" else f"RECO `{mode}`", *cells])
    paper = [PAPER_ZERO_SHOT[d] for d in ZERO_SHOT_SETS]
    body.append(["paper", "CLIP-B/32 → RECO", *[f"{p[0]}: {p[1]} → {p[2]}" if p[0] else "–" for p in paper]])
    return lines + _table(["memory", "model", *[LABELS[d] for d in ZERO_SHOT_SETS]], body)


def _main_retrieval(results: Sequence[Row], seeds: Sequence[int]) -> list[str]:
    lines = [f"## Flickr8k test retrieval (%), mean ± std over seeds {list(seeds)}", ""]
    body = []
    for memory in MEMORIES:
        for mode in MODES:
            cells = [_pct(_get(results, dataset="flickr8k", metric=m, mode=mode, memory=memory))
                     for m in RETRIEVAL_METRICS]
            body.append([memory if mode == "clip" else "", "CLIP" if mode == "clip" else f"RECO `{mode}`", *cells])
    body.append(["paper", "Flickr30k R@1", f"{PAPER_RETRIEVAL['i2t_r@1'][1]} → {PAPER_RETRIEVAL['i2t_r@1'][2]}",
                 "", "", f"{PAPER_RETRIEVAL['t2i_r@1'][1]} → {PAPER_RETRIEVAL['t2i_r@1'][2]}", "", ""])
    return lines + _table(["memory", "model", "I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10"],
                          body)


def _variant_table(results: Sequence[Row], plan: ReproPlan, names: Sequence[str], title: str, note: str,
                   paper_col: dict[str, str] | None = None) -> list[str]:
    lines = [f"## {title}", "", note, ""]
    header = ["variant", "seeds", *[f"{LABELS[d]} g+d" for d in ZERO_SHOT_SETS], "Flickr8k T→I R@1 (generic)",
              "Flickr8k I→T R@1 (generic)"]
    if paper_col:
        header.append("paper avg. rel. Δ (Tab. 3)")
    body = []
    clip_cells = [_pct(_get(results, dataset=d, metric="top1", mode="clip", memory=GENERIC_DOMAIN), std=False)
                  for d in ZERO_SHOT_SETS]
    clip_ret = [_pct(_get(results, dataset="flickr8k", metric=m, mode="clip", memory=GENERIC), std=False)
                for m in ("t2i_r@1", "i2t_r@1")]
    body.append(["CLIP (no memory)", "–", *clip_cells, *clip_ret] + (["0"] if paper_col else []))
    seeds = list(plan.ablation_seeds)
    for name in names:
        try:
            variant = plan.variant(name)
        except KeyError:
            continue
        mode = "image" if variant.kind == "knn" else BEST
        cells = []
        for d in ZERO_SHOT_SETS:
            row = _get(results, dataset=d, metric="top1", mode=mode, memory=GENERIC_DOMAIN, variant=name)
            row = _seed_subset(results, row, seeds) if row and name == "paper" else row
            clip = _get(results, dataset=d, metric="top1", mode="clip", memory=GENERIC_DOMAIN)
            cells.append(_pct(row, std=False) + ("" if row is None else f" ({_signed(_delta(row, clip))})"))
        rets = []
        for m in ("t2i_r@1", "i2t_r@1"):
            row = _get(results, dataset="flickr8k", metric=m, mode=BEST, memory=GENERIC, variant=name)
            row = _seed_subset(results, row, seeds) if row and name == "paper" else row
            rets.append(_pct(row, std=False))
        body.append([f"`{name}`: {variant.description}", ",".join(map(str, seeds)), *cells, *rets]
                    + ([paper_col.get(name, "–")] if paper_col else []))
    return lines + _table(header, body)


def _k_table(results: Sequence[Row]) -> list[str]:
    lines = ["## Number of neighbours: trained with k, evaluated with k' ≥ k (generic+domain, `best`, top-1 %)", "",
             "Paper (Fig. 3 right, CUB): k' > k helps; gains saturate after k = 10.", ""]
    body = []
    variants = sorted({(r["variant"], r["k"]) for r in results if r["variant"] in ("paper", "k=1", "k=5", "k=20")},
                      key=lambda x: x[1])
    for variant, k in variants:
        k_inf = sorted({r["k_infer"] for r in results if r["variant"] == variant})
        for ki in k_inf:
            cells = [_pct(_get(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant=variant,
                               k_infer=ki), std=False) for d in ZERO_SHOT_SETS]
            body.append([str(k), str(ki), *cells])
    return lines + _table(["k (train)", "k' (inference)", *[LABELS[d] for d in ZERO_SHOT_SETS]], body)


def _diagnostics(meta: dict[str, Any]) -> list[str]:
    diag = meta.get("diagnostics", {})
    lines = ["## Measured reasons", ""]
    if diag.get("purity"):
        lines += ["### What the memory can tell (generic+domain memory, k = 10)", "",
                  "Share of the 10 neighbours that are domain pairs of the query's own class: test images by "
                  "image→image (uni) and image→text (cross) search; class prompts by text→text (uni) and "
                  "text→image (cross) search.", ""]
        caption = {r["dataset"]: r for r in diag.get("purity_caption_like_prompts", [])}
        body = [[LABELS[r["dataset"]], f"{100 * r['image_uni_search']:.1f}", f"{100 * r['image_cross_search']:.1f}",
                 f"{100 * r.get('prompt_uni_search', float('nan')):.1f}",
                 f"{100 * r.get('prompt_cross_search', float('nan')):.1f}",
                 f"{100 * caption.get(r['dataset'], {}).get('prompt_uni_search', float('nan')):.1f}"]
                for r in diag["purity"]]
        lines += _table(["set", "image uni", "image cross", "prompt uni", "prompt cross",
                         "prompt uni, caption-like prompts"], body)
    if diag.get("cone"):
        c = diag["cone"]
        lines += ["### How spread out the encoder's embeddings are (generic memory)", "",
                  f"Mean cosine of random distinct pairs: image–image {c['image_image']:.3f}, text–text "
                  f"{c['text_text']:.3f}, image–text unpaired {c['image_text_unpaired']:.3f}; image–text of true "
                  f"pairs {c['image_text_paired']:.3f}. The closer image–image is to 1, the smaller the part of a "
                  "neighbour's image embedding that tells it apart from any other image.", ""]
    if diag.get("base_overfit"):
        lines += ["### The frozen base on pairs it was trained on vs unseen pairs (CLIP, no memory)", "",
                  "Recall falls with the number of images n searched; compare rows of similar n.", ""]
        lines += _table(["Flickr8k images", "n", "I→T R@1", "T→I R@1", "I→T R@10", "T→I R@10"],
                        [[r["images"], str(r["n"]), f"{100 * r['i2t_r@1']:.1f}", f"{100 * r['t2i_r@1']:.1f}",
                          f"{100 * r['i2t_r@10']:.1f}", f"{100 * r['t2i_r@10']:.1f}"] for r in diag["base_overfit"]])
    if diag.get("attention_by_variant"):
        lines += ["### How much each trained fusion listens to its neighbours", "",
                  "Mean attention of the query token on its neighbours (1 − attention on itself), seed "
                  f"{min(meta['plan']['ablation_seeds'])}, k' = k, test queries.", ""]
        att = diag["attention_by_variant"]
        queries = list(dict.fromkeys(r["queries"] for rows in att.values() for r in rows))
        body = []
        for name, rows in att.items():
            for memory in MEMORIES:
                vals = {r["queries"]: r["neighbour_attention"] for r in rows if r["memory"] == memory}
                body.append([f"`{name}`", memory, *[f"{vals[q]:.2f}" if q in vals else "–" for q in queries]])
        lines += _table(["variant", "memory", *queries], body)
    if diag.get("training_leak"):
        lines += ["### Self-exclusion during training", "",
                  "Share of Flickr8k training captions whose own image is among their 10 text→text neighbours "
                  "(the answer handed to the fusion; never the case at test time):", ""]
        lines += _table(["policy", "own image among neighbours"],
                        [[r["self_exclusion"], f"{100 * r['own_image_in_neighbours']:.1f} %"]
                         for r in diag["training_leak"]])
    return lines


def _targets(results: Sequence[Row], plan: ReproPlan) -> tuple[list[str], list[str]]:
    """Target checks of issue 5 and sign agreement with the paper, as sentences built from the numbers."""
    checks: list[tuple[str, bool | None, str]] = []

    def gain(ds: str, memory: str, variant: str = "paper", mode: str = BEST, metric: str = "top1") -> float | None:
        return _delta(_get(results, dataset=ds, metric=metric, mode=mode, memory=memory, variant=variant),
                      _get(results, dataset=ds, metric=metric, mode="clip", memory=memory))

    for ds, need in (("flowers12", 5.0), ("imagenette", 5.0), ("cub100", 3.0)):
        g = gain(ds, GENERIC_DOMAIN)
        checks.append((f"RECO beats CLIP by ≥ {need:.0f} points on {LABELS[ds]} (generic+domain)",
                       None if g is None else g >= need, f"{_signed(g)} points"))
    g = gain("cifar10", GENERIC_DOMAIN)
    checks.append(("no loss on CIFAR-10 (generic+domain)", None if g is None else g >= 0, f"{_signed(g)} points"))
    for ds in ZERO_SHOT_SETS:
        g = gain(ds, GENERIC)
        checks.append((f"no loss with the generic memory on {LABELS[ds]}", None if g is None else g >= 0,
                       f"{_signed(g)} points"))
    for metric in ("i2t_r@1", "t2i_r@1"):
        g = gain("flickr8k", GENERIC, metric=metric)
        checks.append((f"no loss with the generic memory on Flickr8k {metric}", None if g is None else g >= 0,
                       f"{_signed(g)} points"))
    for baseline, mode in (("mean-fusion", BEST), ("knn-vote", "image")):
        wins = []
        for ds in DOMAIN_SETS:
            a = _get(results, dataset=ds, metric="top1", mode=BEST, memory=GENERIC_DOMAIN)
            b = _get(results, dataset=ds, metric="top1", mode=mode, memory=GENERIC_DOMAIN, variant=baseline)
            wins.append(_delta(a, b))
        ok = None if any(w is None for w in wins) else all(w > 0 for w in wins)  # type: ignore[operator]
        checks.append((f"learned fusion beats {baseline} on every domain set (generic+domain)", ok,
                       ", ".join(f"{LABELS[d]} {_signed(w)}" for d, w in zip(DOMAIN_SETS, wins, strict=True))))
    combos = ["paper", "search-cross/fusion-cross", "search-uni/fusion-uni", "search-cross/fusion-uni"]
    means = {}
    for c in combos:
        vals = [_get(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant=c)
                for d in ZERO_SHOT_SETS]
        if c == "paper":
            vals = [_seed_subset(results, v, plan.ablation_seeds) if v else None for v in vals]
        if all(v is not None for v in vals):
            means[c] = sum(v["value"] for v in vals if v) / len(vals)
    if len(means) == len(combos):
        best = max(means, key=lambda c: means[c])
        checks.append(("uni-modal search + cross-modal fusion is the best of the four combinations",
                       best == "paper", "mean top-1 over the four sets: "
                       + ", ".join(f"{c} {100 * m:.1f}" for c, m in means.items())))
    lines = ["## Targets of issue 5", ""]
    lines += _table(["target", "met", "measured"],
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
    mf = [_delta(_get(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant="mean-fusion"),
                 _get(results, dataset=d, metric="top1", mode="clip", memory=GENERIC_DOMAIN)) for d in ZERO_SHOT_SETS]
    if all(m is not None for m in mf):
        signs.append("- Mean fusion vs CLIP (paper: worse than CLIP everywhere, −21.7 % relative): ours "
                     + ", ".join(f"{LABELS[d]} {_signed(m)}" for d, m in zip(ZERO_SHOT_SETS, mf, strict=True))
                     + (" — same sign." if all(m < 0 for m in mf if m is not None) else " — **not** the paper's "
                        "sign on every set: with a class-captioned domain memory the neighbours' captions alone "
                        "carry the label (see the purity table)."))
    return lines, signs + [""]


def write_markdown(path: Path, results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any],
                   plots: Sequence[Path]) -> None:
    main_seeds = plan.seeds_of(plan.variant(PAPER))
    default = meta.get("default_variant", PAPER)
    lines = ["# Miniature reproduction of RECO", "",
             f"Generated by `{meta['command']}` in {meta['seconds'] / 60:.1f} min ({meta['cpu_threads']} CPU "
             f"threads). Encoder (frozen): `{meta['encoder_id']}`. Every number below comes from "
             "`docs/reproduction.json` of that run; every conclusion is computed from those numbers.", "",
             "Protocol: the fusion is trained on Flickr8k train pairs against a Flickr8k-train memory "
             f"({plan.epochs} epochs, batch {plan.batch_size}, AdamW lr {plan.lr}, wd {plan.weight_decay}, cosine with "
             f"{plan.warmup_steps} warm-up steps, k = 10, d = {meta.get('dim', '?')}). It is evaluated with (a) "
             "that `generic` memory, (b) `generic+domain` = (a) + the captioned train rows of CUB-100, "
             "Flowers-12 and Imagenette, added after training (1 in "
             f"{plan.validation_every} of those images held out as validation, never in the memory), and (c) "
             "`mismatched` = for each domain set, (a) + the other two domains' rows. Modes, fallback thresholds, "
             "softmax scales and the default recipe are chosen on validation (Flickr8k val, the held-out domain "
             f"images), never on test. Seeds: the paper recipe and the default recipe `{default}` {main_seeds}; "
             f"every other variant {list(plan.ablation_seeds)}"
             + (" (fewer, for the time budget)." if len(plan.ablation_seeds) < len(main_seeds) else "."), ""]
    if plan.limit is not None:
        lines += [f"**Quick run**: at most {plan.limit} images per split and dataset — a smoke test, not a result.", ""]
    lines += _goals(results, plan, meta)
    lines += _misses(results, meta)
    lines += _selection_section(meta)
    lines += _default_zero_shot(results, default)
    lines += _default_retrieval(results, default)
    lines += _ece_section(results, default, meta)
    lines += _levers_table(results, plan, meta)
    lines += _fallback_section(results, plan, meta)
    lines += _near_duplicate_section(meta)
    _, signs = _targets(results, plan)
    lines += signs
    lines += _variant_table(results, plan, ["paper", "search-cross/fusion-cross", "search-uni/fusion-uni",
                                            "search-cross/fusion-uni", "mean-fusion", "knn-vote"],
                            "Ablation: search × fusion, mean fusion, kNN vote",
                            "Top-1 % on test with the generic+domain memory (Δ vs CLIP in brackets), Flickr8k R@1 "
                            "with the generic memory; `best` mode except the kNN vote (image side).", PAPER_ABLATION)
    if any(v.group == "k" for v in plan.variants):
        lines += _k_table(results)
    for group, title, note in (
            ("options", "Issue 5's options: each with and without", "`paper` on the same seeds is the 'without'."),
            ("exclusion", "Self-exclusion policy during training", "`paper` excludes the query's own image.")):
        names = [v.name for v in plan.variants if v.group == group]
        if names:
            lines += _variant_table(results, plan, ["paper", *names], title, note)
    lines += _why(results, plan, meta)
    lines += _diagnostics(meta)
    if meta.get("training"):
        lines += ["## Training runs", ""]
        lines += _table(["variant", "seed", "loss first → last epoch", "temperature", "seconds",
                         "gate tanh (img, txt)"],
                        [[t["variant"], str(t["seed"]), f"{t['initial_loss']:.3f} → {t['final_loss']:.3f}",
                          f"{t['temperature']:.4f}", f"{t['seconds']:.0f}",
                          ", ".join(f"{g:.2f}" for g in t.get("gate_tanh", [])) or "–"] for t in meta["training"]])
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.parent.name}/{p.name})" for p in plots] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_report(out_dir: Path, rows: list[Row], plan: ReproPlan, meta: dict[str, Any], *, plots: bool = True
                 ) -> tuple[Path, Path]:
    """``reproduction.json`` and ``reproduction.md`` (+ ``reproduction/*.png``) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = build_results(rows)
    json_path = out_dir / "reproduction.json"
    json_path.write_text(json.dumps({"results": results, **meta, "plan": plan.model_dump(mode="json")}, indent=1)
                         + "\n", encoding="utf-8")
    written = write_plots(results, plan, out_dir / "reproduction", meta.get("default_variant", PAPER)) if plots else []
    md_path = out_dir / "reproduction.md"
    write_markdown(md_path, results, plan, {**meta, "plan": plan.model_dump(mode="json")}, written)
    return json_path, md_path


def render_from_json(out_dir: Path) -> Path:
    """Re-render ``reproduction.md`` and the plots from an existing ``reproduction.json`` (no recomputation)."""
    data = json.loads((out_dir / "reproduction.json").read_text(encoding="utf-8"))
    plan = ReproPlan(**data["plan"])
    meta = {k: v for k, v in data.items() if k not in ("results", "plan")}
    written = write_plots(data["results"], plan, out_dir / "reproduction", data.get("default_variant", PAPER))
    md_path = out_dir / "reproduction.md"
    write_markdown(md_path, data["results"], plan, {**meta, "plan": data["plan"]}, written)
    return md_path


def _why(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    """The measured chain of reasons behind the learned fusion's result, as sentences from the numbers."""
    diag = meta.get("diagnostics", {})
    lines = ["## Why: the measured chain", ""]
    overfit = {r["images"]: r for r in diag.get("base_overfit", [])}
    seen, unseen = overfit.get("train (seen by the base)"), overfit.get("test (unseen)")
    if seen and unseen:
        lines.append(f"1. **The fusion's training pairs are the base's own training pairs.** Without any memory, the "
                     f"frozen base finds the right caption at rank 1 for {100 * seen['i2t_r@1']:.0f} % of Flickr8k "
                     f"train images but for {100 * unseen['i2t_r@1']:.0f} % of unseen test images (similar n). "
                     "During fusion training the query alone therefore nearly solves the contrastive task; "
                     "neighbours (which exclude the query's own image) add little.")
    att = diag.get("attention_by_variant", {}).get("paper")
    if att:
        k = plan.variant("paper").k
        img = [r["neighbour_attention"] for r in att if r["memory"] == GENERIC_DOMAIN and "images" in r["queries"]]
        cap = [r["neighbour_attention"] for r in att if "captions" in r["queries"]]
        lines.append(f"2. **So the trained fusion listens little to its neighbours:** the query token puts "
                     f"{sum(img) / max(1, len(img)):.2f} of its attention on the {k} neighbours of a test image and "
                     f"{sum(cap) / max(1, len(cap)):.2f} for a test caption, where mean fusion gives them "
                     f"{k / (k + 1):.2f}.")
    purity = diag.get("purity", [])
    if purity:
        lines.append("3. **With the domain pairs, the memory knows the answer on the text side:** "
                     + ", ".join(f"{LABELS[r['dataset']]}: {100 * r.get('prompt_uni_search', 0):.0f} % of a class "
                                 f"prompt's text→text neighbours are its own class (image→image: "
                                 f"{100 * r['image_uni_search']:.0f} %, "
                                 f"image→text: {100 * r['image_cross_search']:.1f} %)"
                                 for r in purity)
                     + ". The frozen sentence-encoder text tower makes text→text search nearly exact; the weak image "
                       "tower makes image search noisy, and cross-modal search almost useless.")
    gaps: list[tuple[str, float]] = []
    for ds in DOMAIN_SETS:
        gap = _delta(_get(results, dataset=ds, metric="top1", mode=BEST, memory=GENERIC_DOMAIN),
                     _get(results, dataset=ds, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant="mean-fusion"))
        if gap is not None:
            gaps.append((LABELS[ds], gap))
    if gaps:
        lead = ("4. Hence, when neighbours are right, weighting them with the trust learned in training loses "
                "against weighting them fully" if all(g < 0 for _, g in gaps) else
                "4. Learned vs mean fusion")
        lines.append(lead + ": learned minus mean fusion (top-1 points, generic+domain) "
                     + ", ".join(f"{name} {g:+.1f}" for name, g in gaps) + ".")
    ranked = []
    for v in plan.variants:
        if v.group not in ("options", "exclusion"):
            continue
        deltas = [_option_delta(results, plan, v.name, ds) for ds in DOMAIN_SETS]
        if all(d is not None for d in deltas):
            ranked.append((sum(d for d in deltas if d is not None) / len(deltas), v.name))
    if ranked:
        ranked.sort(reverse=True)
        lines.append("5. Options, by mean top-1 change over the three domain sets vs the paper recipe on the same "
                     "seed: " + ", ".join(f"`{n}` {d:+.1f}" for d, n in ranked) + ".")
    unseen_run = next((t for t in meta.get("training", []) if t["variant"] == "unseen-pairs"), None)
    paper_run = next((t for t in meta.get("training", []) if t["variant"] == "paper"), None)
    if unseen_run and paper_run:
        lines.append(f"6. Training on pairs the base never saw removes cause 1 but leaves {unseen_run['pairs']} pairs "
                     f"(vs {paper_run['pairs']}); its final training loss {unseen_run['final_loss']:.2f} vs "
                     f"{paper_run['final_loss']:.2f} for the paper recipe"
                     + (" — it fits its few pairs instead." if unseen_run["final_loss"] < paper_run["final_loss"]
                        else "."))
    return lines + [""]


# --- issue 16: the default recipe, mismatched memory, calibration, fallback, goals -------------------------
def _memories_of(ds: str) -> tuple[str, ...]:
    return ALL_MEMORIES if ds in DOMAIN_SETS else MEMORIES


def _selection_section(meta: dict[str, Any]) -> list[str]:
    default = meta.get("default_variant", PAPER)
    lines = [f"## The default recipe: `{default}`", "",
             "Chosen on validation only: the trained candidate with the highest validation score = mean of (zero-shot "
             "top-1 on the held-out domain train images, every memory) and (Flickr8k val R@1 both directions, "
             "generic and generic+domain), each in the mode chosen on validation. `reco demo`, `reco predict`, "
             "`reco eval` and the UI use the fusion of this recipe committed in `app/fusion/checkpoints/`.", ""]
    body = [[f"`{s['variant']}`" + (" **(default)**" if s["variant"] == default else ""),
             f"{100 * s['validation_score']:.2f}"] for s in sorted(meta.get("selection", []),
                                                                 key=lambda s: -s["validation_score"])]
    return lines + _table(["candidate", "validation score"], body)


def _default_zero_shot(results: Sequence[Row], default: str) -> list[str]:
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
                row = _get(results, dataset=d, metric="top1", mode=mode, memory=memory, variant=variant)
                cells.append(_pct(row) + (f" [{','.join(map(str, row['seeds']))}]" if row and i == 1 else ""))
            body.append([memory if i == 0 else "", label, *cells])
    return lines + _table(["memory", "model", *[LABELS[d] for d in ZERO_SHOT_SETS]], body)


def _default_retrieval(results: Sequence[Row], default: str) -> list[str]:
    lines = ["## Flickr8k test retrieval R@1 (%)", ""]
    body = []
    for memory in MEMORIES:
        for label, variant, mode in (("CLIP", default, "clip"), (f"RECO `{default}` (default)", default, BEST),
                                     ("RECO `paper`", PAPER, BEST), ("mean fusion", "mean-fusion", BEST)):
            body.append([memory, label, *[_pct(_get(results, dataset="flickr8k", metric=m, mode=mode, memory=memory,
                                                    variant=variant)) for m in ("i2t_r@1", "t2i_r@1")]])
    return lines + _table(["memory", "model", "I→T R@1", "T→I R@1"], body)


def _ece_section(results: Sequence[Row], default: str, meta: dict[str, Any]) -> list[str]:
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
            clip100 = _get(results, dataset=d, metric="ece@100", mode="clip", memory=memory, variant=default)
            clip = _get(results, dataset=d, metric="ece", mode="clip", memory=memory, variant=default)
            reco = _get(results, dataset=d, metric="ece", mode=BEST, memory=memory, variant=default)
            reco100 = _get(results, dataset=d, metric="ece@100", mode=BEST, memory=memory, variant=default)
            paper = _get(results, dataset=d, metric="ece", mode=BEST, memory=memory, variant=PAPER)
            body.append([memory, LABELS[d], _pct(clip100), _pct(clip), _pct(reco100), _pct(reco), _pct(paper)])
    return lines + _table(["memory", "set", "CLIP @100", "CLIP", f"RECO `{default}` @100", f"RECO `{default}`",
                           "RECO `paper`"], body)


def _levers_table(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    names = [PAPER, *[v.name for v in plan.variants if v.group == "levers"], "mean-fusion"]
    selection = {s["variant"]: s["validation_score"] for s in meta.get("selection", [])}
    lines = ["## Issue 16's levers, each with and without", "",
             "Top-1 % on test, mode `best`, seeds " + str(list(plan.ablation_seeds)) + " (Δ vs CLIP in brackets); "
             "`+fallback` = the same fusion with the validation-chosen fallback toward CLIP; `val` = the "
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
            row = _get(results, dataset=d, metric="top1", mode=BEST, memory=memory, variant=name)
            row = _seed_subset(results, row, plan.ablation_seeds) if row else None
            clip = _get(results, dataset=d, metric="top1", mode="clip", memory=memory, variant=name)
            cells.append(_pct(row, std=False) + ("" if row is None else f" ({_signed(_delta(row, clip))})"))
        ret = [_seed_subset(results, r, plan.ablation_seeds) if r else None
               for r in (_get(results, dataset="flickr8k", metric=m, mode=BEST, memory=GENERIC, variant=name)
                         for m in ("i2t_r@1", "t2i_r@1"))]
        body.append([f"`{name}`", *cells, " / ".join(_pct(r, std=False) for r in ret),
                     f"{100 * selection[name]:.2f}" if name in selection else "–"])
    return lines + _table(header, body)


def _fallback_section(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
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
                a = _get(results, dataset=d, metric="image_queries", mode="-", memory=memory, variant=name)
                b = _get(results, dataset=d, metric=second, mode="-", memory=memory, variant=name)
                cells.append(f"{_pct(a, std=False)} / {_pct(b, std=False)}")
            body.append([f"`{name}`", memory, *cells])
    return lines + _table(["variant", "memory", *[LABELS[d] for d in (*ZERO_SHOT_SETS, "flickr8k")]], body)


def _goals(results: Sequence[Row], plan: ReproPlan, meta: dict[str, Any]) -> list[str]:
    """Issue 16's goals for the default recipe, each met or not, computed from the numbers."""
    default = meta.get("default_variant", PAPER)
    checks: list[tuple[str, bool | None, str]] = []

    def top1(ds: str, memory: str, variant: str, mode: str = BEST, metric: str = "top1") -> Row | None:
        return _get(results, dataset=ds, metric=metric, mode=mode, memory=memory, variant=variant)

    margins = []
    for ds in DOMAIN_SETS:
        reco = top1(ds, GENERIC_DOMAIN, default)
        mean = top1(ds, GENERIC_DOMAIN, "mean-fusion")
        knn = top1(ds, GENERIC_DOMAIN, "knn-vote", "image")
        a, b = _delta(reco, mean), _delta(reco, knn)
        ok = None if a is None or b is None else (a >= 0 and b >= 0)
        margins.append(None if a is None or b is None else min(a, b))
        checks.append((f"{LABELS[ds]} (generic+domain): default RECO ≥ mean fusion and ≥ kNN vote", ok,
                       f"RECO {_pct(reco)}; vs mean fusion {_signed(a)}, vs kNN vote {_signed(b)} points"))
    if all(m is not None for m in margins):
        checks.append(("stretch: ≥ 2 points above the better of the two on each", all(m >= 2 for m in margins  # type: ignore[operator]
                                                                                       ), ", ".join(
            f"{LABELS[d]} {_signed(m)}" for d, m in zip(DOMAIN_SETS, margins, strict=True))))
    no_loss = [("cifar10", GENERIC_DOMAIN, "top1")] + [(d, GENERIC, "top1") for d in ZERO_SHOT_SETS] + [
        ("flickr8k", GENERIC, m) for m in ("i2t_r@1", "t2i_r@1")] + [(d, MISMATCHED, "top1") for d in DOMAIN_SETS]
    for ds, memory, metric in no_loss:
        reco = top1(ds, memory, default, metric=metric)
        clip = top1(ds, memory, default, "clip", metric)
        d = _delta(reco, clip)
        checks.append((f"no loss: {LABELS[ds]} {metric if ds == 'flickr8k' else ''} ({memory}) RECO ≥ CLIP − 0.5",
                       None if d is None else d >= -100 * NO_LOSS_MARGIN, f"{_signed(d)} points"))
    for metric, before in FLICKR_R1_BEFORE.items():
        reco = top1("flickr8k", GENERIC, default, metric=metric)
        checks.append((f"Flickr8k {metric} (generic) ≥ {100 * before:.1f} (the paper recipe before)",
                       None if reco is None else reco["value"] >= before - 1e-9, _pct(reco)))
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
                worse.append(f"{LABELS[ds]} {memory} (RECO {_pct(reco, std=False)} vs CLIP {_pct(clip, std=False)}, "
                             f"@100 {_pct(clip100, std=False)})")
    checks.append(("ECE of RECO ≤ that of CLIP (own fitted scale and @100) on every set and memory",
                   None if n == 0 else not worse, "; ".join(worse) if worse else f"all {n} sets"))
    combos = [PAPER, "search-cross/fusion-cross", "search-uni/fusion-uni", "search-cross/fusion-uni"]
    means = {}
    for c in combos:
        vals = [_get(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant=c)
                for d in ZERO_SHOT_SETS]
        vals = [_seed_subset(results, v, plan.ablation_seeds) if v else None for v in vals]
        if all(v is not None for v in vals):
            means[c] = sum(v["value"] for v in vals if v) / len(vals)
    if len(means) == len(combos):
        best = max(means, key=lambda c: means[c])
        checks.append(("uni-modal search + cross-modal fusion the best of the four (learned fusion, paper recipe)",
                       best == PAPER, "mean top-1 over the four sets (g+d): "
                       + ", ".join(f"{c} {100 * m:.1f}" for c, m in means.items())))
    minutes = meta.get("seconds", 0) / 60
    checks.append((f"`reco reproduce` within {TIME_BUDGET_MIN:.0f} minutes here", minutes <= TIME_BUDGET_MIN,
                   f"{minutes:.1f} min"))
    lines = [f"## Goals of issue 16 (default recipe `{default}`, test split, seeds as in the tables)", ""]
    return lines + _table(["goal", "met", "measured"],
                          [[t, "–" if ok is None else ("yes" if ok else "**no**"), m] for t, ok, m in checks])


def _misses(results: Sequence[Row], meta: dict[str, Any]) -> list[str]:
    """Measured facts behind the goals, each a sentence built from the run's numbers."""
    from app.zeroshot import SCALE_GRID

    default = meta.get("default_variant", PAPER)
    source = default.removesuffix("+fallback")
    lines = ["### What the numbers say about the misses", ""]
    att = meta.get("diagnostics", {}).get("attention_by_variant", {}).get(source)
    if att:
        img = [r["neighbour_attention"] for r in att if r["memory"] == GENERIC_DOMAIN and "images" in r["queries"]]
        if img:
            share = sum(img) / len(img)
            lines.append(f"- Trust in the neighbours: the default's fusion puts {share:.2f} of the query's "
                         "attention on its neighbours (domain test images, generic+domain), mean fusion 0.91; learned "
                         "minus mean fusion on the domain sets: " + ", ".join(
                             f"{LABELS[d]} {_signed(_delta(_get(results, dataset=d, metric='top1', mode=BEST, memory=GENERIC_DOMAIN, variant=default), _get(results, dataset=d, metric='top1', mode=BEST, memory=GENERIC_DOMAIN, variant='mean-fusion')))}"  # noqa: E501
                             for d in DOMAIN_SETS) + ".")
    cal = meta.get("calibration", {})
    key = next((k for k in cal if k.startswith(f"{default}/")), None)
    if key:
        scales = cal[key]["softmax_scale"]
        floor = [m for m, v in scales.items() if v <= min(SCALE_GRID)]
        lines.append("- Calibration: one softmax scale per mode is fitted over the validation images of all three "
                     "memories together, whose accuracies differ by an order of magnitude (default, CUB-100 "
                     "top-1: " + ", ".join(
                         f"{m} {_pct(_get(results, dataset='cub100', metric='top1', mode=BEST, memory=m, variant=default, split='test'), std=False)}"  # noqa: E501
                         for m in ALL_MEMORIES) + " on test); fitted scales " + ", ".join(
                         f"{m} {v:g}" for m, v in scales.items())
                     + (f" — {', '.join(floor)} at the grid's floor ({min(SCALE_GRID):g}), so lower scales were "
                        "not tried" if floor else "") + ".")
        fb = cal[key].get("fallback")
        cifar = _get(results, dataset="cifar10", metric="image_queries", mode="-", memory=GENERIC_DOMAIN,
                     variant=default)
        if fb and cifar:
            lines.append(f"- Do no harm on CIFAR-10 with the domain pairs: only {_pct(cifar, std=False)} % of its test "
                         f"images fall below the image threshold {fb.get('image', float('nan')):.3f}: the rest are "
                         "refined although the memory holds none of their classes.")
    for metric in ("i2t_r@1", "t2i_r@1"):
        d = _delta(_get(results, dataset="flickr8k", metric=metric, mode=BEST, memory=GENERIC, variant=default),
                   _get(results, dataset="flickr8k", metric=metric, mode=BEST, memory=GENERIC, variant=PAPER))
        if d is not None:
            lines.append(f"- Flickr8k {metric}: the default minus the paper recipe on the same seed {_signed(d)} "
                         "points.")
    return lines + [""]
