"""Reduced-precision storage for the exact index: int8 rows (scalar quantization) and float16 rescoring.

Each row is stored as int8 codes and one float32 scale (``x ~ codes * scale``, ``scale = max|x| / 127``):
a quarter of float32's bytes, so 10M pairs (both 512-d matrices) take ~10 GiB instead of 41. Search
scores every row from the codes, keeps the best ``4k + 16`` candidates, and rescores them in float32
from the originals (a float16 or float32 matrix, normally memory-mapped on disk: only the candidates'
rows are read) when the index has them. Qdrant's scalar quantization works the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

QUANT_CHUNK = 65_536
HALF_RESCORE_EXTRA = 16  # float16: candidates beyond 2k taken before rescoring in float32


def rescore_width(k: int, total: int) -> int:
    """Candidates kept from the int8 scores before float rescoring."""
    return min(total, 4 * k + 16)


class Int8Matrix:
    """(n, d) int8 codes, (n,) float32 scales, optional float originals; rows read back as float32."""

    dtype = np.dtype(np.float32)  # what indexing returns

    def __init__(self, codes: np.ndarray, scales: np.ndarray, originals: np.ndarray | None = None) -> None:
        if codes.dtype != np.int8 or codes.ndim != 2 or len(scales) != len(codes):
            raise ValueError("int8 codes (n, d) and n scales expected")
        if originals is not None and originals.shape != codes.shape:
            raise ValueError("originals must have the codes' shape")
        self.codes, self.scales, self.originals = codes, np.asarray(scales, np.float32), originals

    @classmethod
    def quantize(cls, matrix: np.ndarray, *, keep_originals: bool = False) -> Int8Matrix:
        """Rows of ``matrix`` (normalised already) to codes, chunk by chunk (a memmap is never read whole)."""
        codes = np.empty(matrix.shape, np.int8)
        scales = np.empty(len(matrix), np.float32)
        for start in range(0, len(matrix), QUANT_CHUNK):
            block = np.asarray(matrix[start: start + QUANT_CHUNK], np.float32)
            codes[start: start + len(block)], scales[start: start + len(block)] = quantize_block(block)
        return cls(codes, scales, matrix if keep_originals else None)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows: Any) -> np.ndarray:
        if self.originals is not None:
            return np.asarray(self.originals[rows], np.float32)
        return cast(np.ndarray, self.codes[rows].astype(np.float32) * self.scales[rows][..., None])

    def block(
        self, start: int, stop: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of rows [start, stop) as ``dtype`` (exact: |code| <= 127 fits bfloat16) and their scales."""
        codes = torch.from_numpy(np.ascontiguousarray(self.codes[start:stop])).to(device)
        return codes.to(dtype), torch.from_numpy(self.scales[start:stop]).to(device)

    def rescore(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """float32 scores of each query against its candidate rows (n, w); None without originals."""
        if self.originals is None:
            return None
        flat = rows.clamp_min(0).reshape(-1).cpu().numpy()
        order = np.argsort(flat, kind="stable")  # sorted reads: a memory-mapped file is read in order
        vectors = np.empty((len(flat), self.codes.shape[1]), np.float32)
        vectors[order] = np.asarray(self.originals[flat[order]], np.float32)
        vec = torch.from_numpy(vectors).to(queries.device).reshape(*rows.shape, -1)
        return torch.einsum("nd,nwd->nw", queries.float(), vec)

    def save(self, folder: Path, name: str) -> None:
        np.save(folder / f"{name}.npy", self.codes)
        np.save(folder / f"{name}_scale.npy", self.scales)
        if self.originals is not None:
            np.save(folder / f"{name}_orig.npy", np.asarray(self.originals, np.float16))

    @classmethod
    def load(cls, folder: Path, name: str, mmap: bool) -> Int8Matrix:
        mode: Literal["c"] | None = "c" if mmap else None
        originals = folder / f"{name}_orig.npy"
        return cls(np.load(folder / f"{name}.npy", mmap_mode=mode, allow_pickle=False),
                   np.load(folder / f"{name}_scale.npy", allow_pickle=False),
                   np.load(originals, mmap_mode="r", allow_pickle=False) if originals.is_file() else None)


def quantize_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8, scales float32) of a float32 block; an all-zero row gets scale 1 and zero codes."""
    scales = np.abs(block).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(block / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def half_rescored_top(
    q: torch.Tensor, block: torch.Tensor, approx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of float16 scores, rescored in float32: candidates from ``approx``, exact dot products for them.

    ``approx`` (float16 product, rounded) already carries the masks as -inf. The float32 rescoring gives
    the scores the converting path computes (query . row upcast), so only the candidate set is approximate:
    2k + 16 candidates hold the true top-k unless scores tie to within float16 rounding (~1e-4 at 0.2).
    """
    width = min(approx.shape[1], 2 * k + HALF_RESCORE_EXTRA)
    cand = approx.topk(width, dim=1)
    vectors = block[cand.indices].float()  # (n, width, d): only the candidates are converted
    exact = torch.einsum("nd,nwd->nw", q.float(), vectors)
    exact = torch.where(torch.isinf(cand.values), cand.values, exact)
    best = exact.topk(min(k, width), dim=1)
    return best.values, cand.indices.gather(1, best.indices)
