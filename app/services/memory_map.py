"""A 2-D map of the memory: PCA of the image vectors (one point per image), coloured by dataset or label,
with a query (an item or an uploaded image) and its nearest images marked — the view analysts use in
FiftyOne, computed here with numpy alone (no UMAP dependency).

The projection is fitted on the points shown (at most ``limit``, a deterministic sample by image hash), so
the axes are the memory's own two main directions of variation; a query is projected onto the same axes.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from app.memory.base import VectorMemory
from app.memory.per_image import first_per_image
from app.schemas import Modality


class MapPoint(BaseModel):
    item_id: str
    x: float
    y: float
    caption: str = ""
    dataset: str | None = None
    label: int | None = None
    label_name: str | None = None
    source: str | None = None
    role: str = "memory"  # memory | neighbour | query
    score: float | None = None  # a neighbour's similarity to the query


class MapQuery(BaseModel):
    filters: dict[str, str | int] = {}
    limit: int = Field(default=2000, ge=10, le=20_000, description="points shown (a sample beyond this)")
    item_id: str | None = Field(default=None, description="mark this item and its nearest images")
    k: int = Field(default=8, ge=1, le=100)


class MemoryMap(BaseModel):
    points: list[MapPoint]  # the memory's points (neighbours among them marked), then the query if any
    total: int  # images in the memory under the filters (before sampling)
    explained: list[float]  # the share of variance on each axis
    query: MapPoint | None = None


def fit_pca(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Mean, the two main axes (2, d) and the share of variance each explains."""
    mean = vectors.mean(axis=0)
    centred = vectors - mean
    if len(vectors) < 2:
        return mean, np.eye(2, vectors.shape[1], dtype=np.float32), [0.0, 0.0]
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    share = (variance[:2] / max(float(variance.sum()), 1e-12)).tolist()
    components = axes[:2]
    for i in range(len(components)):  # a stable sign: the largest loading positive
        if components[i][np.argmax(np.abs(components[i]))] < 0:
            components[i] = -components[i]
    if len(components) < 2:
        components = np.vstack([components, np.zeros_like(components[0])])
        share.append(0.0)
    return mean, components.astype(np.float32), [float(s) for s in share]


def memory_map(memory: VectorMemory, query: MapQuery, *, query_vector: np.ndarray | None = None) -> MemoryMap:
    """The map; ``query_vector`` (an uploaded image's embedding) or ``query.item_id`` marks a query."""
    matrices = memory.export_matrices(filters=query.filters or None)
    def image_of(row: int) -> str:
        return matrices.image_hashes[row] or matrices.ids[row]

    first = first_per_image(range(len(matrices.image_hashes)), image_of)  # one point per image
    rows = sorted((image_of(row), row) for row in first)  # by image hash: a deterministic sample, stable across reruns
    total = len(rows)
    if total > query.limit:
        step = total / query.limit
        rows = [rows[int(i * step)] for i in range(query.limit)]
    index = [r for _, r in rows]
    if not index:
        return MemoryMap(points=[], total=0, explained=[0.0, 0.0])
    vectors = matrices.image[index]
    mean, axes, explained = fit_pca(vectors)
    xy = (vectors - mean) @ axes.T
    points = []
    for (row, (x, y)) in zip(index, xy, strict=True):
        payload = matrices.payloads[row] if matrices.payloads else None
        points.append(MapPoint(item_id=matrices.ids[row], x=float(x), y=float(y),
                               caption=payload.caption if payload else "",
                               dataset=payload.dataset if payload else None,
                               label=payload.label if payload else None,
                               source=payload.source if payload else None))
    marked: MapPoint | None = None
    if query.item_id is not None and query_vector is None:
        found = memory.retrieve([query.item_id], with_vectors=True)
        if not found:
            raise LookupError(f"item {query.item_id} is not in the live memory")
        query_vector = found[0].vector(Modality.IMAGE)
        payload = found[0].payload
        marked = MapPoint(item_id=query.item_id, x=0.0, y=0.0, role="query",
                          caption=payload.caption if payload else "", dataset=payload.dataset if payload else None,
                          label=payload.label if payload else None, source=payload.source if payload else None)
    if query_vector is not None:
        vector = np.asarray(query_vector, np.float32).reshape(-1)
        x, y = ((vector - mean) @ axes.T).tolist()
        marked = (marked or MapPoint(item_id="query", x=0.0, y=0.0, caption="the query image", role="query"))
        marked.x, marked.y = float(x), float(y)
        exclude = [marked.item_id] if query.item_id else []
        hits = memory.search(vector, Modality.IMAGE, query.k, filters=query.filters or None, exclude_ids=exclude,
                             distinct_images=True)
        by_id = {p.item_id: p for p in points}
        shown = {(p.source, p.caption) for p in points}
        for hit in hits:
            point = by_id.get(hit.item_id)
            if point is None:  # not in the sample, or another caption row of a shown image: add it
                p = hit.payload
                if p is not None and (p.source, p.caption) in shown:
                    point = next(q for q in points if (q.source, q.caption) == (p.source, p.caption))
                else:
                    hv = memory.fetch_vectors([hit.item_id], Modality.IMAGE)[0]
                    hx, hy = ((hv - mean) @ axes.T).tolist()
                    point = MapPoint(item_id=hit.item_id, x=float(hx), y=float(hy),
                                     caption=p.caption if p else "", dataset=p.dataset if p else None,
                                     label=p.label if p else None, source=p.source if p else None)
                    points.append(point)
            point.role, point.score = "neighbour", hit.score
    return MemoryMap(points=points, total=total, explained=explained, query=marked)
