"""One result per image. A memory holds one row per caption, so one image (Flickr8k: five captions) can come
back several times from a search; wherever results are shown or neighbours are handed to the fusion, each image
counts once, represented by its first (best-ranked) row.

:func:`first_per_image` is the rule for any ranked sequence (search hits, results, rows); every list-level
dedupe in the core calls it: :func:`app.memory.base.distinct_images` (the engines' ``distinct_images``
searches and online refinement), the serving service's results (one result per image, all its captions) and
the memory map (one point per image). :func:`first_rows_per_image` is the same rule over a whole batch of
exact-index neighbour rows at once (training and evaluation), vectorised in numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def first_per_image(items: Iterable[T], image_of: Callable[[T], Hashable]) -> list[T]:
    """The first item of each image, in the given order (rank the items first: the best row then stands for
    its image). ``image_of`` names an item's image (its image hash, or its own id when it has none)."""
    seen: set[Hashable] = set()
    kept: list[T] = []
    for item in items:
        image = image_of(item)
        if image not in seen:
            seen.add(image)
            kept.append(item)
    return kept


def first_rows_per_image(
    rows: np.ndarray, scores: np.ndarray, image_codes: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`first_per_image` for (n, width) neighbour rows of n queries at once: per query, the first
    (best-scoring, then lowest) row of each image, then the first ``k`` of those (row -1, score -inf pad).
    ``image_codes`` (n_rows,) gives rows of one image the same code."""
    n, width = rows.shape
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=-1)
    rows = np.take_along_axis(rows, order, 1)
    scores = np.take_along_axis(scores, order, 1)
    codes = np.where(rows >= 0, image_codes[np.maximum(rows, 0)], -1)
    by_code = np.argsort(codes, axis=1, kind="stable")  # stable: the earlier (better) row of a code comes first
    sorted_codes = np.take_along_axis(codes, by_code, 1)
    repeat = np.zeros_like(codes, dtype=bool)
    repeat[:, 1:] = sorted_codes[:, 1:] == sorted_codes[:, :-1]
    first = np.ones_like(repeat)
    np.put_along_axis(first, by_code, ~repeat, 1)
    keep = first & (rows >= 0)
    position = np.where(keep, np.arange(width)[None, :], width)
    chosen = np.sort(position, axis=1)[:, :k]
    if chosen.shape[1] < k:
        chosen = np.pad(chosen, ((0, 0), (0, k - chosen.shape[1])), constant_values=width)
    ok = chosen < width
    safe = np.minimum(chosen, width - 1)
    out_rows = np.where(ok, np.take_along_axis(rows, safe, 1), -1)
    out_scores = np.where(ok, np.take_along_axis(scores, safe, 1), -np.inf).astype(np.float32)
    return out_rows, out_scores
