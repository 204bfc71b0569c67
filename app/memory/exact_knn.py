"""Exact in-RAM kNN over the memory matrices: torch matmul + top-k, chunked over memory rows.

Training and batch evaluation search the whole memory for thousands of queries at once; this index
does it exactly (no approximation), so its neighbours equal Qdrant's on the same memory
(tests/congruence/test_exact_vs_qdrant.py). Rows are visited chunk by chunk (``chunk`` rows at a
time, each chunk read once per call) and a running top-k is merged, so 1M x 512 needs the matrices
(2 GiB each in float32, half in float16, memory-mapped from disk if wanted) plus one chunk of scores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import numpy as np
import torch

from app.memory.base import ItemPayload
from app.memory.payload_file import LazyPayloads
from app.memory.quantized import Int8Matrix, half_rescored_top, rescore_width
from app.schemas import Modality

StorageDtype = Literal["float32", "float16", "int8"]
Matrix = np.ndarray | Int8Matrix  # int8 rows read back as float32 (app/memory/quantized.py)
SCORE_BUDGET = 1 << 25  # query x row scores held at once (128 MiB in float32)
# Up to this many queries, float16 rows are multiplied as they are on CPU: one query is bound by memory
# bandwidth, and converting a whole chunk to float32 first costs ~10x the product (measured, docs/performance.md).
# The best candidates are then rescored in float32, so the scores equal those of the converting path.
HALF_DIRECT_MAX_QUERIES = 16
HALF_CONVERT_ROWS = 65_536  # more queries: float16 rows converted this many at a time (128 MiB, not 512)


def normalised(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; an all-zero row stays zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return cast(np.ndarray, (matrix / np.maximum(norms, 1e-12)).astype(np.float32, copy=False))


def _per_query(values: Sequence[Iterable[str] | str] | None, n: int, what: str) -> list[list[str]]:
    if values is None:
        return [[] for _ in range(n)]
    if len(values) != n:
        raise ValueError(f"{what}: one entry per query expected ({n}), got {len(values)}")
    return [[v] if isinstance(v, str) else list(v) for v in values]


def _ties_by_row(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equal scores in row order: top-k leaves ties in any order, callers get a deterministic one."""
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


