"""The Qdrant store behaves the same in ':memory:' and on a path; upserts are idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from app.memory.base import ItemPayload, MemoryRecord, item_id_for
from app.memory.qdrant import QdrantMemory, build_filter, live_collection, swap_alias
from app.schemas import Modality

DIM = 16


def _records(n: int, seed: int = 0) -> list[MemoryRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v, t = rng.normal(size=DIM), rng.normal(size=DIM)
        image_sha = f"{i // 2:064x}"  # two captions per image
        caption = f"caption {i}"
        payload = ItemPayload(item_id=item_id_for(image_sha, caption), image_hash=image_sha, caption=caption,
                              dataset="even" if i % 2 == 0 else "odd", split="train", source=f"/x/{i}.jpg",
                              label=i % 3)
        out.append(MemoryRecord(payload, (v / np.linalg.norm(v)).astype(np.float32),
                                (t / np.linalg.norm(t)).astype(np.float32)))
    return out


@pytest.fixture(params=["memory", "path"])
def client(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    c = QdrantClient(location=":memory:") if request.param == "memory" else QdrantClient(path=str(tmp_path / "q"))
    yield c
    c.close()


def test_item_id_is_deterministic_and_caption_sensitive() -> None:
    assert item_id_for("ab" * 32, "a dog") == item_id_for("ab" * 32, "a dog")
    assert item_id_for("ab" * 32, "a dog") != item_id_for("ab" * 32, "a cat")


def test_upsert_idempotent_search_filters_export(client: QdrantClient) -> None:
    mem = QdrantMemory(client, "reco__test")
    mem.ensure(DIM)
    records = _records(20)
    mem.upsert(records)
    mem.upsert(records[:5])
    assert mem.count() == 20
    assert mem.count({"dataset": "even"}) == 10
    query = records[3].image_vector
    hits = mem.search(query, Modality.IMAGE, 5)
    assert hits[0].item_id == records[3].item_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload is not None and hits[0].payload.caption == "caption 3"
    filtered = mem.search(query, Modality.IMAGE, 5, filters={"dataset": "even"})
    assert all(h.payload and h.payload.dataset == "even" for h in filtered)
    excluded = mem.search(query, Modality.IMAGE, 5, exclude_ids=[records[3].item_id])
    assert records[3].item_id not in {h.item_id for h in excluded}
    by_label = mem.search(query, Modality.TEXT, 20, filters={"label": [0, 1]})
    assert {h.payload.label for h in by_label if h.payload} <= {0, 1} and len(by_label) == 14
    m = mem.export_matrices()
    assert len(m) == 20 and m.image.shape == (20, DIM) and m.text.dtype == np.float32
    row = m.ids.index(records[7].item_id)
    np.testing.assert_allclose(m.text[row], records[7].text_vector, rtol=1e-6)
    assert m.image_hashes[row] == records[7].payload.image_hash


def test_dimension_mismatch_is_refused(client: QdrantClient) -> None:
    mem = QdrantMemory(client, "reco__dim")
    mem.ensure(DIM)
    with pytest.raises(RuntimeError, match="16-d"):
        mem.ensure(DIM * 2)


def test_alias_swap_moves_searches(client: QdrantClient) -> None:
    a, b = QdrantMemory(client, "reco__a"), QdrantMemory(client, "reco__b")
    a.ensure(DIM)
    b.ensure(DIM)
    a.upsert(_records(4))
    b.upsert(_records(6, seed=1))
    swap_alias(client, "memory", "reco__a")
    assert QdrantMemory(client, "memory").count() == 4
    swap_alias(client, "memory", "reco__b")
    assert live_collection(client, "memory") == "reco__b"
    assert QdrantMemory(client, "memory").count() == 6


def test_filter_field_names_are_validated() -> None:
    with pytest.raises(ValueError):
        build_filter({"dataset') or 1=1 --": "x"})
    assert build_filter(None) is None
