"""Qdrant (local mode) and the exact index return the same neighbours on the same memory.

Tie-aware, as qdrant-client's congruence tests: scores agree within rel 1e-4 position by position;
ids agree as sets inside every group of tied scores, and every returned id really has its score.
Two captions share each image, so image search is full of exact ties.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from qdrant_client import QdrantClient

from app.memory.base import ItemPayload, MemoryRecord, SearchHit, item_id_for
from app.memory.exact import ExactIndex
from app.memory.qdrant import QdrantMemory
from app.retrieval import RetrievalCfg, find_neighbours, retrieve_online
from app.schemas import Modality

DIM, N_IMAGES, CAPTIONS = 24, 120, 2
REL = 1e-4


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def memories() -> Iterator[tuple[QdrantMemory, ExactIndex]]:
    rng = np.random.default_rng(7)
    images = _unit(rng.normal(size=(N_IMAGES, DIM)))
    records = []
    for row in range(N_IMAGES * CAPTIONS):
        image_sha = f"{row // CAPTIONS:064x}"
        caption = f"caption {row}"
        payload = ItemPayload(item_id=item_id_for(image_sha, caption), image_hash=image_sha, caption=caption,
                              dataset="d", split="train")
        records.append(MemoryRecord(payload, images[row // CAPTIONS], _unit(rng.normal(size=DIM))))
    client = QdrantClient(location=":memory:")
    qdrant = QdrantMemory(client, "reco__congruence")
    qdrant.ensure(DIM)
    qdrant.upsert(records)
    exact = ExactIndex.from_matrices(qdrant.export_matrices(), chunk=50)
    yield qdrant, exact
    client.close()


def _true_score(exact: ExactIndex, item_id: str, query: np.ndarray, modality: Modality) -> float:
    return float(exact.fetch_vectors([item_id], modality)[0] @ _unit(query))


def compare_hits(a: list[SearchHit], b: list[SearchHit], exact: ExactIndex, query: np.ndarray,
                 modality: Modality) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=REL, atol=1e-6)
    for hit in a + b:  # an id returned with a score it does not have would pass the score check alone
        assert _true_score(exact, hit.item_id, query, modality) == pytest.approx(hit.score, rel=REL, abs=1e-6)
    start = 0
    while start < len(a):
        end = start
        while end < len(a) and abs(a[end].score - a[start].score) <= 1e-5:
            end += 1
        if end < len(a):  # a complete tie group (the last may be cut by k differently): same ids
            assert {h.item_id for h in a[start:end]} == {h.item_id for h in b[start:end]}
        start = end


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.TEXT])
@pytest.mark.parametrize("exclude", [False, True])
def test_search_returns_the_same_neighbours(
    memories: tuple[QdrantMemory, ExactIndex], modality: Modality, exclude: bool
) -> None:
    qdrant, exact = memories
    rng = np.random.default_rng(11)
    for q in range(15):
        # half the queries are memory rows themselves (exact hits and ties), half random directions
        query = np.asarray(exact.matrix(modality)[q * 13]) if q % 2 else rng.normal(size=DIM).astype(np.float32)
        excluded = [exact.ids[q * 13], exact.ids[q * 13 + 1]] if exclude else []
        got = exact.search(query, modality, 10, exclude_ids=excluded)
        want = qdrant.search(query, modality, 10, exclude_ids=excluded)
        assert not set(excluded) & {h.item_id for h in got + want}
        compare_hits(got, want, exact, query, modality)


@pytest.mark.parametrize("query_modality", [Modality.IMAGE, Modality.TEXT])
def test_deduplicated_neighbours_agree(memories: tuple[QdrantMemory, ExactIndex], query_modality: Modality) -> None:
    """The batched exact path (training) and the online Qdrant path (serving) pick the same images."""
    qdrant, exact = memories
    queries = _unit(np.random.default_rng(5).normal(size=(10, DIM)))
    batched = find_neighbours(exact, queries, query_modality, 6, RetrievalCfg())
    for q in range(len(queries)):
        online = retrieve_online(qdrant, queries[q], query_modality, 6, RetrievalCfg())
        assert [exact.image_hashes[r] for r in batched.rows[q]] == [h.payload.image_hash for h in online.hits
                                                                    if h.payload]
        np.testing.assert_allclose(batched.scores[q], [h.score for h in online.hits], rtol=REL, atol=1e-6)
        fused = RetrievalCfg().fused(query_modality)
        if fused is Modality.TEXT:  # the representative caption may differ only on an exact tie
            assert all(exact.row_of_id(h.item_id) is not None for h in online.hits)
        else:
            np.testing.assert_allclose(online.embeddings, exact.matrix(fused)[batched.rows[q]], atol=1e-5)
