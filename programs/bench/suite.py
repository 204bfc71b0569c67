"""``reco bench all``: every benchmark in one run (~15 min on the 2-core VM), results.json, performance.md.

Order: search and growth first (they run in child processes and need the most memory), then ingest,
refine, training, the ingest batch curve and the GPU check. One ViT-B-32 encoder is loaded once and
shared. The peer comparison (~10 min more) is its own command, ``reco bench ingest --peer``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from programs.bench.common import machine_info
from programs.bench.gpu import run_gpu_bench
from programs.bench.growth import describe_bends, ingest_batch_curve, search_curve
from programs.bench.ingest import build_encoder, run_ingest_bench
from programs.bench.refine import run_refine_bench
from programs.bench.report import ASSETS, write_report
from programs.bench.search import run_search_bench
from programs.bench.train import run_train_bench

GROWTH_SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)


def _entry(result: Any) -> dict[str, Any]:
    return {"result": result.model_dump(), "details": result.details}


def run_all(
    images: Path,
    docs: Path,
    *,
    n: int = 1000,
    sizes: Sequence[int] = GROWTH_SIZES,
    model: str = "ViT-B-32",
    refine_memory: int = 100_000,
    batches: Sequence[int] = (1, 4, 16, 64),
    train_pairs: int = 8192,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "images": str(images)}
    log("search + growth (synthetic memories, one process per size/backend)")
    search = run_search_bench(sizes)
    results["search"] = _entry(search)
    encoder = build_encoder(model)
    log(f"ingest: {n} images, encoder-only vs pipeline, interleaved")
    results["ingest"] = _entry(run_ingest_bench(images, n, encoder=encoder))
    log(f"refine: CLIP vs RECO at a {refine_memory:,} memory")
    results["refine"] = _entry(run_refine_bench(images, memory_size=refine_memory, encoder=encoder, memory="exact"))
    log("train: fusion samples/s on cached embeddings")
    results["train"] = _entry(run_train_bench(pairs=train_pairs))
    log("growth: ingest throughput vs batch size")
    ingest_curve = ingest_batch_curve(images, batches, encoder=encoder)
    search_points = search_curve(search.results, search.details["runs"])
    results["growth"] = {"search": search_points, "ingest_batch": ingest_curve,
                         "notes": describe_bends(search_points, ingest_curve)}
    results["gpu"] = run_gpu_bench(images, n)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    folder = docs / ASSETS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_report(docs)
    return results
