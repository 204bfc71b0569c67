"""``reco bench search --stretch``: 10M pairs in one machine's RAM with int8 storage and float rescoring.

Writes a synthetic 10M-pair memory (random unit vectors, 512-d) as an int8 exact index: codes and
per-row scales (loaded, ~10 GiB for both matrices) plus float16 originals memory-mapped for rescoring
(~20 GiB on disk, only candidates are read). The exact float32 top-10 of the queries is computed while
the vectors are generated, before any rounding, so recall@10 is against the true neighbours. The index
is then searched in a fresh process (:mod:`programs.bench.child`): load time, single queries, one batch of 64
on each matrix, resident memory. Needs ~35 GB of free disk and ~14 GB of RAM; takes ~15 min on 2 vCPUs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.memory.exact import FORMAT_VERSION
from app.memory.quantized import quantize_block
from programs.bench.common import load_average, machine_info, percentile_ms, run_child, unit_vectors
from programs.bench.memory_files import CHUNK_ROWS, synthetic_hash, synthetic_id
from programs.bench.search import QUERY_SEED


def write_int8_memory(folder: Path, n: int, dim: int, queries: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The int8 index files under ``folder``; returns the exact float32 top-k rows of ``queries`` (image side)."""
    folder.mkdir(parents=True, exist_ok=True)
    q = torch.from_numpy(queries)
    best_scores = torch.full((len(q), k), -torch.inf)
    best_rows = torch.full((len(q), k), -1, dtype=torch.int64)
    for offset, name in enumerate(("image", "text")):
        codes = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.int8, shape=(n, dim))
        originals = np.lib.format.open_memmap(folder / f"{name}_orig.npy", mode="w+", dtype=np.float16,
                                              shape=(n, dim))
        scales = np.empty(n, np.float32)
        gen = torch.Generator().manual_seed(seed + offset)
        for start in range(0, n, CHUNK_ROWS):
            block = torch.nn.functional.normalize(torch.randn(min(CHUNK_ROWS, n - start), dim, generator=gen), dim=1)
            if name == "image":  # running exact top-k before any rounding: the ground truth
                top = (q @ block.T).topk(min(k, len(block)), dim=1)
                merged = torch.cat([best_scores, top.values], 1), torch.cat([best_rows, top.indices + start], 1)
                keep = merged[0].topk(k, dim=1)
                best_scores, best_rows = keep.values, merged[1].gather(1, keep.indices)
            stop = start + len(block)
            codes[start:stop], scales[start:stop] = quantize_block(block.numpy())
            originals[start:stop] = block.numpy().astype(np.float16)
        codes.flush()
        originals.flush()
        np.save(folder / f"{name}_scale.npy", scales)
        del codes, originals
    np.save(folder / "ids.npy", np.asarray([synthetic_id(r) for r in range(n)], dtype=str))
    np.save(folder / "image_hashes.npy", np.asarray([synthetic_hash(r) for r in range(n)], dtype=str))
    meta = {"format": FORMAT_VERSION, "count": n, "dim": dim, "dtype": "int8", "version": f"synthetic-int8:{n}"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return best_rows.numpy()


def run_stretch_bench(
    size: int = 10_000_000, *, dim: int = 512, k: int = 10, single: int = 3, batch: int = 64,
    workdir: Path | None = None,
) -> dict[str, Any]:
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-stretch-", dir=workdir))
    try:
        queries = unit_vectors(batch, dim, QUERY_SEED)
        np.save(root / "queries.npy", queries)
        truth = write_int8_memory(root / "index", size, dim, queries, k)
        measured = run_child("exact", {"folder": str(root / "index"), "queries": str(root / "queries.npy"), "k": k,
                                       "batch": batch, "single": single, "batches": 1, "mmap": True},
                             timeout_s=3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    found = measured["batch_top"][0]
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth.tolist(), strict=True)]))
    return {"size": size, "backend": "exact-int8", "recall_at_10": round(recall, 4), "queries": len(found),
            "load_s": round(measured["load_s"], 2), "single_p50_ms": percentile_ms(measured["single_s"], 50),
            "batch_s": round(measured["batch_s"][0], 2), "rss_mb": measured["rss_mb"],
            "peak_rss_mb": measured["peak_rss_mb"], "rescoring": "float16 originals, memory-mapped",
            "machine": info, "load_avg_end": load_average()}
