"""``reco bench search``: the exact in-RAM index against Qdrant Edge and Qdrant, single queries and batches of 64.

Data (``data``): ``embeddings`` (the default) are the base encoder's real embeddings of the shared datasets,
grown past their ~41k pairs by small perturbations (:mod:`programs.bench.embedding_memory`, which says how);
``synthetic`` are random unit vectors (:mod:`programs.bench.memory_files`), the hard case for recall.
Every (size, backend) runs in a fresh process (:mod:`programs.bench.child`), so its resident memory is its own.

Backends:
- ``edge`` / ``edge-int8``: Qdrant Edge, the embedded engine (HNSW m 16, ef_construct 100; the int8 one with
  scalar quantization and rescoring), one row per search ``hnsw_ef`` (the recall/latency curve), a batch
  row, a row filtered to one dataset holding 1 % of the points, and ``edge-exact`` (its exact mode);
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

from programs.bench.common import load_average, machine_info, percentile_ms, run_child, unit_vectors
from programs.bench.memory_files import memory_folder, write_synthetic_memories

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_EFS = (16, 32, 64, 128, 256)
EDGE_LAYOUTS = {"edge": {}, "edge-int8": {"int8": True}, "edge-int8-disk": {"int8": True, "on_disk": True}}
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
    ef: int | None = None  # Edge: the search-time candidate list of this row
    filtered: bool = False  # searched among the 1 % "probe" dataset only


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


class _ScoredRecall:
    """Recall@k that counts ties as hits: a returned row whose score reaches the true k-th score is right.

    Real memories hold the same image vector once per caption (Flickr8k: five), so which of several tied rows
    comes back is arbitrary; counting ids alone would call a correct answer a miss."""

    def __init__(self, folder: Path, queries: np.ndarray, truth: list[list[int]], k: int) -> None:
        self.image = np.load(folder / "image.npy", mmap_mode="r")
        self.queries, self.k = queries, k
        self.kth = np.asarray([float(q @ np.asarray(self.image[t[k - 1]], np.float32))
                               for q, t in zip(queries, truth, strict=False)])

    def __call__(self, tops: Sequence[Sequence[int]]) -> float:
        hits = []
        for q, top, kth in zip(self.queries, tops, self.kth, strict=False):
            scores = np.asarray(self.image[np.asarray(top[: self.k], np.int64)], np.float32) @ q if len(top) else []
            hits.append(min(self.k, int(np.sum(np.asarray(scores) >= kth - 1e-5))) / self.k)
        return round(float(np.mean(hits)), 4)


def _edge_rows(size: int, backend: str, measured: dict[str, Any], recall: _ScoredRecall,
               probe_recall: _ScoredRecall, batch: int) -> list[SearchRow]:
    rss = float(measured["peak_rss_mb"] or 0.0)
    rows = []
    for ef, run in measured["curve"].items():
        times = run["single_s"]
        rows.append(SearchRow(size=size, backend=backend, batch=1, ef=int(ef), qps=round(len(times) / sum(times), 2),
                              p50_ms=percentile_ms(times, 50), p99_ms=percentile_ms(times, 99),
                              recall_at_10=recall(run["top"]), rss_mb=rss))
    default_recall = rows[-1].recall_at_10 if rows else 0.0
    batches = measured["batch_s"]
    if batches:
        rows.append(SearchRow(size=size, backend=backend, batch=batch,
                              qps=round(batch * len(batches) / sum(batches), 2),
                              p50_ms=percentile_ms(batches, 50), p99_ms=percentile_ms(batches, 99),
                              recall_at_10=default_recall, rss_mb=rss))
    times = measured["filtered_s"]
    rows.append(SearchRow(size=size, backend=backend, batch=1, filtered=True, qps=round(len(times) / sum(times), 2),
                          p50_ms=percentile_ms(times, 50), p99_ms=percentile_ms(times, 99),
                          recall_at_10=probe_recall(measured["filtered_top"]), rss_mb=rss))
    if backend == "edge":
        times = measured["exact_s"]
        rows.append(SearchRow(size=size, backend="edge-exact", batch=1, qps=round(len(times) / sum(times), 2),
                              p50_ms=percentile_ms(times, 50), p99_ms=percentile_ms(times, 99),
                              recall_at_10=recall(measured["exact_top"]), rss_mb=rss))
    return rows


def _embedding_pairs(settings: Any, data_root: Path) -> dict[str, Any]:
    from app.encoder import OpenClipEncoder
    from programs.bench.embedding_memory import real_pairs
    from programs.reproduce.data import encode_dataset

    encoder = OpenClipEncoder(settings.clip_model, settings.clip_pretrained, device=settings.device,
                              precision=settings.precision, batch_size=max(settings.encode_batch_size, 128),
                              seed=settings.random_init_seed)
    cache = settings.data_dir / "cache" / "reproduce"
    pairs = real_pairs(lambda folder: encode_dataset(encoder, folder, cache, progress=True), data_root)
    pairs["encoder_id"] = encoder.encoder_id  # type: ignore[assignment]  # beside the arrays, for the report
    return pairs


def run_engine_bench(
    sizes: Sequence[int] = (100_000,),
    *,
    data_root: Path,
    settings: Any,
    k: int = 10,
    single: int = 100,
    batches: int = 3,
    batch: int = 64,
    efs: Sequence[int] = DEFAULT_EFS,
    backends: Sequence[str] = ("exact", "edge", "edge-int8"),
    workdir: Path | None = None,
    runner: Callable[[str, dict[str, Any]], dict[str, Any]] = run_child,
    log: Callable[[str], None] = lambda _m: None,
    pairs: dict[str, Any] | None = None,
) -> SearchBenchResult:
    """Embedding-like memories: exact (float32, the truth) against Qdrant Edge per ``hnsw_ef``."""
    from programs.bench.embedding_memory import exact_truth, write_embedding_memories

    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-engine-", dir=workdir))
    results: list[SearchRow] = []
    details: dict[str, Any] = {"machine": info, "k": k, "runs": [], "synthetic": False, "efs": list(efs)}
    try:
        log("encoding the shared datasets with the configured encoder (cached after the first run)")
        pairs = pairs or _embedding_pairs(settings, data_root)
        details |= {"encoder_id": pairs["encoder_id"], "real_pairs": int(len(pairs["image"])),
                    "queries": int(min(single, len(pairs["queries"])))}
        queries = np.asarray(pairs["queries"], np.float32)
        queries = np.concatenate([queries] * (1 + batch * batches // len(queries)))[: max(single, batch * batches)]
        np.save(root / "queries.npy", queries)
        singles = queries[:single]
        log(f"writing memories of {sorted(sizes)} pairs from {len(pairs['image']):,} real pairs")
        write_embedding_memories(root, sizes, pairs)
        for size in sorted(sizes):
            folder = memory_folder(root, size, "float32")
            recall = _ScoredRecall(folder, singles, exact_truth(folder, singles, k), k)
            probe_recall = _ScoredRecall(folder, singles, exact_truth(folder, singles, k, probe_only=True), k)
            for backend in backends:
                log(f"{size:,} pairs: {backend}")
                args: dict[str, Any] = {"folder": str(folder), "queries": str(root / "queries.npy"), "k": k,
                                        "batch": batch, "single": single, "batches": batches, "mmap": True,
                                        "workdir": str(workdir) if workdir else None,
                                        "timeout_s": max(900, size // 250)}  # 1M pairs: 67 min
                if backend == "exact":
                    measured = runner("exact", args)
                    results += _rows(size, backend, measured, recall(measured["top"]), batch)
                else:
                    measured = runner("edge", args | {"layout": EDGE_LAYOUTS[backend], "efs": list(efs)})
                    results += _edge_rows(size, backend, measured, recall, probe_recall, batch)
                details["runs"].append({"size": size, "backend": backend, "load_avg_1m": load_average()[:1],
                                        **{key: v for key, v in measured.items()
                                           if key not in ("top", "batch_top", "curve", "filtered_top", "exact_top",
                                                          "single_s", "batch_s", "filtered_s", "exact_s")}})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    details["load_avg_end"] = load_average()
    return SearchBenchResult(results=results, details=details)


def engine_goals(result: SearchBenchResult) -> list[dict[str, Any]]:
    """The memory-engine issue's goals, computed from the rows: met or not, with the figures."""
    goals = []
    for size, p50_goal, speed_goal in ((100_000, 3.0, 10.0), (1_000_000, 5.0, 20.0)):
        rows = [r for r in result.results if r.size == size]
        exact = next((r for r in rows if r.backend == "exact" and r.batch == 1), None)
        good = [r for r in rows if r.backend.startswith("edge") and r.backend != "edge-exact" and r.batch == 1
                and not r.filtered and r.recall_at_10 >= 0.95]
        if not rows or exact is None:
            continue
        best = min(good, key=lambda r: r.p50_ms, default=None)
        speedup = round(best.qps / exact.qps, 1) if best else None
        goals.append({"goal": f"{size:,} pairs: p50 <= {p50_goal} ms at recall@10 >= 0.95, "
                              f">= {speed_goal:g}x exact QPS",
                      "measured": (f"{best.backend} ef {best.ef}: p50 {best.p50_ms} ms, recall {best.recall_at_10}, "
                                   f"{speedup}x exact ({exact.qps} QPS)") if best else "no setting reached recall 0.95",
                      "met": bool(best and best.p50_ms <= p50_goal and speedup is not None and speedup >= speed_goal)})
        filtered = [r for r in rows if r.filtered and r.recall_at_10 >= 0.95]
        fbest = min(filtered, key=lambda r: r.p50_ms, default=None)
        if size == 100_000:
            goals.append({"goal": "100,000 pairs filtered to 1 %: p50 <= 10 ms at recall@10 >= 0.95",
                          "measured": (f"{fbest.backend}: p50 {fbest.p50_ms} ms, recall {fbest.recall_at_10}"
                                       if fbest else "no filtered row reached recall 0.95"),
                          "met": bool(fbest and fbest.p50_ms <= 10.0)})
    for run in result.details.get("runs", []):
        if run["size"] == 1_000_000 and run["backend"].startswith("edge"):
            goals += [{"goal": f"1M ({run['backend']}): reopen <= 3 s", "measured": f"{run['reopen_s']:.2f} s",
                       "met": run["reopen_s"] <= 3},
                      {"goal": f"1M ({run['backend']}): peak RSS <= 3 GB", "measured": f"{run['peak_rss_mb']:,.0f} MB",
                       "met": run["peak_rss_mb"] <= 3072},
                      {"goal": f"1M ({run['backend']}): upserts >= 5,000 pairs/s",
                       "measured": f"{run['upsert_pairs_per_s']:,.0f} pairs/s",
                       "met": run["upsert_pairs_per_s"] >= 5000}]
    return goals


