"""``reco bench search``: the exact in-RAM index against Qdrant, 512-d, single queries and batches of 64.

Memories are synthetic random unit vectors (:mod:`app.bench.memory_files`): search cost does not
depend on what vectors mean, and random vectors are the hard case for recall (no clusters, small gaps).
Every (size, backend) runs in a fresh process (:mod:`app.bench.child`), so its resident memory is its own.

Backends:
- ``exact``: :class:`ExactIndex`, float32, loaded memory-mapped (what the refine worker's snapshot does);
- ``exact-fp16``: the same in float16 (half the bytes; float16 products rescored in float32);
- ``qdrant-local``: qdrant-client local mode (in memory: its search is the same code as on a path, and
  filling a path-backed store commits every point to SQLite, ~17 ms a point here), only up to
  ``qdrant_local_max`` points: past that, filling and searching it takes minutes per query batch;
- ``qdrant-server``: the server at ``RECO_QDRANT_URL`` when set (HNSW, the scale-out path).

Recall@10 is measured against ``exact`` (float32, brute force) on the single queries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from app.bench.common import load_average, machine_info, percentile_ms, run_child, unit_vectors
from app.bench.memory_files import memory_folder, write_synthetic_memories

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUERY_SEED = 12_345


class SearchRow(BaseModel):
    size: int
    backend: str
    batch: int
    qps: float
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    rss_mb: float


class SearchBenchResult(BaseModel):
    """The issue's JSON contract; ``details`` (load times, fills, identical top-10) stays out of the dump."""

    results: list[SearchRow]
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)


def _recall(tops: Sequence[Sequence[int]], truth: Sequence[Sequence[int]], k: int) -> tuple[float, float]:
    """(mean recall@k, fraction of queries whose top-k set is identical) against ``truth``."""
    hits = [len(set(a[:k]) & set(b[:k])) / k for a, b in zip(tops, truth, strict=True)]
    same = [set(a[:k]) == set(b[:k]) for a, b in zip(tops, truth, strict=True)]
    return round(float(np.mean(hits)), 4), round(float(np.mean(same)), 4)


def _rows(size: int, backend: str, measured: dict[str, Any], recall: float, batch: int) -> list[SearchRow]:
    single, batches = measured["single_s"], measured["batch_s"]
    rss = float(measured["rss_mb"] or 0.0)
    rows = [SearchRow(size=size, backend=backend, batch=1, qps=round(len(single) / sum(single), 2),
                      p50_ms=percentile_ms(single, 50), p99_ms=percentile_ms(single, 99), recall_at_10=recall,
                      rss_mb=rss)]
    if batches:
        rows.append(SearchRow(size=size, backend=backend, batch=batch,
                              qps=round(batch * len(batches) / sum(batches), 2), p50_ms=percentile_ms(batches, 50),
                              p99_ms=percentile_ms(batches, 99), recall_at_10=recall, rss_mb=rss))
    return rows


def _plan(size: int, qdrant_local_max: int, qdrant_server_max: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(backend, child task, task arguments) to run at ``size``."""
    plan: list[tuple[str, str, dict[str, Any]]] = [
        ("exact", "exact", {"dtype": "float32", "mmap": True}),
        ("exact-fp16", "exact", {"dtype": "float16", "mmap": True}),
    ]
    if size <= qdrant_local_max:
        plan.append(("qdrant-local", "qdrant", {"dtype": "float32", "url": None}))
    url = os.environ.get("RECO_QDRANT_URL")
    if url and size <= qdrant_server_max:
        plan.append(("qdrant-server", "qdrant", {"dtype": "float32", "url": url}))
    return plan


def run_search_bench(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    dim: int = 512,
    k: int = 10,
    single: int = 20,
    batches: int = 3,
    batch: int = 64,
    qdrant_local_max: int = 100_000,
    qdrant_server_max: int = 1_000_000,
    qdrant_single: int = 10,
    workdir: Path | None = None,
    runner: Callable[[str, dict[str, Any]], dict[str, Any]] = run_child,
) -> SearchBenchResult:
    """Each size: write the synthetic memory, then one child process per backend (``runner``: tests run in-process)."""
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-search-", dir=workdir))
    results: list[SearchRow] = []
    details: dict[str, Any] = {"machine": info, "dim": dim, "k": k, "runs": [], "synthetic": True}
    try:
        queries = unit_vectors(max(single, batch * batches), dim, QUERY_SEED)
        np.save(root / "queries.npy", queries)
        write_synthetic_memories(root, sizes, dim, dtypes=("float32", "float16"))
        for size in sorted(sizes):
            truth: list[list[int]] | None = None
            for backend, task, extra in _plan(size, qdrant_local_max, qdrant_server_max):
                is_qdrant = task == "qdrant"
                args = {"folder": str(memory_folder(root, size, extra["dtype"])), "queries": str(root / "queries.npy"),
                        "k": k, "batch": batch, "single": min(qdrant_single, single) if is_qdrant else single,
                        "batches": 1 if is_qdrant and size > 10_000 else batches, "mmap": extra.get("mmap", True),
                        "url": extra.get("url")}
                measured = runner(task, args)
                truth = truth if truth is not None else measured["top"]  # exact float32 runs first
                recall, identical = _recall(measured["top"], truth[: len(measured["top"])], k)
                results += _rows(size, backend, measured, recall, batch)
                details["runs"].append({"size": size, "backend": backend, "identical_top10": identical,
                                        "load_avg_1m": load_average()[:1],
                                        **{key: v for key, v in measured.items() if key not in ("top", "batch_top")}})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    details["load_avg_end"] = load_average()
    return SearchBenchResult(results=results, details=details)

