"""Growth curves: search latency and resident memory against memory size; ingest throughput against batch size.

The search curve reuses the rows of :mod:`programs.bench.search` (one fresh process per size and backend).
The ingest curve runs encoder-only and the full pipeline at each batch size on a few images (twice
the batch, at least 16), each pipeline run into a fresh store. :func:`describe_bends` turns the
measured points into the sentences the report prints: where each curve bends and why.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.encoder.openclip import OpenClipEncoder
from app.imaging import ImageLimits
from programs.bench.common import load_average
from programs.bench.ingest import (
    IngestPipeline,
    build_encoder,
    encoder_only_seconds,
    first_images,
    load_ingest_pipeline,
    pipeline_settings,
    stage_images,
)
from programs.bench.search import SearchRow

DEFAULT_BATCHES = (1, 4, 16, 64)
BYTES_PER_VALUE = {"exact": 4, "exact-fp16": 2}


def search_curve(rows: Sequence[SearchRow], runs: Sequence[dict[str, Any]], dim: int = 512) -> list[dict[str, Any]]:
    """Per (backend, size): single-query p50, batch-64 QPS, RSS, bytes scanned per query, effective GB/s."""
    points: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        point = points.setdefault((row.backend, row.size), {"backend": row.backend, "size": row.size,
                                                            "rss_mb": row.rss_mb})
        if row.batch == 1:
            point["p50_ms"] = row.p50_ms
        else:
            point["batch_qps"] = row.qps
    for run in runs:
        found = points.get((run["backend"], run["size"]))
        if found is not None:
            found["load_s"] = run.get("load_s")
            found["peak_rss_mb"] = run.get("peak_rss_mb")
            found["baseline_rss_mb"] = run.get("baseline_rss_mb")
    for (backend, size), point in points.items():
        width = BYTES_PER_VALUE.get(backend)
        if width and point.get("p50_ms"):
            scanned = size * dim * width
            point["scan_gb_s"] = round(scanned / (point["p50_ms"] / 1e3) / 1e9, 2)
    return sorted(points.values(), key=lambda p: (p["backend"], p["size"]))


def ingest_batch_curve(
    images: Path,
    batches: Sequence[int] = DEFAULT_BATCHES,
    *,
    model: str = "ViT-B-32",
    pipeline: IngestPipeline | None = None,
    encoder: OpenClipEncoder | None = None,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """img/s of encoder-only and of the pipeline at each batch size (same images for both legs)."""
    from app.services.ingest import IngestService, prepare_storage

    pipeline = pipeline or load_ingest_pipeline()
    encoder = encoder or build_encoder(model)
    points = []
    encode_batch = encoder.batch_size
    for batch in batches:
        n = max(16, 2 * batch)
        root = Path(tempfile.mkdtemp(prefix=f"reco-bench-batch{batch}-", dir=workdir))
        try:
            folder = stage_images(first_images(images, n), root / "images", 1)[0]
            encoder.batch_size = batch
            settings = pipeline_settings(root / "data", encoder, batch)
            prepare_storage(settings)
            service = IngestService(settings, encoder=encoder)
            enc_s, count, _, _ = encoder_only_seconds(encoder, folder, ImageLimits.from_settings(settings))
            start = time.perf_counter()
            pipeline(folder, settings, service=service, progress=False)
            pipe_s = time.perf_counter() - start
        finally:
            encoder.batch_size = encode_batch
            shutil.rmtree(root, ignore_errors=True)
        points.append({"batch": batch, "images": count, "encoder_only_img_s": round(count / enc_s, 3),
                       "pipeline_img_s": round(count / pipe_s, 3), "load_avg_1m": load_average()[:1]})
    return points


def describe_bends(search: Sequence[dict[str, Any]], ingest: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences from the measured points: where each curve bends and the measured reason."""
    notes: list[str] = []
    exact = [p for p in search if p["backend"] == "exact" and p.get("p50_ms")]
    if len(exact) >= 2:
        small, big = exact[0], exact[-1]
        notes.append(
            f"Exact search latency is flat-ish at small sizes ({small['p50_ms']:.1f} ms at {small['size']:,} rows: "
            f"fixed per-query cost, normalising the query, top-k bookkeeping, thread wake-ups) and turns linear "
            f"once the matrix no longer fits in cache: at {big['size']:,} rows one query scans "
            f"{big['size'] * 512 * 4 / 1e9:.2f} GB in {big['p50_ms']:.0f} ms ({big.get('scan_gb_s', 0):.1f} GB/s), "
            "i.e. single queries are bound by memory bandwidth, which is why float16 storage halves them.")
    half = {p["size"]: p["p50_ms"] for p in search if p["backend"] == "exact-fp16" and p.get("p50_ms")}
    cross = next((p["size"] for p in exact if p["size"] in half and half[p["size"]] <= p["p50_ms"]), None)
    if cross is not None:
        notes.append(
            f"float16 storage pays off for single queries from ~{cross:,} rows: below, its fixed costs (the "
            "half-precision kernel's thread start-up, rescoring the candidates) exceed the bandwidth it saves.")
    rss = [p for p in search if p["backend"] == "exact-fp16" and p.get("rss_mb")]
    if len(rss) >= 2:
        base = rss[0].get("baseline_rss_mb") or rss[0]["rss_mb"]
        per_row = (rss[-1]["rss_mb"] - rss[0]["rss_mb"]) / max(1, rss[-1]["size"] - rss[0]["size"]) * 1024 * 1024
        notes.append(
            f"Resident memory stays at the process baseline (~{base:.0f} MB: Python, torch, the libraries) up to "
            f"~100k rows and then grows linearly at ~{per_row:.0f} bytes per pair in float16 (two 512-d vectors = "
            "2,048 bytes, plus ids, hashes and the lazily parsed payload index).")
    if len(ingest) >= 2:
        best = max(ingest, key=lambda p: p["pipeline_img_s"])
        first = ingest[0]
        notes.append(
            f"Ingest throughput rises from {first['pipeline_img_s']:.1f} img/s at batch {first['batch']} to "
            f"{best['pipeline_img_s']:.1f} at batch {best['batch']}: small batches pay per-batch costs (one SQLite "
            "transaction per step, a Qdrant upsert, the decode hand-off) and, on 2 busy cores, OpenMP barriers of "
            "tiny matmuls; past batch ~16 the encoder's matmuls already fill both cores, so the curve flattens.")
    return notes
