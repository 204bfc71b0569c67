"""The PNG plots of ``docs/reproduction/``: zero-shot top-1, k and k', and each option's gain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from programs.reproduce.aggregate import BEST
from programs.reproduce.plan import DOMAIN_SETS, GENERIC, GENERIC_DOMAIN, PAPER, ZERO_SHOT_SETS, ReproPlan
from programs.reproduce.readout import LABELS, Row, get_row, option_delta


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
            row = get_row(results, dataset=ds, metric="top1", mode=mode, memory=memory, variant=variant)
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
        clip = get_row(results, dataset=ds, metric="top1", mode="clip", memory=GENERIC_DOMAIN)
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
            deltas = [option_delta(results, plan, name, ds) or 0.0 for name in options]
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