def merge_runs(previous: dict[str, Any] | None, result: SearchBenchResult, command: str) -> SearchBenchResult:
    """``result`` plus the rows of ``previous`` (a saved search.json) at sizes this run did not measure, so one
    doc holds a quick 100k run and a long 1M run; each size keeps the command and machine that measured it."""
    result.details["commands"] = {str(n): command for n in sorted({r.size for r in result.results})}
    if not previous:
        return result
    sizes = {r.size for r in result.results}
    kept = [SearchRow(**r) for r in previous.get("results", []) if r["size"] not in sizes]
    old = previous.get("details", {})
    runs = [run for run in old.get("runs", []) if run["size"] not in sizes] + result.details.get("runs", [])
    commands = {k: v for k, v in old.get("commands", {}).items() if int(k) not in sizes} | result.details["commands"]
    details = result.details | {"runs": runs, "commands": commands}
    return SearchBenchResult(results=sorted(kept + result.results, key=lambda r: r.size), details=details)


def engine_report(result: SearchBenchResult, command: str) -> str:
    """docs/performance/engine.md: every row, the build/reopen figures and the goals, from one run."""
    d = result.details
    lines = ["# Memory engine: exact index vs Qdrant Edge on embedding-like data", "",
             "Generated by " + ("; ".join(f"`{c}` ({int(n):,} pairs)" for n, c in d["commands"].items())
                                if d.get("commands") else f"`{command}`")
             + f" ({d['machine'].get('cpu', '?')}, {d['machine'].get('cores', '?')} cores; "
             f"load average at the end {d.get('load_avg_end')}). Encoder `{d.get('encoder_id')}`, "
             f"{d.get('real_pairs'):,} real pairs grown by perturbation (programs/bench/embedding_memory.py), "
             f"{d.get('queries')} held-out query images, k = {d['k']}; recall@10 against exact float32.", "",
             "| pairs | backend | ef | batch | filtered | p50 ms | p99 ms | QPS | recall@10 | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.results:
        lines.append(f"| {r.size:,} | {r.backend} | {r.ef or ''} | {r.batch} | {'1 %' if r.filtered else ''} | "
                     f"{r.p50_ms} | {r.p99_ms} | {r.qps:,.1f} | {r.recall_at_10} | {r.rss_mb:,.0f} |")
    lines += ["", "| pairs | backend | upsert pairs/s | HNSW build s | reopen + first query s | disk MB |",
              "|---|---|---|---|---|---|"]
    for run in d.get("runs", []):
        if "build_s" in run:
            lines.append(f"| {run['size']:,} | {run['backend']} | {run['upsert_pairs_per_s']:,.0f} | "
                         f"{run['build_s']:.1f} | {run['reopen_s']:.2f} | {run['disk_mb']:,.0f} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in engine_goals(result)]
    return "\n".join(lines) + "\n"


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

