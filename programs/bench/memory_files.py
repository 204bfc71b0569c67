"""Synthetic memories on disk, in :meth:`ExactIndex.save`'s format, written without holding them in RAM.

Random unit vectors (seeded), one image per pair, a short payload per row. Vector search cost does not
depend on what the vectors mean; recall does (random vectors are the hard case: no clusters, small gaps
between neighbours), which the reports say. Sizes that share a seed are prefixes of one another, so
recall and neighbours compare across sizes and storage types.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from app.memory.exact import FORMAT_VERSION

CHUNK_ROWS = 65_536
DTYPES = {"float32": np.float32, "float16": np.float16}


def synthetic_id(row: int) -> str:
    """A UUID-shaped id per row (Qdrant accepts UUIDs; the uuid module would take ~2 s per million)."""
    return f"{row:08x}-0000-4000-8000-{row:012x}"


def synthetic_hash(row: int) -> str:
    return f"{row:064x}"


def _payload_line(row: int) -> str:
    item_id, image_hash = synthetic_id(row), synthetic_hash(row)
    return json.dumps({"item_id": item_id, "image_hash": image_hash, "caption": f"synthetic caption {row}",
                       "dataset": "synthetic", "split": "train", "source": f"synthetic/{row}.jpg", "label": None,
                       "extra": {}})


def memory_folder(root: Path, size: int, dtype: str) -> Path:
    return Path(root) / f"n{size}" / dtype


def write_synthetic_memories(
    root: Path, sizes: Sequence[int], dim: int = 512, *, seed: int = 0, dtypes: Sequence[str] = ("float32",),
    payloads: bool = True,
) -> dict[tuple[int, str], Path]:
    """One saved exact index per (size, dtype) under ``root``; generated chunk by chunk, once for all sizes."""
    sizes = sorted(set(int(s) for s in sizes))
    folders = {(n, dt): memory_folder(root, n, dt) for n in sizes for dt in dtypes}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        (n, dt, name): np.lib.format.open_memmap(folders[(n, dt)] / f"{name}.npy", mode="w+", dtype=DTYPES[dt],
                                                 shape=(n, dim))
        for n in sizes for dt in dtypes for name in ("image", "text")
    }
    generators = {"image": torch.Generator().manual_seed(seed), "text": torch.Generator().manual_seed(seed + 1)}
    for start in range(0, sizes[-1], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, sizes[-1])
        for name, gen in generators.items():
            block = torch.nn.functional.normalize(torch.randn(stop - start, dim, generator=gen), dim=1).numpy()
            for (n, _dtype, which), array in arrays.items():
                if which == name and start < n:
                    array[start: min(stop, n)] = block[: min(stop, n) - start]
    for array in arrays.values():
        array.flush()
    del arrays
    for (n, dt), folder in folders.items():
        _write_rows(folder, n, dt, dim, payloads)
    return folders


def _write_rows(folder: Path, n: int, dtype: str, dim: int, payloads: bool) -> None:
    np.save(folder / "ids.npy", np.asarray([synthetic_id(r) for r in range(n)], dtype=str))
    np.save(folder / "image_hashes.npy", np.asarray([synthetic_hash(r) for r in range(n)], dtype=str))
    if payloads:
        with (folder / "payloads.jsonl").open("w") as out:
            for start in range(0, n, CHUNK_ROWS):
                out.write("\n".join(_payload_line(r) for r in range(start, min(start + CHUNK_ROWS, n))) + "\n")
    meta = {"format": FORMAT_VERSION, "count": n, "dim": dim, "dtype": dtype, "version": f"synthetic:{n}"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
