"""Every memory backend serves the same ``VectorMemory`` operations with the same meaning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.memory.base import (
    ItemPayload,
    MemoryRecord,
    MemoryStoreError,
    UnknownFilterField,
    item_id_for,
    parse_filters,
)
from app.schemas import Modality
from tests.fixtures.memories import BACKENDS, make_records, open_backend

DIM = 16
LOCAL = [b for b in BACKENDS if b != "qdrant-server"]  # the server joins in tests/congruence


@pytest.fixture(params=LOCAL)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_item_id_is_deterministic_and_caption_sensitive() -> None:
    assert item_id_for("ab" * 32, "a dog") == item_id_for("ab" * 32, "a dog")
    assert item_id_for("ab" * 32, "a dog") != item_id_for("ab" * 32, "a cat")


def test_writes_reads_filters(backend: str, tmp_path: Path) -> None:
    records = make_records(10, 2, DIM)
    with open_backend(backend, tmp_path, DIM) as memory:
        memory.upsert(records)
        memory.upsert(records[:5])  # idempotent: ids come from content
        assert memory.count() == 20
        assert memory.count({"dataset": "birds"}) == 7
        assert memory.count({"label": [0, 1]}) == 8
        assert memory.count({"extra.colour": "red"}) == 10
        assert memory.count({"item_id": [records[0].item_id, "not-an-id"]}) == 1
        query = records[3].text_vector
        hits = memory.search(query, Modality.TEXT, 5)
        assert hits[0].item_id == records[3].item_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].payload is not None and hits[0].payload.extra == {"colour": "blue", "shot": 3}
        assert all(h.payload and h.payload.dataset == "birds"
                   for h in memory.search(query, Modality.TEXT, 5, filters={"dataset": "birds"}))
        assert all(h.payload and h.payload.extra["colour"] == "red"
                   for h in memory.search(query, Modality.TEXT, 5, filters={"extra.colour": "red"}))
        excluded = memory.search(query, Modality.TEXT, 5, exclude_ids=[records[3].item_id])
        assert records[3].item_id not in {h.item_id for h in excluded}
        above = memory.search(query, Modality.TEXT, 20, score_threshold=0.2)
        assert above and all(h.score >= 0.2 - 1e-6 for h in above)
        assert len(above) < 20
        distinct = memory.search(records[0].image_vector, Modality.IMAGE, 4, distinct_images=True)
        assert len({h.payload.image_hash for h in distinct if h.payload}) == 4 == len(distinct)
        got = memory.retrieve([records[7].item_id, item_id_for("f" * 64, "absent")], with_vectors=True)
        assert [p.item_id for p in got] == [records[7].item_id]
        np.testing.assert_allclose(got[0].vector(Modality.TEXT), records[7].text_vector, atol=1e-6)
        assert memory.existing_ids([records[1].item_id, records[2].item_id]) == {records[1].item_id,
                                                                                    records[2].item_id}
        np.testing.assert_allclose(memory.fetch_vectors([records[2].item_id], Modality.IMAGE)[0],
                                   records[2].image_vector, atol=1e-6)
        pages = list(memory.scroll(limit=6, filters={"split": "train"}))
        assert [len(p) for p in pages] == [6, 6, 3]
        assert [p.item_id for page in pages for p in page] == sorted(r.item_id for r in records
                                                                     if r.payload.split == "train")
        m = memory.export_matrices()
        assert len(m) == 20 and m.image.shape == (20, DIM) and m.text.dtype == np.float32
        row = m.ids.index(records[7].item_id)
        np.testing.assert_allclose(m.text[row], records[7].text_vector, atol=1e-6)
        memory.delete([records[3].item_id])
        assert memory.count() == 19
        assert records[3].item_id not in {h.item_id for h in memory.search(query, Modality.TEXT, 19)}


def test_batch_search_matches_single_queries(backend: str, tmp_path: Path) -> None:
    records = make_records(30, 1, DIM, seed=3)
    queries = np.stack([r.image_vector for r in records[:6]])
    with open_backend(backend, tmp_path, DIM, records=records) as memory:
        batched = memory.search_batch(queries, Modality.IMAGE, 4, filters={"dataset": ["birds", "cars"]},
                                      exclude_ids=[[r.item_id] for r in records[:6]])
        for q, hits in enumerate(batched):
            single = memory.search(queries[q], Modality.IMAGE, 4, filters={"dataset": ["birds", "cars"]},
                                   exclude_ids=[records[q].item_id])
            assert [h.item_id for h in hits] == [h.item_id for h in single]
            assert records[q].item_id not in {h.item_id for h in hits}


def test_unknown_filter_field_is_an_error(backend: str, tmp_path: Path) -> None:
    with open_backend(backend, tmp_path, DIM, records=make_records(3, 1, DIM)) as memory:
        with pytest.raises(UnknownFilterField, match="colour"):
            memory.count({"colour": "red"})
        with pytest.raises(ValueError):
            memory.search(np.ones(DIM, np.float32), Modality.IMAGE, 3, filters={"dataset') or 1=1 --": "x"})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.one_of(st.text(max_size=5), st.integers()), max_size=3))
def test_parse_filters_accepts_known_fields_only(filters: dict) -> None:
    known = {"dataset", "split", "source", "label", "image_hash", "item_id"}
    bad = [k for k in filters if k not in known and not (k.startswith("extra.") and len(k) > 6)]
    try:
        conditions = parse_filters(filters)
    except UnknownFilterField:
        assert bad
        return
    except ValueError:  # a non-integer label
        assert "label" in filters
        return
    assert not bad or all(k.startswith("extra.") for k in bad)
    assert [c.key for c in conditions] == list(filters)


def test_edge_store_persists_aliases_and_collections(tmp_path: Path) -> None:
    from app.memory.edge import EdgeStore

    records = make_records(6, 1, DIM)
    store = EdgeStore(tmp_path / "mem")
    a, b = store.ensure_collection("reco__a", DIM), store.ensure_collection("reco__b", DIM)
    a.upsert(records[:4])
    b.upsert(records)
    store.swap_alias("memory", "reco__a")
    live = store.collection("memory")
    assert live.count() == 4 and live.collection == "reco__a"
    store.swap_alias("memory", "reco__b")
    assert live.count() == 6  # the same handle follows the alias
    with pytest.raises(MemoryStoreError, match="16-d"):
        store.ensure_collection("reco__a", DIM * 2)
    store.close()
    reopened = EdgeStore(tmp_path / "mem")
    assert reopened.live_collection("memory") == "reco__b"
    assert reopened.list_collections() == ["reco__a", "reco__b"]
    assert reopened.collection("memory").count() == 6
    reopened.drop_collection("reco__b")
    assert reopened.live_collection("memory") is None and reopened.list_collections() == ["reco__a"]
    reopened.close()


def test_edge_indexes_pending_points_and_keeps_answering(tmp_path: Path) -> None:
    from app.memory.edge import EdgeStore
    from app.memory.layout import MemoryLayout

    records = make_records(400, 1, DIM, clusters=8)
    store = EdgeStore(tmp_path / "mem", MemoryLayout(indexing_threshold=300))
    memory = store.ensure_collection("reco__x", DIM)
    memory.upsert(records)
    before = memory.search(records[5].image_vector, Modality.IMAGE, 5)
    assert store.unindexed_points() == {"reco__x": 400}
    assert store.index_pending() == 400
    assert store.unindexed_points() == {"reco__x": 0}
    after = memory.search(records[5].image_vector, Modality.IMAGE, 5)
    assert after[0].item_id == before[0].item_id == records[5].item_id
    store.close()


def test_edge_store_has_one_owner(tmp_path: Path) -> None:
    import subprocess
    import sys

    from app.memory.base import MemoryHeldElsewhere
    from app.memory.edge import EdgeStore

    store = EdgeStore(tmp_path / "mem")
    store.ensure_collection("reco__a", DIM).upsert(make_records(2, 1, DIM))
    code = (f"from app.memory.edge import EdgeStore\n"
            f"try:\n    EdgeStore({str(tmp_path / 'mem')!r})\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith(MemoryHeldElsewhere.__name__), out
    assert f"process {__import__('os').getpid()}" in out and "reco serve" in out
    store.close()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out == "", out  # released on close


def test_exact_index_upsert_replaces_and_appends() -> None:
    from app.memory.exact import ExactIndex

    records = make_records(4, 1, DIM)
    index = ExactIndex([], np.zeros((0, DIM), np.float32), np.zeros((0, DIM), np.float32), [])
    index.upsert(records[:3])
    changed = MemoryRecord(ItemPayload(**{**records[0].payload.model_dump(), "caption": "new"}),
                           records[0].image_vector, records[0].text_vector)
    index.upsert([changed, records[3]])
    assert len(index) == 4 and index.payloads[0].caption == "new"
    assert index.row_of_id(records[3].item_id) == 3
