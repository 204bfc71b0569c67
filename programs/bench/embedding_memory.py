"""Embedding-like memories for ``reco bench search``: the base encoder's real embeddings, grown by perturbation.

Recall depends on how vectors cluster, so the engine is measured on what it will hold. The real part is
every captioned pair of Flickr8k and Clothing-10 (~41k pairs over ~9k images) encoded by the configured
encoder (cached like ``reco reproduce``).
Past that size, row ``r`` is real pair ``r mod R`` plus Gaussian noise of norm ``NOISE_NORM`` (about 0.93
cosine to its origin), re-normalised: the copies keep the real clusters and the real gaps between them
while no two rows coincide. Queries are the image embeddings of 2 % of the images (chosen by a seeded
draw), whose pairs are kept out of every memory, as new uploads would be. Every 100th row carries the
dataset ``probe`` (1 % of the points) for the filtered measurement.

Folders use :meth:`ExactIndex.save`'s format, so every backend loads the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np

from app.memory.exact import FORMAT_VERSION
from programs.bench.memory_files import CHUNK_ROWS, DTYPES, memory_folder, synthetic_hash, synthetic_id

DATASETS = ("flickr8k", "clothing10")  # captioned pairs: 40,455 + 800 (the other sets are mostly uncaptioned test rows)
NOISE_NORM = 0.4
QUERY_FRACTION = 0.02
PROBE_EVERY = 100  # one row in 100 is in the dataset "probe": the filtered search's 1 %
PROBE = "probe"


def real_pairs(encode: Callable[[Path], object], data_root: Path,
               datasets: Sequence[str] = DATASETS, seed: int = 7) -> dict[str, np.ndarray | list[str]]:
    """(image, text) embeddings of every captioned pair, their dataset, and the held-out query images."""
    images, texts, names, queries = [], [], [], []
    rng = np.random.default_rng(seed)
    for name in datasets:
        folder = Path(data_root) / name
        if not (folder / "manifest.csv").is_file():
            continue
        data = encode(folder)
        owner = np.asarray(data.caption_image)  # type: ignore[attr-defined]
        used = np.unique(owner)
        held = used[rng.random(len(used)) < QUERY_FRACTION]
        keep = ~np.isin(owner, held)
        images.append(np.asarray(data.image_emb, np.float32)[owner[keep]])  # type: ignore[attr-defined]
        texts.append(np.asarray(data.text_emb, np.float32)[keep])  # type: ignore[attr-defined]
        names += [name] * int(keep.sum())
        queries.append(np.asarray(data.image_emb, np.float32)[held])  # type: ignore[attr-defined]
    if not images:
        raise FileNotFoundError(f"no dataset of {list(datasets)} under {data_root}")
    return {"image": np.concatenate(images), "text": np.concatenate(texts), "dataset": names,
            "queries": np.concatenate(queries)}


def _grow(real: np.ndarray, start: int, stop: int, seed: int) -> np.ndarray:
    """Rows ``start..stop``: the real row for r < R, a perturbed copy after."""
    n_real, dim = real.shape
    rows = np.arange(start, stop)
    block = real[rows % n_real].copy()
    copies = rows >= n_real
    if copies.any():
        rng = np.random.default_rng([seed, start])
        noise = rng.standard_normal((int(copies.sum()), dim)).astype(np.float32) * (NOISE_NORM / np.sqrt(dim))
        grown = block[copies] + noise
        block[copies] = grown / np.linalg.norm(grown, axis=1, keepdims=True)
    return cast(np.ndarray, block)


def dataset_of(row: int, names: Sequence[str]) -> str:
    return PROBE if row % PROBE_EVERY == 0 else names[row % len(names)]


def write_embedding_memories(root: Path, sizes: Sequence[int], pairs: dict[str, np.ndarray | list[str]], *,
                             seed: int = 0, dtypes: Sequence[str] = ("float32",)) -> dict[tuple[int, str], Path]:
    """One saved exact index per (size, dtype) under ``root``; sizes are prefixes of one another."""
    image, text = np.asarray(pairs["image"]), np.asarray(pairs["text"])
    names = list(pairs["dataset"])
    dim = image.shape[1]
    sizes = sorted({int(s) for s in sizes})
    folders = {(n, dt): memory_folder(root, n, dt) for n in sizes for dt in dtypes}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    arrays = {(n, dt, which): np.lib.format.open_memmap(folders[(n, dt)] / f"{which}.npy", mode="w+",
                                                        dtype=DTYPES[dt], shape=(n, dim))
              for n in sizes for dt in dtypes for which in ("image", "text")}
    for start in range(0, sizes[-1], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, sizes[-1])
        blocks = {"image": _grow(image, start, stop, seed), "text": _grow(text, start, stop, seed + 1)}
        for (n, _dt, which), array in arrays.items():
            if start < n:
                array[start: min(stop, n)] = blocks[which][: min(stop, n) - start]
    for array in arrays.values():
        array.flush()
    del arrays
    for (n, dt), folder in folders.items():
        np.save(folder / "ids.npy", np.asarray([synthetic_id(r) for r in range(n)], dtype=str))
        np.save(folder / "image_hashes.npy", np.asarray([synthetic_hash(r) for r in range(n)], dtype=str))
        with (folder / "payloads.jsonl").open("w") as out:
            for r in range(n):
                out.write(json.dumps({"item_id": synthetic_id(r), "image_hash": synthetic_hash(r),
                                      "caption": f"pair {r}", "dataset": dataset_of(r, names), "split": "train",
                                      "source": f"bench/{r}.jpg", "label": None, "extra": {}}) + "\n")
        meta = {"format": FORMAT_VERSION, "count": n, "dim": dim, "dtype": dt, "version": f"embeddings:{n}"}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folders


def exact_truth(folder: Path, queries: np.ndarray, k: int, *, probe_only: bool = False) -> list[list[int]]:
    """Brute-force top-k row numbers (float32), optionally among the ``probe`` rows only."""
    image = np.load(folder / "image.npy", mmap_mode="r")
    n = len(image)
    rows = np.arange(0, n, PROBE_EVERY) if probe_only else None
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for lo in range(0, n if rows is None else len(rows), CHUNK_ROWS):
        idx = np.arange(lo, min(lo + CHUNK_ROWS, n)) if rows is None else rows[lo: lo + CHUNK_ROWS]
        scores = queries @ np.asarray(image[idx], np.float32).T
        cand_s = np.concatenate([best_s, scores], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(idx, scores.shape)], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_i.tolist()
