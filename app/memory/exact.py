"""The exact in-RAM memory: :class:`ExactIndex`, the exact kNN of :mod:`app.memory.exact_knn` served as a
``VectorMemory`` (search, filters, pages, reads by id), with in-RAM writes for small memories, subsets and
its folder format (memory-mapped when loaded).

Training and batch evaluation search the whole memory for thousands of queries at once; its neighbours equal
Qdrant's on the same memory (tests/congruence/test_exact_vs_qdrant.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from app.memory.base import (
    Filters,
    ItemPayload,
    MemoryMatrices,
    MemoryRecord,
    MemoryStoreError,
    SearchHit,
    StoredPoint,
    parse_filters,
    search_distinct,
    sorted_hits,
)
from app.memory.exact_knn import SCORE_BUDGET, ExactKnn, Matrix, StorageDtype, normalised
from app.memory.payload_file import LazyPayloads, write_payloads
from app.memory.quantized import Int8Matrix
from app.schemas import Modality

FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION", "SCORE_BUDGET", "ExactIndex", "Matrix", "StorageDtype"]


class ExactIndex(ExactKnn):
    """Row-aligned ids, image and text matrices (L2-normalised), image hashes, optional payloads: exact
    search (:class:`~app.memory.exact_knn.ExactKnn`) and the ``VectorMemory`` contract over it."""

    @classmethod
    def from_matrices(cls, matrices: MemoryMatrices, **kwargs: object) -> ExactIndex:
        return cls(matrices.ids, matrices.image, matrices.text, matrices.image_hashes,
                   payloads=matrices.payloads, **kwargs)  # type: ignore[arg-type]

    # --- VectorMemory ------------------------------------------------------------------------
    @property
    def collection(self) -> str:
        return self.name

    def exists(self) -> bool:
        return True

    def _filter_mask(self, filters: Filters | None) -> np.ndarray | None:
        conditions = parse_filters(filters)
        if not conditions:
            return None
        if not self.payloads:
            raise ValueError("this exact index holds no payloads, so it cannot filter")
        mask = np.ones(len(self), bool)
        for cond in conditions:
            mask &= np.fromiter((cond.accepts(p) for p in self.payloads), bool, len(self))
        return mask

    def count(self, filters: Filters | None = None) -> int:
        mask = self._filter_mask(filters)
        return len(self.ids) if mask is None else int(mask.sum())

    def search(
        self,
        vector: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
        score_threshold: float | None = None,
        distinct_images: bool = False,
    ) -> list[SearchHit]:
        """Same contract as every ``VectorMemory`` (tests/congruence)."""
        def run(n: int) -> list[SearchHit]:
            return self.search_batch(np.atleast_2d(vector), modality, n, filters=filters,
                                     exclude_ids=[list(exclude_ids)], score_threshold=score_threshold)[0]

        return search_distinct(run, k) if distinct_images else run(k)

    def search_batch(
        self,
        vectors: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[Iterable[str]] | None = None,
        score_threshold: float | None = None,
    ) -> list[list[SearchHit]]:
        scores, rows = self.knn(vectors, modality, k, exclude_ids=exclude_ids, allowed=self._filter_mask(filters))
        floor = -np.inf if score_threshold is None else score_threshold
        return [
            sorted_hits([SearchHit(self.ids[r], float(s), self.payloads[r] if self.payloads else None)
                         for s, r in zip(q_scores, q_rows, strict=True) if r >= 0 and s >= floor])
            for q_scores, q_rows in zip(scores, rows, strict=True)
        ]

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[StoredPoint]:
        out = []
        for item_id in item_ids:
            row = self.row_of_id(item_id)
            if row is None:
                continue
            out.append(StoredPoint(
                item_id, self.payloads[row] if self.payloads else None,
                np.asarray(self._image[row], np.float32) if with_vectors else None,
                np.asarray(self._text[row], np.float32) if with_vectors else None))
        return out

    def existing_ids(self, item_ids: Sequence[str]) -> set[str]:
        return {i for i in item_ids if self.row_of_id(i) is not None}

    def scroll(
        self, *, filters: Filters | None = None, limit: int = 256, with_vectors: bool = False
    ) -> Iterator[list[StoredPoint]]:
        """Pages in id order, as the engines give them."""
        mask = self._filter_mask(filters)
        rows = sorted((r for r in range(len(self)) if mask is None or mask[r]), key=lambda r: self.ids[r])
        for start in range(0, len(rows), limit):
            yield self.retrieve([self.ids[r] for r in rows[start: start + limit]], with_vectors=with_vectors)

    def page(
        self, offset: str | None, limit: int, *, filters: Filters | None = None, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        mask = self._filter_mask(filters)
        ids = sorted(self.ids[r] for r in range(len(self)) if (mask is None or mask[r]) and
                     (offset is None or self.ids[r] >= offset))
        following = ids[limit] if len(ids) > limit else None
        return self.retrieve(ids[:limit], with_vectors=with_vectors), following

    def export_matrices(self, *, filters: Filters | None = None) -> MemoryMatrices:
        mask = self._filter_mask(filters)
        rows = np.arange(len(self)) if mask is None else np.flatnonzero(mask)
        return MemoryMatrices(
            ids=[self.ids[r] for r in rows], image=np.asarray(self._image[rows], np.float32),
            text=np.asarray(self._text[rows], np.float32), image_hashes=[self.image_hashes[r] for r in rows],
            payloads=[self.payloads[int(r)] for r in rows] if self.payloads else [])

    # --- writes (small in-RAM memories: tests, experiments; the engines serve real ones) ---------
    def _writable_rows(self) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self._image, Int8Matrix) or isinstance(self._text, Int8Matrix):
            raise MemoryStoreError("an int8 exact index is read-only: rebuild it from the engine")
        return np.asarray(self._image), np.asarray(self._text)

    def _replace_rows(self, ids: list[str], image: np.ndarray, text: np.ndarray, hashes: list[str],
                      payloads: list[ItemPayload]) -> None:
        self.ids, self.image_hashes, self.payloads = ids, hashes, payloads
        target = np.float16 if self.dtype == "float16" else np.float32
        self._image, self._text = image.astype(target, copy=False), text.astype(target, copy=False)
        self._version = None
        self._row_of_id = None
        self._image_codes = self._rows_of_code = self._code_of_hash = None

    def upsert(self, records: Sequence[MemoryRecord]) -> None:
        if not records:
            return
        image, text = self._writable_rows()
        ids, hashes, payloads = list(self.ids), list(self.image_hashes), list(self.payloads)
        if not payloads and ids:
            raise MemoryStoreError("this exact index holds no payloads: it cannot take new records")
        image = np.array(image, np.float32) if len(image) else np.zeros((0, len(records[0].image_vector)), np.float32)
        text = np.array(text, np.float32) if len(text) else np.zeros((0, len(records[0].text_vector)), np.float32)
        new_image: list[np.ndarray] = []
        new_text: list[np.ndarray] = []
        for record in records:
            v = normalised(np.asarray(record.image_vector, np.float32)[None])[0]
            t = normalised(np.asarray(record.text_vector, np.float32)[None])[0]
            row = self.row_of_id(record.item_id)
            if row is not None:
                image[row], text[row], payloads[row] = v, t, record.payload
                continue
            if self._row_of_id is not None:  # a second record of the same new id updates this row
                self._row_of_id[record.item_id] = len(ids)
            ids.append(record.item_id)
            hashes.append(record.payload.image_hash)
            payloads.append(record.payload)
            new_image.append(v)
            new_text.append(t)
        if new_image:
            image, text = np.concatenate([image, np.stack(new_image)]), np.concatenate([text, np.stack(new_text)])
        self._replace_rows(ids, image, text, hashes, payloads)

    def delete(self, item_ids: Sequence[str]) -> None:
        gone = {r for r in (self.row_of_id(i) for i in item_ids) if r is not None}
        if not gone:
            return
        image, text = self._writable_rows()
        keep = np.asarray([r for r in range(len(self)) if r not in gone], np.int64)
        self._replace_rows([self.ids[r] for r in keep], np.asarray(image[keep]), np.asarray(text[keep]),
                           [self.image_hashes[r] for r in keep],
                           [self.payloads[r] for r in keep] if self.payloads else [])

    # --- subsets and files -------------------------------------------------------------------
    def subset(self, rows: np.ndarray) -> ExactIndex:
        """A new index over ``rows`` (e.g. the memory minus near-duplicates of evaluation images)."""
        rows = np.asarray(rows, np.int64)
        return ExactIndex(
            [self.ids[r] for r in rows], np.asarray(self._image[rows]), np.asarray(self._text[rows]),
            [self.image_hashes[r] for r in rows],
            payloads=[self.payloads[r] for r in rows] if self.payloads else None,
            dtype=self.dtype, chunk=self.chunk, device=self.device, normalise=False,
        )

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, stored in (("image", self._image), ("text", self._text)):
            if isinstance(stored, Int8Matrix):
                stored.save(folder, name)
            else:
                np.save(folder / f"{name}.npy", stored)
        np.save(folder / "ids.npy", np.asarray(self.ids, dtype=str))
        np.save(folder / "image_hashes.npy", np.asarray(self.image_hashes, dtype=str))
        if self.payloads:
            write_payloads(folder / "payloads.jsonl", self.payloads)
        meta = {"format": FORMAT_VERSION, "count": len(self), "dim": self.dim, "dtype": self.dtype,
                "version": self.version}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(
        cls, folder: Path, *, mmap: bool = True, chunk: int = 262_144, device: str | torch.device = "cpu"
    ) -> ExactIndex:
        """Memory-mapped by default: opening a 1M-row memory costs no read until it is searched.

        Mapped copy-on-write ("c"): the arrays are writeable views of the file's pages, so search hands
        them to torch without a copy per chunk; nothing here writes to them, and a write would stay private.
        Payloads are parsed per row on first access (:class:`LazyPayloads`).
        """
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{folder}: unsupported exact-index format {meta.get('format')}")
        mode: Literal["c"] | None = "c" if mmap else None
        image, text = (Int8Matrix.load(folder, name, mmap) if meta["dtype"] == "int8"
                       else np.load(folder / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
                       for name in ("image", "text"))
        ids = np.load(folder / "ids.npy", allow_pickle=False).tolist()
        hashes = np.load(folder / "image_hashes.npy", allow_pickle=False).tolist()
        payload_file = folder / "payloads.jsonl"
        payloads = LazyPayloads(payload_file) if payload_file.is_file() else None
        return cls(ids, image, text, hashes, payloads=payloads, dtype=meta["dtype"], chunk=chunk, device=device,
                   version=meta["version"], normalise=False)