class ExactKnn:
    """Row-aligned ids, image and text matrices (L2-normalised), image hashes, optional payloads, and the
    exact top-k over them; :class:`app.memory.exact.ExactIndex` serves it as a ``VectorMemory``."""

    def __init__(
        self,
        ids: Sequence[str],
        image: np.ndarray | Int8Matrix,
        text: np.ndarray | Int8Matrix,
        image_hashes: Sequence[str],
        *,
        payloads: Sequence[ItemPayload] | None = None,
        dtype: StorageDtype = "float32",
        chunk: int = 262_144,
        device: str | torch.device = "cpu",
        version: str | None = None,
        normalise: bool = True,
        collection: str = "exact",
    ) -> None:
        if not (len(ids) == len(image) == len(text) == len(image_hashes)):
            raise ValueError("ids, image, text and image_hashes must be row-aligned")
        if payloads and len(payloads) != len(ids):
            raise ValueError("payloads must be row-aligned with ids")
        self.ids = list(ids)
        self.image_hashes = list(image_hashes)
        self.payloads: Sequence[ItemPayload] = (
            payloads if isinstance(payloads, LazyPayloads) else list(payloads or []))
        self.dtype: StorageDtype = dtype
        self._image = self._storage(image, normalise)
        self._text = self._storage(text, normalise)
        self.chunk = max(1, int(chunk))
        self.device = torch.device(device)
        self._version = version
        self.name = collection
        self._row_of_id: dict[str, int] | None = None
        self._image_codes: np.ndarray | None = None
        self._rows_of_code: list[np.ndarray] | None = None
        self._code_of_hash: dict[str, int] | None = None

    def _storage(self, matrix: np.ndarray | Int8Matrix, normalise: bool) -> Matrix:
        if self.dtype == "int8":  # a memory-mapped float matrix stays on disk as the rescoring originals
            if isinstance(matrix, Int8Matrix):
                return matrix
            source = normalised(np.asarray(matrix, np.float32)) if normalise else matrix
            return Int8Matrix.quantize(source, keep_originals=isinstance(source, np.memmap))
        assert isinstance(matrix, np.ndarray)
        if normalise:
            matrix = normalised(np.asarray(matrix, np.float32))
        elif not isinstance(matrix, np.ndarray):
            matrix = np.asarray(matrix)
        target = np.float16 if self.dtype == "float16" else np.float32
        return matrix if matrix.dtype == target else matrix.astype(target)  # a memmap stays a memmap

    # --- shape and identity ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self._image.shape[1])

    def matrix(self, modality: Modality) -> Matrix:
        return self._image if Modality(modality) is Modality.IMAGE else self._text

    @property
    def version(self) -> str:
        """Names this memory's content (for checkpoints and the zero-shot cache)."""
        if self._version is None:
            digest = hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()[:16]
            self._version = f"exact:{len(self)}:{digest}"
        return self._version

    # --- lookups ------------------------------------------------------------------------------
    def row_of_id(self, item_id: str) -> int | None:
        if self._row_of_id is None:
            self._row_of_id = {item_id: row for row, item_id in enumerate(self.ids)}
        return self._row_of_id.get(item_id)

    @property
    def image_codes(self) -> np.ndarray:
        """(n,) int: rows with the same image hash share a code (several captions of one image)."""
        if self._image_codes is None:
            code_of: dict[str, int] = {}
            codes = np.fromiter((code_of.setdefault(h, len(code_of)) for h in self.image_hashes), np.int64,
                                len(self.image_hashes))
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(code_of) + 1))
            self._rows_of_code = [order[bounds[i]: bounds[i + 1]] for i in range(len(code_of))]
            self._code_of_hash, self._image_codes = code_of, codes
        return self._image_codes

    def rows_of_image_hash(self, image_hash: str) -> np.ndarray:
        self.image_codes  # noqa: B018 - builds the tables
        assert self._code_of_hash is not None and self._rows_of_code is not None
        code = self._code_of_hash.get(image_hash)
        return self._rows_of_code[code] if code is not None else np.zeros(0, np.int64)

    @property
    def max_rows_per_image(self) -> int:
        """Most captions any one image has here (Flickr8k: 5); bounds the over-fetch for dedupe."""
        if len(self) == 0:
            return 1
        return int(np.bincount(self.image_codes).max())

    def fetch_vectors(self, item_ids: Sequence[str], modality: Modality) -> np.ndarray:
        rows = [self.row_of_id(i) for i in item_ids]
        if any(r is None for r in rows):
            raise KeyError(f"unknown item ids: {[i for i, r in zip(item_ids, rows, strict=True) if r is None][:5]}")
        return np.asarray(self.matrix(modality)[np.asarray(rows, np.int64)], np.float32)

    # --- exact search --------------------------------------------------------------------------
    def _exclusion_pairs(
        self, n: int, exclude_ids: Sequence[Iterable[str] | str] | None,
        exclude_image_hashes: Sequence[Iterable[str] | str] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) pairs to mask, sorted by row so each chunk takes a contiguous slice."""
        queries: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        per_ids = _per_query(exclude_ids, n, "exclude_ids")
        per_hashes = _per_query(exclude_image_hashes, n, "exclude_image_hashes")
        for q, (ids, hashes) in enumerate(zip(per_ids, per_hashes, strict=True)):
            found = [r for r in (self.row_of_id(i) for i in ids) if r is not None]
            parts = [np.asarray(found, np.int64)] + [self.rows_of_image_hash(h) for h in hashes]
            q_rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            rows.append(q_rows)
            queries.append(np.full(len(q_rows), q, np.int64))
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        all_q, all_rows = np.concatenate(queries), np.concatenate(rows)
        order = np.argsort(all_rows, kind="stable")
        return all_q[order], all_rows[order]

    def _chunk_tensor(
        self, modality: Modality, start: int, stop: int, keep_half: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        stored = self.matrix(modality)
        if isinstance(stored, Int8Matrix):  # codes as bfloat16 (exact for |code| <= 127) or float16 on a GPU
            code_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
            return stored.block(start, stop, code_dtype, self.device)
        block = stored[start:stop]
        if not block.flags.writeable:  # memory-mapped read-only: torch wants its own copy
            block = np.array(block)
        tensor = torch.from_numpy(block).to(self.device)
        if tensor.dtype == torch.float16 and self.device.type == "cpu" and not keep_half:
            tensor = tensor.float()  # half matmul of many queries is slow on CPU; the chunk is converted only
        return tensor

    def knn(
        self,
        queries: np.ndarray,
        modality: Modality,
        k: int,
        *,
        exclude_ids: Sequence[Iterable[str] | str] | None = None,
        exclude_image_hashes: Sequence[Iterable[str] | str] | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows of ``modality`` for each query: (scores (n, k) float32, rows (n, k) int64).

        Scores are cosine similarities. ``exclude_ids`` / ``exclude_image_hashes`` give, per query,
        items and images that must not be returned (a training query's own item and exact duplicates).
        ``allowed`` (n_rows,) bool restricts every query to a subset. Missing results: row -1, score -inf.
        Equal scores come in row order.
        """
        q = torch.from_numpy(normalised(np.atleast_2d(np.asarray(queries, np.float32)))).to(self.device)
        n, total = len(q), len(self)
        int8 = isinstance(self._image, Int8Matrix)  # keeps 4k+16 candidates, rescored after the scan
        width = max(k, rescore_width(k, total)) if int8 else k
        best_scores = torch.full((n, width), -torch.inf, device=self.device)
        best_rows = torch.full((n, width), -1, dtype=torch.int64, device=self.device)
        if total == 0 or k == 0 or n == 0:
            return best_scores.cpu().numpy(), best_rows.cpu().numpy()
        pair_q, pair_rows = self._exclusion_pairs(n, exclude_ids, exclude_image_hashes)
        allowed_t = None if allowed is None else torch.from_numpy(np.asarray(allowed, bool)).to(self.device)
        keep_half = self.dtype == "float16" and self.device.type == "cpu" and n <= HALF_DIRECT_MAX_QUERIES
        converting = self.dtype == "float16" and self.device.type == "cpu" and not keep_half
        rows_per_chunk = min(self.chunk, HALF_CONVERT_ROWS) if converting else self.chunk
        for start in range(0, total, rows_per_chunk):
            stop = min(start + rows_per_chunk, total)
            block, scales = self._chunk_tensor(modality, start, stop, keep_half), None
            if isinstance(block, tuple):
                block, scales = block
            lo, hi = np.searchsorted(pair_rows, [start, stop])
            masked = (torch.from_numpy(pair_q[lo:hi]).to(self.device),
                      torch.from_numpy(pair_rows[lo:hi] - start).to(self.device))
            self._merge_chunk(q, block, start, masked, allowed_t, best_scores, best_rows, scales)
        if int8:
            best_scores, best_rows = self._rescored(q, modality, best_scores, best_rows, k)
        best_rows[torch.isinf(best_scores)] = -1
        return _ties_by_row(best_scores.cpu().numpy().astype(np.float32), best_rows.cpu().numpy())

    def _merge_chunk(
        self, q: torch.Tensor, block: torch.Tensor, start: int, masked: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None, best_scores: torch.Tensor, best_rows: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        k = best_scores.shape[1]
        step = max(1, SCORE_BUDGET // max(1, len(block)))
        mask_q, mask_rows = masked
        for qs in range(0, len(q), step):
            qe = min(qs + step, len(q))
            scores = (q[qs:qe].to(block.dtype) @ block.T).float()
            if scales is not None:  # int8 codes: one scale per row
                scores *= scales[None, :]
            if allowed is not None:
                scores[:, ~allowed[start: start + len(block)]] = -torch.inf
            in_batch = (mask_q >= qs) & (mask_q < qe)
            scores[mask_q[in_batch] - qs, mask_rows[in_batch]] = -torch.inf
            if block.dtype == torch.float16:
                top_values, top_rows = half_rescored_top(q[qs:qe], block, scores, k)
            else:
                top_values, top_rows = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores[qs:qe], top_values], dim=1)
            merged_rows = torch.cat([best_rows[qs:qe], top_rows + start], dim=1)
            keep = merged_scores.topk(k, dim=1)
            best_scores[qs:qe] = keep.values
            best_rows[qs:qe] = merged_rows.gather(1, keep.indices)

    def _rescored(
        self, q: torch.Tensor, modality: Modality, scores: torch.Tensor, rows: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """int8: the candidates rescored in float32 from the originals (when kept), then the top k."""
        stored = self.matrix(modality)
        exact = stored.rescore(q, rows) if isinstance(stored, Int8Matrix) else None
        if exact is not None:
            scores = torch.where(torch.isinf(scores), scores, exact)
        top = scores.topk(k, dim=1)
        return top.values, rows.gather(1, top.indices)
