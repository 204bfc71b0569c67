"""``docs/performance.md`` from the benchmark results: the goals, tables, PNG plots (matplotlib, Agg).

Inputs under ``docs/performance/``: ``results.json`` (written by ``reco bench all``), ``peer.json``
(``reco bench ingest --peer``, when it was run), ``precision.json`` (``reco bench precision``) and
``optimisations.md`` (hand-written notes on the fast paths with their measured before/after, included as
it is). Everything else is generated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from programs.bench.common import describe_machine

ASSETS = "performance"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _row(rows: Sequence[dict[str, Any]], size: int, backend: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["size"] == size and r["backend"] == backend and r["batch"] == batch), None)


def _run(runs: Sequence[dict[str, Any]], size: int, backend: str) -> dict[str, Any]:
    return next((r for r in runs if r["size"] == size and r["backend"] == backend), {})


def goal_rows(
    res: dict[str, Any], peer: dict[str, Any] | None, stretch: dict[str, Any] | None = None
) -> list[list[Any]]:
    """(goal, measured, met) per goal of the issue, from the measured figures only."""
    out: list[list[Any]] = []
    ing = res.get("ingest", {}).get("result")
    if ing:
        out.append(["ingest pipeline ≥ 0.9 × encoder-only", f"{ing['ratio']:.3f} ({ing['pipeline_img_s']:.2f} vs "
                    f"{ing['encoder_only_img_s']:.2f} img/s, n={ing['n']})", _met(ing["ratio"] >= 0.9)])
    if peer:
        spread = peer.get("details", {}).get("spread", {}).get("ratio", {})
        loads = [r.get("reco_load_start", r.get("load_avg_1m", ["?"]))[0] for r in peer.get("details", {})
                 .get("rounds", [])]
        out.append(["`reco ingest` ≥ 1.5 × peer (whole commands)", f"{peer['ratio']:.2f}× ({peer['reco_img_s']:.2f} "
                    f"vs {peer['peer_img_s']:.2f} img/s, n={peer['n']}, median of {len(loads)} rounds, per-round "
                    f"{spread.get('min', '?')}–{spread.get('max', '?')}; load {loads})", _met(peer["ratio"] >= 1.5)])
        if peer.get("ratio_vs_encoder_fp32"):
            out.append(["`reco ingest` ≥ 1.5 × our fp32 encoder-only", f"{peer['ratio_vs_encoder_fp32']:.2f}× "
                        f"({peer['reco_img_s']:.2f} vs {peer['encoder_fp32_img_s']:.2f} img/s; reco ran "
                        f"{peer.get('reco_runtime')})", _met(peer["ratio_vs_encoder_fp32"] >= 1.5)])
    else:
        out.append(["`reco ingest` ≥ 1.5 × peer", "not in this run: `reco bench ingest --peer`", "—"])
    out += _search_goals(res.get("search", {})) + [_stretch_goal(stretch)]
    ref = res.get("refine", {}).get("result")
    if ref:
        out.append([f"RECO adds ≤ 25 % to CLIP prediction ({ref['memory_size']:,} memory)",
                    f"+{ref['overhead'] * 100:.1f} % (p50 {ref['reco_p50_ms']:.0f} vs {ref['clip_p50_ms']:.0f} ms)",
                    _met(ref["overhead"] <= 0.25)])
    train = res.get("train", {})
    if train.get("result"):
        d = train.get("details", {})
        out.append(["training: neighbours precomputed in one batched pass",
                    f"{train['result']['samples_per_s']:.0f} samples/s; pass {d.get('precompute_neighbours_s')} s "
                    f"once vs ~{d.get('per_step_retrieval_s_estimate')} s if repeated per epoch", "yes"])
    gpu = res.get("gpu", {})
    out.append(["GPU ≥ 2,500 img/s (ViT-B-32 fp16)", gpu.get("status", "not run") if gpu.get("status") != "ok"
                else f"{gpu['end_to_end_img_s']:.0f} img/s", _met(gpu.get("vs_anchor", 0) >= 1)
                if gpu.get("status") == "ok" else "—"])
    return out


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _search_goals(search: dict[str, Any]) -> list[list[Any]]:
    rows, runs = search.get("result", {}).get("results", []), search.get("details", {}).get("runs", [])
    out: list[list[Any]] = []
    for batch in (1, 64):
        exact, local = _row(rows, 100_000, "exact", batch), _row(rows, 100_000, "qdrant-local", batch)
        if exact and local:
            ratio = exact["qps"] / local["qps"]
            same = _run(runs, 100_000, "qdrant-local").get("identical_top10", 0)
            out.append([f"exact ≥ 10 × Qdrant local QPS at 100k (batch {batch}), identical top-10",
                        f"{ratio:.1f}× ({exact['qps']:.1f} vs {local['qps']:.2f} QPS); identical top-10 "
                        f"{same * 100:.0f} %", _met(ratio >= 10 and same == 1)])
    for backend in ("exact-fp16", "exact"):
        big = _run(runs, 1_000_000, backend)
        if big:
            rss = big.get("peak_rss_mb") or 0
            verdict = _met(rss <= 4096) if backend == "exact-fp16" else "reference (float32 vectors alone: 4.1 GB)"
            out.append([f"1M pairs searchable in ≤ 4 GB RSS ({backend})", f"{rss / 1024:.2f} GiB peak", verdict])
            out.append([f"load of a saved 1M memory ≤ 5 s ({backend}, memory-mapped)", f"{big.get('load_s', 0):.2f} s",
                        _met(big.get("load_s", 99) <= 5)])
    return out


def _stretch_goal(stretch: dict[str, Any] | None) -> list[Any]:
    goal = "stretch: 10M pairs on one 24 GB machine (int8 + float rescoring), recall@10 ≥ 0.99"
    if not stretch:
        return [goal, "not in this run: `reco bench search --stretch`", "—"]
    peak = (stretch.get("peak_rss_mb") or 0) / 1024
    return [goal, f"{stretch['size']:,} pairs: recall@10 {stretch['recall_at_10']:.3f} over "
            f"{stretch['queries']} queries, peak RSS {peak:.1f} GiB, load {stretch['load_s']} s, single query p50 "
            f"{stretch['single_p50_ms'] / 1e3:.1f} s, batch of 64 {stretch['batch_s']} s",
            _met(stretch["recall_at_10"] >= 0.99 and peak <= 24)]


def _plots(res: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    search = res.get("growth", {}).get("search", [])
    if search:
        fig, (lat, rss) = plt.subplots(1, 2, figsize=(11, 4))
        for backend in sorted({p["backend"] for p in search}):
            pts = [p for p in search if p["backend"] == backend and p.get("p50_ms")]
            lat.loglog([p["size"] for p in pts], [p["p50_ms"] for p in pts], "o-", label=backend)
            rss.semilogx([p["size"] for p in pts], [p["rss_mb"] / 1024 for p in pts], "o-", label=backend)
        lat.set(xlabel="memory size (pairs)", ylabel="single-query p50 (ms)", title="search latency")
        rss.set(xlabel="memory size (pairs)", ylabel="resident memory (GiB)", title="RSS after search")
        rss.axhline(4, color="grey", ls="--", lw=1)
        lat.legend()
        fig.tight_layout()
        fig.savefig(folder / "growth_search.png", dpi=110)
        plt.close(fig)
        made.append("growth_search.png")
    batches = res.get("growth", {}).get("ingest_batch", [])
    if batches:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("encoder_only_img_s", "encoder-only"), ("pipeline_img_s", "pipeline")):
            ax.semilogx([p["batch"] for p in batches], [p[key] for p in batches], "o-", base=2, label=label)
        ax.set(xlabel="batch size", ylabel="images/s", title="ingest throughput vs batch size")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "growth_ingest.png", dpi=110)
        plt.close(fig)
        made.append("growth_ingest.png")
    return made


def _ingest_section(res: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
    ing = res.get("ingest", {})
    if not ing.get("result"):
        return []
    r, d = ing["result"], ing.get("details", {})
    lines = ["## Ingest", "", f"Model {r['model']} on {r['device']}, {r['n']} images "
             f"(`{d.get('images_dir')}`, first {r['n']} sorted), batch {d.get('batch')}, "
             f"{len(d.get('rounds', []))} interleaved rounds, images only (no captions).", ""]
    lines += _table(["leg", "img/s", "seconds", "CPU ms / image"], [
        ["encoder-only (pre-decoded tensors)", r["encoder_only_img_s"], d.get("encoder_s"),
         d.get("encoder_cpu_ms_per_img")],
        ["full pipeline (read, decode, preprocess, encode, Qdrant + SQLite)", r["pipeline_img_s"], d.get("pipeline_s"),
         d.get("pipeline_cpu_ms_per_img")],
    ])
    lines += [f"Ratio {r['ratio']:.3f} by wall clock; by CPU time per image (work done, whatever share of the "
              f"shared CPU each leg got) {d.get('cpu_ratio')}.", ""]
    lines += _table(["round", "load (1 min)", "encoder-only s", "pipeline s", "images"],
                    [[x["round"], (x["load_avg_1m"] or [""])[0], round(x["encoder_s"], 2), round(x["pipeline_s"], 2),
                      x["images"]] for x in d.get("rounds", [])])
    if peer:
        pd = peer.get("details", {})
        lines += ["### Against the peer (`clip-retrieval inference`, whole commands)", "",
                  f"Measured {pd.get('machine', {}).get('time', '?')} by `reco bench ingest --peer`, "
                  f"{len(pd.get('rounds', []))} round(s), same {peer['n']} images, same weights file, images only."
                  + (f" {pd['note']}." if pd.get("note") else ""), ""]
        lines += _table(["command", "img/s (median)", "note"], [
            ["reco ingest", peer["reco_img_s"], f"SQLite + the embedded memory store on disk; image tower "
             f"{peer.get('reco_runtime', 'fp32')}"],
            ["clip-retrieval inference", peer["peer_img_s"], f"its own batch loop: {pd.get('peer_loop_img_s')} img/s"],
            ["our encoder-only, fp32 (same weights)", peer.get("encoder_fp32_img_s", "—"), "pre-decoded tensors"],
        ])
        lines += _table(["round", "load at start (1/5/15 min)", "reco img/s", "peer img/s", "ratio",
                         "fp32 encoder-only img/s", "reco / encoder"],
                        [[x["round"], x.get("reco_load_start", x.get("load_avg_1m")), x.get("reco_img_s", "—"),
                          x.get("peer_img_s", "—"), x.get("ratio", "—"), x.get("encoder_fp32_img_s", "—"),
                          x.get("ratio_vs_encoder_fp32", "—")] for x in pd.get("rounds", [])])
    return lines


def precision_section(prec: dict[str, Any] | None) -> list[str]:
    """``reco bench precision``: speed and quality against fp32 per variant and model."""
    if not prec:
        return []
    flags = prec.get("cpu_flags", {})
    have = [k for k, v in flags.items() if v is True] or ["none"]
    lacking = [k for k, v in flags.items() if v is False]
    m = prec.get("machine", {})
    lines = ["## Faster CPU inference (`reco bench precision`)", "",
             f"Measured {m.get('time')} ({prec.get('duration_s', 0) / 60:.0f} min), load average at start "
             f"{m.get('load_avg_1_5_15')}. CPU flags: has {', '.join(have)}; lacks {', '.join(lacking)} "
             f"(torch's CPU capability: {flags.get('torch_cpu_capability')}). Goals against fp32 on the same "
             f"images: mean cosine ≥ {prec['goals']['cosine']}, Flickr8k test R@1 both ways within "
             f"{prec['goals']['r1_points']} points, top-10 neighbour agreement ≥ {prec['goals']['agreement']}. "
             "Speed: the same images per variant, variants interleaved over rounds; CPU ms per image is the "
             "work done whatever share of the shared cores a variant got.", ""]
    for model in prec.get("models", []):
        weights = "random weights: speed only, quality indicative" if model["random_weights"] else \
            f"trained weights `{model['pretrained']}`"
        lines += [f"### {model['model']} ({model['family']} image tower; {weights})", "",
                  f"Default coded for this family: **{model['coded_default']}**; fastest variant meeting every "
                  f"measured goal in this run: **{model['recommended']}**"
                  + (" (torch.compile stays opt-in: see its first-batch seconds and the notes below)"
                     if "compile" in model["recommended"] and "compile" not in model["coded_default"] else "")
                  + (" (random weights: the quality goals cannot be judged on them; see the notes below)"
                     if model["random_weights"] else "") + ".", ""]
        lines += _table(["variant", "img/s", "× fp32 (wall)", "CPU ms / image", "× fp32 (CPU)", "first batch s"],
                        [[r["variant"], r["img_s"], r["speedup_wall"], r["cpu_ms_per_img"], r["speedup_cpu"],
                          r["first_batch_s"]] for r in model["speed"]])
        lines += _table(["variant", "sample", "cosine mean / min", "top-10 agreement i→i / t→i",
                         "R@1 i→t (Δ)", "R@1 t→i (Δ)", "meets goals"],
                        [[q["variant"], q.get("sample"), f"{q['cosine_mean']:.5f} / {q['cosine_min']:.5f}",
                          f"{q['agree_i2i_top10']:.3f} / {q.get('agree_t2i_top10', '—')}",
                          f"{q['i2t_r1']:.2f} ({q['i2t_r1_delta']:+.2f})" if "i2t_r1" in q else "—",
                          f"{q['t2i_r1']:.2f} ({q['t2i_r1_delta']:+.2f})" if "t2i_r1" in q else "—",
                          _quality_verdict(q, model)] for q in model["quality"]])
        lines += _table(["sweep (default variant)", "img/s", "CPU ms / image"],
                        [[r["variant"], r["img_s"], r["cpu_ms_per_img"]] for r in model.get("sweeps", [])])
    return lines


def _quality_verdict(q: dict[str, Any], model: dict[str, Any]) -> str:
    from programs.bench.precision import meets_goals

    ok = meets_goals(q)
    if "i2t_r1" not in q and not model["random_weights"]:
        return "not judged (speed sample only: rejected on speed)"
    if model["random_weights"]:
        return "(random weights)" + (" yes" if ok else " no")
    if q["variant"].startswith("probe"):
        return "yes" if ok else f"**no** (text cosine {q.get('text_cosine_mean')})"
    return "yes" if ok else "**no**"


def _search_section(res: dict[str, Any]) -> list[str]:
    search = res.get("search", {})
    rows, runs = search.get("result", {}).get("results", []), search.get("details", {}).get("runs", [])
    if not rows:
        return []
    lines = ["## Search", "", "Synthetic random unit vectors, 512-d (search cost does not depend on what vectors "
             "mean; random vectors are the hard case for recall). One fresh process per size and backend; RSS is "
             "that process's after searching both matrices. Recall@10 against the float32 exact index.", ""]
    lines += _table(["size", "backend", "batch", "QPS", "p50 ms", "p99 ms", "recall@10", "RSS MB"],
                    [[r["size"], r["backend"], r["batch"], r["qps"], r["p50_ms"], r["p99_ms"], r["recall_at_10"],
                      r["rss_mb"]] for r in rows])
    lines += _table(["size", "backend", "load / fill s", "first query s", "peak RSS MB", "identical top-10"],
                    [[r["size"], r["backend"], round(r.get("load_s", r.get("fill_s", 0.0)), 3),
                      round(r.get("first_query_s", 0.0), 3), r.get("peak_rss_mb"), r.get("identical_top10")]
                     for r in runs])
    return lines


def _small_sections(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    ref = res.get("refine", {})
    if ref.get("result"):
        r, d = ref["result"], ref.get("details", {})
        lines += ["## Refine (image bytes → top-5)", "",
                  f"Through `predict_image`: {d.get('images')} images, {d.get('model')}, {d.get('threads')} torch "
                  f"thread(s), k={d.get('k')}, memory {r['memory_size']:,} pairs in an exact index "
                  f"({d.get('dtype')}), mode `{d.get('reco_mode')}`, class embeddings cached.", ""]
        lines += _table(["", "p50 ms", "p99 ms"], [["CLIP", r["clip_p50_ms"], r["clip_p99_ms"]],
                                                  [f"RECO ({d.get('dtype')})", r["reco_p50_ms"], r["reco_p99_ms"]],
                                                  [f"RECO ({d.get('other_dtype')})", d.get("reco_other_dtype_p50_ms"),
                                                   d.get("reco_other_dtype_p99_ms")]])
        lines += [f"Retrieval + fusion alone: {json.dumps(d.get('retrieval_fusion_ms'))}.", ""]
    train = res.get("train", {})
    if train.get("result"):
        r, d = train["result"], train.get("details", {})
        lines += ["## Training", ""]
        lines += _table(["samples/s", "epoch s", "pairs", "memory", "batch", "steps", "neighbour pass s"],
                        [[r["samples_per_s"], r["epoch_s"], d.get("pairs"), d.get("memory_size"), d.get("batch_size"),
                          d.get("steps"), d.get("precompute_neighbours_s")]])
    growth = res.get("growth", {})
    if growth:
        lines += ["## Growth", "", "![search growth](performance/growth_search.png)", "",
                  "![ingest vs batch](performance/growth_ingest.png)", ""]
        lines += _table(["batch", "images", "encoder-only img/s", "pipeline img/s"],
                        [[p["batch"], p["images"], p["encoder_only_img_s"], p["pipeline_img_s"]]
                         for p in growth.get("ingest_batch", [])])
        lines += [f"- {note}" for note in growth.get("notes", [])] + [""]
    gpu = res.get("gpu", {})
    lines += ["## GPU", "", f"{gpu.get('status', 'not run')}" + (f": {json.dumps(gpu)}" if gpu.get("status") == "ok"
                                                                  else "."), ""]
    return lines


def write_report(docs: Path) -> Path:
    """Regenerate ``docs/performance.md`` (and its PNGs) from ``docs/performance/*.json``."""
    folder = docs / ASSETS
    res = json.loads((folder / "results.json").read_text())
    peer_file = folder / "peer.json"
    peer = json.loads(peer_file.read_text()) if peer_file.is_file() else None
    precision_file = folder / "precision.json"
    precision = json.loads(precision_file.read_text()) if precision_file.is_file() else None
    stretch_file = folder / "stretch.json"
    stretch = json.loads(stretch_file.read_text()) if stretch_file.is_file() else None
    _plots(res, folder)
    machine = res.get("machine", {})
    lines = ["# Performance", "", "Generated by `reco bench all` (do not edit by hand: edit "
             "`docs/performance/optimisations.md` or rerun). Scale-out estimates: [scaling.md](scaling.md). The memory "
             "engine (Qdrant Edge against the exact index on embedding-like data, `reco bench search`): "
             "[performance/engine.md](performance/engine.md); `reco serve` under HTTP load (`reco bench serve`): "
             "`performance/serve.json`.", "",
             f"Machine: {describe_machine(machine)}; torch {machine.get('torch')}, {machine.get('torch_threads')} "
             f"threads; load average at start {machine.get('load_avg_1_5_15')} (shared machine: other work was "
             f"running). Run on {machine.get('time')}, {res.get('duration_s', 0) / 60:.1f} min.", "",
             "## Goals", ""]
    lines += _table(["goal", "measured", "met"], goal_rows(res, peer, stretch))
    lines += _ingest_section(res, peer) + precision_section(precision) + _search_section(res) + _small_sections(res)
    notes = folder / "optimisations.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    out = docs / "performance.md"
    out.write_text("\n".join(lines))
    return out
