"""Every backend returns the same neighbours on the same memory (tie-aware, as qdrant-client's tests).

Exact comparisons: the exact index (the reference, what training and evaluation use), Qdrant Edge in exact
mode, our server backend over qdrant-client's API, and a real Qdrant server where one is available
(tests/fixtures/memories.py says when). Edge's HNSW must reach the recall goal on clustered vectors.
Two captions share each image, so image search is full of exact ties.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.memory.base import MemoryMatrices, MemoryRecord, VectorMemory
from app.memory.exact import ExactIndex
from app.memory.layout import MemoryLayout
from app.retrieval import RetrievalCfg, find_neighbours, retrieve_online
from app.schemas import Modality
from tests.fixtures.memories import assert_same_hits, make_records, open_backend, recall_at_k, unit

DIM, N_IMAGES, CAPTIONS = 24, 120, 2
COMPARED = ["edge-exact", "qdrant-api", "qdrant-server"]


def _matrices(records: list[MemoryRecord]) -> MemoryMatrices:
    ordered = sorted(records, key=lambda r: r.item_id)  # the engines export in id order
    return MemoryMatrices([r.item_id for r in ordered], np.stack([r.image_vector for r in ordered]),
                          np.stack([r.text_vector for r in ordered]), [r.payload.image_hash for r in ordered],
                          [r.payload for r in ordered])


@pytest.fixture(scope="module")
def records() -> list[MemoryRecord]:
    return make_records(N_IMAGES, CAPTIONS, DIM)


@pytest.fixture(scope="module")
def reference(records: list[MemoryRecord]) -> ExactIndex:
    return ExactIndex.from_matrices(_matrices(records), chunk=50)


@pytest.fixture(scope="module", params=COMPARED)
def other(request: pytest.FixtureRequest, records: list[MemoryRecord],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[VectorMemory]:
    with open_backend(request.param, tmp_path_factory.mktemp(request.param), DIM, records=records) as memory:
        yield memory


def _queries(reference: ExactIndex, modality: Modality, n: int = 14) -> list[np.ndarray]:
    rng = np.random.default_rng(11)  # half are memory rows (exact hits, ties), half random directions
    return [np.asarray(reference.matrix(modality)[q * 13]) if q % 2 else rng.normal(size=DIM).astype(np.float32)
            for q in range(n)]


def _matches(payload_value: object, wanted: object) -> bool:
    return payload_value in (wanted if isinstance(wanted, list) else [wanted])


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.TEXT])
@pytest.mark.parametrize("case", ["plain", "filtered", "extra-field", "excluded", "threshold"])
def test_same_top_k(reference: ExactIndex, other: VectorMemory, records: list[MemoryRecord],
                    modality: Modality, case: str) -> None:
    filters = {"filtered": {"dataset": ["birds", "cars"], "split": "train"},
               "extra-field": {"extra.colour": "red"}}.get(case)
    for q, query in enumerate(_queries(reference, modality)):
        excluded = [reference.ids[q * 13], reference.ids[q * 13 + 1]] if case == "excluded" else []
        threshold = 0.1 if case == "threshold" else None
        want = reference.search(query, modality, 10, filters=filters, exclude_ids=excluded, score_threshold=threshold)
        got = other.search(query, modality, 10, filters=filters, exclude_ids=excluded, score_threshold=threshold)
        assert not set(excluded) & {h.item_id for h in got + want}
        assert_same_hits(got, want, records, query, modality)
        if filters:
            assert got and all(h.payload and all(_matches(h.payload.value_of(k), v) for k, v in filters.items())
                               for h in got)
    assert other.count(filters={"extra.colour": "red"}) == reference.count(filters={"extra.colour": "red"})


def test_batch_search_agrees(reference: ExactIndex, other: VectorMemory, records: list[MemoryRecord]) -> None:
    queries = np.stack(_queries(reference, Modality.TEXT))
    excluded = [[reference.ids[q]] for q in range(len(queries))]
    want = reference.search_batch(queries, Modality.TEXT, 8, filters={"split": "train"}, exclude_ids=excluded)
    got = other.search_batch(queries, Modality.TEXT, 8, filters={"split": "train"}, exclude_ids=excluded)
    for query, a, b in zip(queries, got, want, strict=True):
        assert_same_hits(a, b, records, query, Modality.TEXT)


@pytest.mark.parametrize("query_modality", [Modality.IMAGE, Modality.TEXT])
def test_deduplicated_neighbours_agree(reference: ExactIndex, other: VectorMemory, query_modality: Modality) -> None:
    """The batched exact path (training) and the online engine path (serving) pick the same images."""
    queries = unit(np.random.default_rng(5).normal(size=(10, DIM)))
    batched = find_neighbours(reference, queries, query_modality, 6, RetrievalCfg())
    fused = RetrievalCfg().fused(query_modality)
    for q in range(len(queries)):
        online = retrieve_online(other, queries[q], query_modality, 6, RetrievalCfg())
        assert [reference.image_hashes[r] for r in batched.rows[q]] == [h.payload.image_hash for h in online.hits
                                                                        if h.payload]
        np.testing.assert_allclose(batched.scores[q], [h.score for h in online.hits], rtol=1e-4, atol=1e-5)
        # rows are in id order and ties go to the lowest id everywhere: the same representative row
        np.testing.assert_allclose(online.embeddings, reference.matrix(fused)[batched.rows[q]], atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_edge_hnsw_recall(tmp_path: Path, int8: bool) -> None:
    """HNSW (and int8 with rescoring) after indexing, on clustered vectors: recall@10 >= 0.95 vs exact."""
    records = make_records(3000, 1, 64, seed=2, clusters=40)
    layout = MemoryLayout(indexing_threshold=500, int8=int8)
    with open_backend("edge", tmp_path, 64, layout, records) as edge:
        store = edge.store  # type: ignore[attr-defined]
        store.index_pending()
        assert store.unindexed_points() == {edge.collection: 0}
        exact = ExactIndex.from_matrices(_matrices(records))
        queries = unit(np.stack([r.image_vector for r in records[:200:4]])
                       + 0.3 * np.random.default_rng(1).normal(size=(50, 64)))
        for modality in (Modality.IMAGE, Modality.TEXT):
            want = exact.search_batch(queries, modality, 10)
            assert recall_at_k(edge.search_batch(queries, modality, 10), want) >= 0.95
            birds = {"dataset": "birds"}
            assert recall_at_k(edge.search_batch(queries, modality, 10, filters=birds),
                               exact.search_batch(queries, modality, 10, filters=birds)) >= 0.95
