"""Neighbour retrieval: the four search/fusion switches, dedupe by image, self-exclusion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.memory.base import ItemPayload
from app.memory.exact import ExactIndex
from app.memory.per_image import first_rows_per_image
from app.retrieval import (
    RetrievalCfg,
    find_neighbours,
    gather_embeddings,
    retrieve_online,
)
from app.schemas import Modality

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
CAPTIONS = 5  # Flickr8k: five captions per image


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def index() -> ExactIndex:
    rng = np.random.default_rng(0)
    n_images, d = 40, 16
    rows = np.repeat(np.arange(n_images), CAPTIONS)
    images = _unit(rng.normal(size=(n_images, d)))[rows]
    texts = _unit(rng.normal(size=(len(rows), d)))
    ids = [f"id{i}" for i in range(len(rows))]
    hashes = [f"img{r}" for r in rows]
    payloads = [ItemPayload(item_id=i, image_hash=h, caption=f"caption {j}")
                for j, (i, h) in enumerate(zip(ids, hashes, strict=True))]
    return ExactIndex(ids, images, texts, hashes, payloads=payloads)


@pytest.mark.parametrize(
    ("search", "fusion", "query", "searched", "fused"),
    [
        ("uni", "cross", IMAGE, IMAGE, TEXT),  # the paper: image->image search, neighbours' captions fused
        ("uni", "cross", TEXT, TEXT, IMAGE),
        ("cross", "cross", IMAGE, TEXT, TEXT),
        ("cross", "cross", TEXT, IMAGE, IMAGE),
        ("uni", "uni", IMAGE, IMAGE, IMAGE),
        ("uni", "uni", TEXT, TEXT, TEXT),
        ("cross", "uni", IMAGE, TEXT, IMAGE),
        ("cross", "uni", TEXT, IMAGE, TEXT),
    ],
)
def test_four_switches_search_and_fuse_the_right_matrices(
    index: ExactIndex, search: str, fusion: str, query: Modality, searched: Modality, fused: Modality
) -> None:
    cfg = RetrievalCfg(search, fusion, dedupe_by_image=False)  # type: ignore[arg-type]
    assert (cfg.searched(query), cfg.fused(query)) == (searched, fused)
    queries = _unit(np.random.default_rng(1).normal(size=(6, 16)))
    found = find_neighbours(index, queries, query, 4, cfg)
    np.testing.assert_array_equal(found.rows, index.knn(queries, searched, 4)[1])
    emb, valid = gather_embeddings(index, found.rows, cfg.fused(query))
    np.testing.assert_array_equal(emb[2, 1], index.matrix(fused)[found.rows[2, 1]])
    assert valid.all()


def test_default_is_uni_search_cross_fusion_with_dedupe() -> None:
    assert RetrievalCfg() == RetrievalCfg("uni", "cross", True)
    with pytest.raises(ValueError):
        RetrievalCfg("both", "cross")  # type: ignore[arg-type]


@pytest.mark.parametrize("query", [IMAGE, TEXT])
def test_dedupe_gives_k_distinct_images_represented_by_their_best_row(index: ExactIndex, query: Modality) -> None:
    queries = _unit(np.random.default_rng(2).normal(size=(8, 16)))
    k = 6
    found = find_neighbours(index, queries, query, k, RetrievalCfg())
    full_scores, full_rows = index.knn(queries, query, len(index))
    for q in range(len(queries)):
        images = [index.image_hashes[r] for r in found.rows[q]]
        assert len(set(images)) == k
        # the k best distinct images, each by its best-scoring row (lowest row on a tie)
        best: dict[str, tuple[float, int]] = {}
        for s, r in zip(full_scores[q], full_rows[q], strict=True):
            h = index.image_hashes[r]
            if h not in best or (s, -r) > (best[h][0], -best[h][1]):
                best[h] = (s, r)
        want = sorted(best.values(), key=lambda sr: (-sr[0], sr[1]))[:k]
        np.testing.assert_allclose(found.scores[q], [s for s, _ in want], atol=1e-6)
        if query is IMAGE:  # all captions of an image tie: the lowest row represents it
            assert all(r % CAPTIONS == 0 for r in found.rows[q])


def test_self_exclusion_drops_the_query_item_and_its_image(index: ExactIndex) -> None:
    rows = np.array([0, 7, 123])
    for query in (IMAGE, TEXT):
        found = find_neighbours(index, np.asarray(index.matrix(query)[rows]), query, 10, RetrievalCfg(),
                                exclude_ids=[index.ids[r] for r in rows],
                                exclude_image_hashes=[index.image_hashes[r] for r in rows])
        for q, r in enumerate(rows):
            assert r not in found.rows[q]
            assert index.image_hashes[r] not in {index.image_hashes[x] for x in found.rows[q]}


def test_online_retrieval_over_a_vector_memory_matches_the_batched_one(index: ExactIndex) -> None:
    queries = _unit(np.random.default_rng(3).normal(size=(5, 16)))
    for query in (IMAGE, TEXT):
        batched = find_neighbours(index, queries, query, 7, RetrievalCfg())
        for q in range(len(queries)):
            online = retrieve_online(index, queries[q], query, 7, RetrievalCfg())
            assert [h.item_id for h in online.hits] == [index.ids[r] for r in batched.rows[q]]
            np.testing.assert_array_equal(online.embeddings, index.matrix(RetrievalCfg().fused(query))[batched.rows[q]])


def test_fewer_distinct_images_than_k_leaves_invalid_slots() -> None:
    idx = ExactIndex(["a", "b", "c"], np.eye(3, 4), np.eye(3, 4), ["h1", "h1", "h2"])
    found = find_neighbours(idx, np.ones((1, 4), np.float32), IMAGE, 3, RetrievalCfg())
    assert found.valid.sum() == 2 and found.rows[0, 2] == -1
    emb, valid = gather_embeddings(idx, found.rows, TEXT)
    assert (emb[0, 2] == 0).all() and not valid[0, 2]


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 30), k=st.integers(1, 10), n_images=st.integers(1, 8), seed=st.integers(0, 10_000),
    invalid=st.integers(0, 5),
)
def test_dedupe_invariants(width: int, k: int, n_images: int, seed: int, invalid: int) -> None:
    rng = np.random.default_rng(seed)
    n_rows = 40
    codes = rng.integers(0, n_images, size=n_rows)
    rows = rng.choice(n_rows, size=(3, width), replace=True)
    scores = np.round(rng.normal(size=(3, width)), 1).astype(np.float32)  # rounded: plenty of ties
    rows[:, width - min(invalid, width):] = -1
    scores[rows < 0] = -np.inf
    out_rows, out_scores = first_rows_per_image(rows, scores, codes, k)
    assert out_rows.shape == out_scores.shape == (3, k)
    for q in range(3):
        got = out_rows[q][out_rows[q] >= 0]
        candidates = {(float(s), int(r)) for s, r in zip(scores[q], rows[q], strict=True) if r >= 0}
        assert len(got) == min(k, len({codes[r] for _, r in candidates}))
        assert len({codes[r] for r in got}) == len(got)  # distinct images
        assert (np.diff(out_scores[q][: len(got)]) <= 0).all()  # best first
        for r, s in zip(got, out_scores[q][: len(got)], strict=True):  # each image by its best row
            same = [(cs, cr) for cs, cr in candidates if codes[cr] == codes[r]]
            assert (s, r) == max(same, key=lambda sr: (sr[0], -sr[1]))
