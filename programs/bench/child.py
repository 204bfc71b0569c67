"""Measurements that run in a fresh process: ``python -m programs.bench.child TASK ARGS_JSON`` prints one JSON line.

A fresh process per (size, backend) keeps its resident memory its own (nothing left over from the
previous size) and gives each measurement the same start. Tasks:

- ``exact``: load a saved :class:`ExactIndex` (memory-mapped or read), time the load, single queries and
  batches on the image matrix, one batch on the text matrix (both matrices searchable), report RSS.
- ``edge``: fill a Qdrant Edge collection (the embedded engine) with both vectors, build its HNSW, then
  single queries per ``hnsw_ef`` (the recall/latency curve), batches, queries filtered to the ``probe``
  dataset, exact-mode queries, and the time to reopen the store and answer a first query.
- ``qdrant``: fill a Qdrant collection (local mode in memory, or the server at ``url``) from a saved
  memory through :class:`QdrantMemory`, then the same queries through its ``search``/``search_batch``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from app.schemas import Modality
from programs.bench.common import peak_rss_mb, rss_mb, time_one


def _queries(args: dict[str, Any]) -> np.ndarray:
    return cast(np.ndarray, np.load(args["queries"]).astype(np.float32))


def exact_task(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from app.memory.exact import ExactIndex

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    queries, k, batch = _queries(args), int(args["k"]), int(args["batch"])
    baseline = rss_mb()
    start = time.perf_counter()
    index = ExactIndex.load(Path(args["folder"]), mmap=bool(args["mmap"]), chunk=int(args.get("chunk", 262_144)))
    load_s = time.perf_counter() - start
    singles = queries[: int(args["single"])]
    start = time.perf_counter()
    index.knn(singles[0], Modality.IMAGE, k)
    first_s = time.perf_counter() - start
    tops: list[list[int]] = []

    def one(q: np.ndarray) -> None:
        tops.append(index.knn(q, Modality.IMAGE, k)[1][0].tolist())

    single_s = [time_one(one, q) for q in singles]
    batches = [queries[i * batch: (i + 1) * batch] for i in range(int(args["batches"]))]
    batch_tops: list[list[list[int]]] = []

    def many(b: np.ndarray) -> None:
        batch_tops.append(index.knn(b, Modality.IMAGE, k)[1].tolist())

    batch_s = [time_one(many, b) for b in batches]
    index.knn(queries[:batch], Modality.TEXT, k)  # the text matrix too: "both matrices searchable"
    return {"load_s": load_s, "first_query_s": first_s, "single_s": single_s, "batch_s": batch_s, "top": tops,
            "batch_top": batch_tops,
            "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "rows": len(index),
            "dtype": index.dtype}


def _fill_qdrant(memory: Any, folder: Path, page: int = 4096) -> float:
    from app.memory.base import ItemPayload, MemoryRecord
    from programs.bench.memory_files import synthetic_hash, synthetic_id

    image = np.load(folder / "image.npy", mmap_mode="r")
    text = np.load(folder / "text.npy", mmap_mode="r")
    start = time.perf_counter()
    for lo in range(0, len(image), page):
        hi = min(lo + page, len(image))
        records = [
            MemoryRecord(ItemPayload(item_id=synthetic_id(r), image_hash=synthetic_hash(r),
                                     caption=f"synthetic caption {r}", dataset="synthetic", split="train"),
                         np.asarray(image[r], np.float32), np.asarray(text[r], np.float32))
            for r in range(lo, hi)
        ]
        memory.upsert(records)
    return time.perf_counter() - start


def qdrant_task(args: dict[str, Any]) -> dict[str, Any]:
    import warnings

    from qdrant_client import QdrantClient

    from app.memory.qdrant import QdrantServerStore

    warnings.simplefilter("ignore", UserWarning)  # local mode warns past 20k points: that is the point here
    queries, k, batch = _queries(args), int(args["k"]), int(args["batch"])
    url = args.get("url")
    client = QdrantClient(url=url) if url else QdrantClient(location=":memory:")
    folder = Path(args["folder"])
    name = f"reco_bench_{folder.parent.name}"
    store = QdrantServerStore(client, location=url or ":memory:")
    if url and client.collection_exists(name):
        client.delete_collection(name)
    memory = store.ensure_collection(name, int(np.load(folder / "image.npy", mmap_mode="r").shape[1]))
    fill_s = _fill_qdrant(memory, folder)
    tops: list[list[int]] = []

    def one(q: np.ndarray) -> None:
        tops.append([int(h.item_id.replace("-", "")[-12:], 16) for h in memory.search(q, Modality.IMAGE, k)])

    single_s = [time_one(one, q) for q in queries[: int(args["single"])]]
    batches = [queries[i * batch: (i + 1) * batch] for i in range(int(args["batches"]))]
    batch_s = [time_one(lambda b: memory.search_batch(b, Modality.IMAGE, k), b) for b in batches]
    result = {"fill_s": fill_s, "single_s": single_s, "batch_s": batch_s, "top": tops, "rss_mb": rss_mb(),
              "peak_rss_mb": peak_rss_mb(), "mode": "server" if url else "local (in memory)"}
    if url:
        client.delete_collection(name)
    return result


def _payloads(folder: Path) -> list[dict[str, Any]]:
    with (folder / "payloads.jsonl").open() as handle:
        return [json.loads(line) for line in handle]


def _row_of(item_id: str) -> int:
    return int(item_id.replace("-", "")[-12:], 16)


def fill_edge(memory: Any, folder: Path, page: int = 2048) -> int:
    """Upsert a saved memory folder (both vectors, its payloads) into an Edge collection; returns the rows."""
    from app.memory.base import ItemPayload, MemoryRecord

    image = np.load(folder / "image.npy", mmap_mode="r")
    text = np.load(folder / "text.npy", mmap_mode="r")
    payloads = _payloads(folder)
    fields = ("item_id", "image_hash", "caption", "dataset", "split", "source")
    for lo in range(0, len(image), page):
        hi = min(lo + page, len(image))
        memory.upsert([MemoryRecord(ItemPayload(**{f: payloads[r][f] for f in fields}),
                                    np.asarray(image[r], np.float32), np.asarray(text[r], np.float32))
                       for r in range(lo, hi)])
    return len(image)


def edge_task(args: dict[str, Any]) -> dict[str, Any]:
    import shutil
    import tempfile

    from app.memory.edge import EdgeStore
    from app.memory.layout import MemoryLayout

    queries, k, batch = _queries(args), int(args["k"]), int(args["batch"])
    folder = Path(args["folder"])
    # threshold 1: optimize() below builds HNSW over every point (the bench times that build by itself)
    layout = MemoryLayout(**args.get("layout", {}), indexing_threshold=1, min_free_mb=0)
    root = Path(tempfile.mkdtemp(prefix="reco-bench-edge-", dir=args.get("workdir")))
    baseline = rss_mb()
    try:
        store = EdgeStore(root, layout)
        image = np.load(folder / "image.npy", mmap_mode="r")
        memory = store.ensure_collection("bench", int(image.shape[1]))
        start = time.perf_counter()
        fill_edge(memory, folder)
        fill_s = time.perf_counter() - start
        print(f"  filled {len(image):,} pairs in {fill_s:.0f} s; building HNSW", file=sys.stderr, flush=True)
        start = time.perf_counter()
        store.index_pending(force=True)
        build_s = time.perf_counter() - start
        print(f"  HNSW built in {build_s:.0f} s; searching", file=sys.stderr, flush=True)
        singles = queries[: int(args["single"])]

        def timed(mem: Any, qs: np.ndarray, **kw: Any) -> tuple[list[float], list[list[int]]]:
            tops: list[list[int]] = []
            times = [time_one(lambda q: tops.append([_row_of(h.item_id) for h in mem.search(q, Modality.IMAGE, k,
                                                                                             **kw)]), q)
                     for q in qs]
            return times, tops

        memory.search(singles[0], Modality.IMAGE, k)  # warm the caches once
        curve = {}
        for ef in args["efs"]:
            times, tops = timed(memory.tuned(hnsw_ef=int(ef)), singles)
            curve[str(ef)] = {"single_s": times, "top": tops}
        batches = [queries[i * batch: (i + 1) * batch] for i in range(int(args["batches"]))]
        batch_s = [time_one(lambda b: memory.search_batch(b, Modality.IMAGE, k), b) for b in batches]
        filtered_s, filtered_top = timed(memory, singles, filters={"dataset": args.get("probe", "probe")})
        exact_s, exact_top = timed(memory.tuned(exact=True), singles[: int(args.get("exact_single", 10))])
        disk_mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        peak = peak_rss_mb()
        store.close()
        start = time.perf_counter()
        reopened = EdgeStore(root, layout)
        reopened.collection("bench").search(singles[0], Modality.IMAGE, k)
        reopen_s = time.perf_counter() - start
        reopened.close()
        return {"fill_s": fill_s, "upsert_pairs_per_s": len(image) / fill_s, "build_s": build_s, "curve": curve,
                "batch_s": batch_s, "filtered_s": filtered_s, "filtered_top": filtered_top, "exact_s": exact_s,
                "exact_top": exact_top, "reopen_s": reopen_s, "disk_mb": disk_mb, "rss_mb": rss_mb(),
                "peak_rss_mb": peak, "baseline_rss_mb": baseline, "rows": len(image)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


TASKS = {"exact": exact_task, "qdrant": qdrant_task, "edge": edge_task}


def main(argv: list[str]) -> None:
    task, args = argv[1], json.loads(argv[2])
    print(json.dumps(TASKS[task](args)), flush=True)


if __name__ == "__main__":
    main(sys.argv)
