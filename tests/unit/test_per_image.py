"""One result per image: the one rule (first_per_image) and its batched numpy form agree."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from app.memory.base import ItemPayload, SearchHit, distinct_images
from app.memory.per_image import first_per_image, first_rows_per_image


def test_first_per_image_keeps_the_first_of_each_image_in_order() -> None:
    items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]
    assert first_per_image(items, lambda item: item[0]) == [("a", 1), ("b", 2), ("c", 4)]
    assert first_per_image([], lambda item: item) == []


def test_distinct_images_ranks_then_keeps_one_hit_per_image() -> None:
    def hit(item_id: str, score: float, image: str | None) -> SearchHit:
        payload = None if image is None else ItemPayload(item_id=item_id, image_hash=image, caption=item_id)
        return SearchHit(item_id, score, payload)

    hits = [hit("1", 0.5, "x"), hit("2", 0.9, "x"), hit("3", 0.7, "y"), hit("4", 0.6, None), hit("5", 0.8, "y")]
    assert [h.item_id for h in distinct_images(hits, 10)] == ["2", "5", "4"]  # no payload: its own image
    assert [h.item_id for h in distinct_images(hits, 2)] == ["2", "5"]


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 20), k=st.integers(1, 8), n_images=st.integers(1, 6), seed=st.integers(0, 10_000),
       invalid=st.integers(0, 4))
def test_batched_form_is_the_rule_per_query(width: int, k: int, n_images: int, seed: int, invalid: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_images, size=30)
    rows = rng.choice(30, size=(3, width), replace=True)
    scores = np.round(rng.normal(size=(3, width)), 1).astype(np.float32)  # rounded: plenty of ties
    rows[:, width - min(invalid, width):] = -1
    scores[rows < 0] = -np.inf
    out_rows, out_scores = first_rows_per_image(rows, scores, codes, k)
    for q in range(3):
        ranked = sorted((-float(s), int(r)) for s, r in zip(scores[q], rows[q], strict=True) if r >= 0)
        expected = first_per_image(ranked, lambda pair: codes[pair[1]])[:k]
        got = [(-float(s), int(r)) for s, r in zip(out_scores[q], out_rows[q], strict=True) if r >= 0]
        assert got == expected
