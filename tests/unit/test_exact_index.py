"""The exact index returns exactly the brute-force neighbours, with exclusion, chunking, float16 and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.memory.base import ItemPayload, VectorMemory
from app.memory.exact import ExactIndex
from app.schemas import Modality


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _index(n: int = 300, d: int = 16, captions_per_image: int = 3, seed: int = 0, **kw: object) -> ExactIndex:
    rng = np.random.default_rng(seed)
    images = _unit(rng.normal(size=(n // captions_per_image + 1, d)))
    image_of_row = np.arange(n) // captions_per_image
    ids = [f"id-{i}" for i in range(n)]
    hashes = [f"img-{r}" for r in image_of_row]
    payloads = [ItemPayload(item_id=i, image_hash=h, caption=f"c{j}", dataset="a" if j % 2 else "b")
                for j, (i, h) in enumerate(zip(ids, hashes, strict=True))]
    return ExactIndex(ids, images[image_of_row], _unit(rng.normal(size=(n, d))), hashes, payloads=payloads, **kw)


def _brute(index: ExactIndex, queries: np.ndarray, modality: Modality, k: int,
           banned: list[set[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    scores = _unit(queries) @ np.asarray(index.matrix(modality), np.float32).T
    for q, rows in enumerate(banned or []):
        scores[q, list(rows)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    order = np.where(np.isfinite(top), order, -1)
    pad = k - order.shape[1]  # fewer rows than k: the index pads with row -1, score -inf
    widths = ((0, 0), (0, pad))
    return np.pad(top, widths, constant_values=-np.inf), np.pad(order, widths, constant_values=-1)


def _assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], atol: float = 1e-5) -> None:
    """Tie-aware: scores equal in order; rows equal wherever the score is not tied with a neighbour."""
    (gs, gr), (ws, wr) = got, want
    np.testing.assert_allclose(gs, ws, atol=atol)
    for q in range(len(gs)):
        finite = np.isfinite(ws[q])
        assert (gr[q][~finite] == -1).all() and (gr[q][finite] >= 0).all()
        if len(np.unique(np.round(ws[q][finite], 5))) == finite.sum():
            assert gr[q][finite].tolist() == wr[q][finite].tolist()


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.TEXT])
def test_knn_equals_brute_force_for_any_chunking(chunk: int, modality: Modality) -> None:
    index = _index(chunk=chunk)
    queries = np.random.default_rng(1).normal(size=(25, 16)).astype(np.float32)
    _assert_same(index.knn(queries, modality, 9), _brute(index, queries, modality, 9))


def test_exclusion_removes_own_item_and_every_row_of_the_same_image() -> None:
    index = _index()
    rows = [0, 10, 200]
    queries = np.asarray(index.matrix(Modality.IMAGE)[rows])  # the query is the memory row itself
    scores, found = index.knn(queries, Modality.IMAGE, 5, exclude_ids=[[index.ids[r]] for r in rows],
                              exclude_image_hashes=[[index.image_hashes[r]] for r in rows])
    for q, r in enumerate(rows):
        assert index.ids[r] not in {index.ids[x] for x in found[q]}
        assert index.image_hashes[r] not in {index.image_hashes[x] for x in found[q]}
        assert scores[q, 0] < 0.999  # its own image (similarity 1) is gone
    unexcluded = index.knn(queries, Modality.IMAGE, 3)[1]
    assert {index.image_hashes[x] for x in unexcluded[0]} == {index.image_hashes[0]}  # 3 captions of itself


def test_more_neighbours_asked_than_rows_pads_with_minus_one() -> None:
    index = _index(n=6)
    scores, rows = index.knn(np.ones((2, 16), np.float32), Modality.TEXT, 10, exclude_ids=[["id-0"], []])
    assert (rows[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all() and (rows[1, :6] >= 0).all()
    assert (rows[1, 6:] == -1).all()


def test_float16_storage_keeps_the_neighbours() -> None:
    exact, half = _index(), _index(dtype="float16", chunk=50)
    assert half.matrix(Modality.IMAGE).dtype == np.float16
    queries = np.random.default_rng(2).normal(size=(20, 16)).astype(np.float32)
    want = _brute(exact, queries, Modality.TEXT, 5)
    got = half.knn(queries, Modality.TEXT, 5)
    np.testing.assert_allclose(got[0], want[0], atol=2e-3)
    assert (got[1][:, 0] == want[1][:, 0]).mean() > 0.9


def test_save_and_memory_mapped_load_round_trip(tmp_path: Path) -> None:
    index = _index()
    index.save(tmp_path / "idx")
    loaded = ExactIndex.load(tmp_path / "idx", mmap=True, chunk=40)
    assert isinstance(loaded.matrix(Modality.IMAGE), np.memmap)
    assert loaded.ids == index.ids and loaded.image_hashes == index.image_hashes
    assert loaded.payloads == index.payloads and loaded.version == index.version
    queries = np.random.default_rng(3).normal(size=(10, 16)).astype(np.float32)
    _assert_same(loaded.knn(queries, Modality.IMAGE, 4), index.knn(queries, Modality.IMAGE, 4))


def test_search_is_a_vector_memory_with_filters_and_exclusion() -> None:
    memory: VectorMemory = _index()
    vector = np.asarray(_index().matrix(Modality.TEXT)[5])
    hits = memory.search(vector, Modality.TEXT, 3)
    assert hits[0].item_id == "id-5" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload is not None and hits[0].payload.caption == "c5"
    assert "id-5" not in {h.item_id for h in memory.search(vector, Modality.TEXT, 3, exclude_ids=["id-5"])}
    filtered = memory.search(vector, Modality.TEXT, 10, filters={"dataset": "b"})
    assert len(filtered) == 10 and all(h.payload and h.payload.dataset == "b" for h in filtered)
    assert memory.count() == 300


def test_subset_and_fetch_vectors() -> None:
    index = _index()
    sub = index.subset(np.arange(0, 300, 2))
    assert len(sub) == 150 and sub.ids[1] == "id-2"
    np.testing.assert_array_equal(sub.fetch_vectors(["id-4"], Modality.TEXT), index.fetch_vectors(["id-4"], "text"))
    assert index.max_rows_per_image == 3
    with pytest.raises(KeyError):
        index.fetch_vectors(["nope"], Modality.IMAGE)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40), k=st.integers(1, 12), chunk=st.integers(1, 50), seed=st.integers(0, 10_000),
    n_banned=st.integers(0, 5),
)
def test_knn_property_matches_numpy(n: int, k: int, chunk: int, seed: int, n_banned: int) -> None:
    rng = np.random.default_rng(seed)
    d = 8
    index = ExactIndex([f"i{j}" for j in range(n)], rng.normal(size=(n, d)), rng.normal(size=(n, d)),
                       [f"h{j // 2}" for j in range(n)], chunk=chunk)
    queries = rng.normal(size=(3, d)).astype(np.float32)
    banned_ids = [list(rng.choice(n, size=min(n, n_banned), replace=False)) for _ in range(3)]
    got = index.knn(queries, Modality.IMAGE, k, exclude_ids=[[f"i{j}" for j in b] for b in banned_ids])
    _assert_same(got, _brute(index, queries, Modality.IMAGE, k, [set(b) for b in banned_ids]))
