"""Sections of ``docs/reproduction.md`` for the paper's tables: near-duplicates, ablations, k, measured reasons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from programs.reproduce.aggregate import BEST
from programs.reproduce.plan import GENERIC, GENERIC_DOMAIN, MEMORIES, ZERO_SHOT_SETS, ReproPlan
from programs.reproduce.readout import LABELS, Row, delta, get_row, md_table, pct, seed_subset, signed


def near_duplicate_section(meta: dict[str, Any]) -> list[str]:
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
    return lines + md_table(["memory", "rows", "content hash", "dHash (not content)", "embedding (neither hash)",
                             "removed rows", "rows kept", "images"], body)


def variant_table(results: Sequence[Row], plan: ReproPlan, names: Sequence[str], title: str, note: str,
                  paper_col: dict[str, str] | None = None) -> list[str]:
    lines = [f"## {title}", "", note, ""]
    header = ["variant", "seeds", *[f"{LABELS[d]} g+d" for d in ZERO_SHOT_SETS], "Flickr8k T→I R@1 (generic)",
              "Flickr8k I→T R@1 (generic)"]
    if paper_col:
        header.append("paper avg. rel. Δ (Tab. 3)")
    body = []
    clip_cells = [pct(get_row(results, dataset=d, metric="top1", mode="clip", memory=GENERIC_DOMAIN), std=False)
                  for d in ZERO_SHOT_SETS]
    clip_ret = [pct(get_row(results, dataset="flickr8k", metric=m, mode="clip", memory=GENERIC), std=False)
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
            row = get_row(results, dataset=d, metric="top1", mode=mode, memory=GENERIC_DOMAIN, variant=name)
            row = seed_subset(results, row, seeds) if row and name == "paper" else row
            clip = get_row(results, dataset=d, metric="top1", mode="clip", memory=GENERIC_DOMAIN)
            cells.append(pct(row, std=False) + ("" if row is None else f" ({signed(delta(row, clip))})"))
        rets = []
        for m in ("t2i_r@1", "i2t_r@1"):
            row = get_row(results, dataset="flickr8k", metric=m, mode=BEST, memory=GENERIC, variant=name)
            row = seed_subset(results, row, seeds) if row and name == "paper" else row
            rets.append(pct(row, std=False))
        body.append([f"`{name}`: {variant.description}", ",".join(map(str, seeds)), *cells, *rets]
                    + ([paper_col.get(name, "–")] if paper_col else []))
    return lines + md_table(header, body)


def k_table(results: Sequence[Row]) -> list[str]:
    lines = ["## Number of neighbours: trained with k, evaluated with k' ≥ k (generic+domain, `best`, top-1 %)", "",
             "Paper (Fig. 3 right, CUB): k' > k helps; gains saturate after k = 10.", ""]
    body = []
    variants = sorted({(r["variant"], r["k"]) for r in results if r["variant"] in ("paper", "k=1", "k=5", "k=20")},
                      key=lambda x: x[1])
    for variant, k in variants:
        k_inf = sorted({r["k_infer"] for r in results if r["variant"] == variant})
        for ki in k_inf:
            cells = [pct(get_row(results, dataset=d, metric="top1", mode=BEST, memory=GENERIC_DOMAIN, variant=variant,
                                 k_infer=ki), std=False) for d in ZERO_SHOT_SETS]
            body.append([str(k), str(ki), *cells])
    return lines + md_table(["k (train)", "k' (inference)", *[LABELS[d] for d in ZERO_SHOT_SETS]], body)


def diagnostics_section(meta: dict[str, Any]) -> list[str]:
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
        lines += md_table(["set", "image uni", "image cross", "prompt uni", "prompt cross",
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
        lines += md_table(["Flickr8k images", "n", "I→T R@1", "T→I R@1", "I→T R@10", "T→I R@10"],
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
        lines += md_table(["variant", "memory", *queries], body)
    if diag.get("training_leak"):
        lines += ["### Self-exclusion during training", "",
                  "Share of Flickr8k training captions whose own image is among their 10 text→text neighbours "
                  "(the answer handed to the fusion; never the case at test time):", ""]
        lines += md_table(["policy", "own image among neighbours"],
                          [[r["self_exclusion"], f"{100 * r['own_image_in_neighbours']:.1f} %"]
                           for r in diag["training_leak"]])
    return lines
