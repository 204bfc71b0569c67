"""What the memory's operations look like on the wire between ``reco serve`` and its clients.

Vectors travel as base64 of little-endian float32 (a 512-d vector is 2.7 kB instead of ~10 kB of JSON
numbers). The server side is ``api/memory_routes.py``; the client side :mod:`app.memory.remote`.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from app.memory.base import ItemPayload, MemoryRecord, SearchHit, StoredPoint
from app.schemas import Modality


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


class RecordWire(BaseModel):
    payload: ItemPayload
    image: str
    text: str

    @classmethod
    def of(cls, record: MemoryRecord) -> RecordWire:
        return cls(payload=record.payload, image=encode_vector(record.image_vector),
                   text=encode_vector(record.text_vector))

    def record(self) -> MemoryRecord:
        return MemoryRecord(self.payload, decode_vector(self.image), decode_vector(self.text))


class PointWire(BaseModel):
    item_id: str
    payload: ItemPayload | None = None
    image: str | None = None
    text: str | None = None

    @classmethod
    def of(cls, point: StoredPoint) -> PointWire:
        return cls(item_id=point.item_id, payload=point.payload,
                   image=None if point.image_vector is None else encode_vector(point.image_vector),
                   text=None if point.text_vector is None else encode_vector(point.text_vector))

    def point(self) -> StoredPoint:
        return StoredPoint(self.item_id, self.payload, None if self.image is None else decode_vector(self.image),
                           None if self.text is None else decode_vector(self.text))


class HitWire(BaseModel):
    item_id: str
    score: float
    payload: ItemPayload | None = None

    def hit(self) -> SearchHit:
        return SearchHit(self.item_id, self.score, self.payload)


class UpsertIn(BaseModel):
    records: list[RecordWire] = Field(max_length=100_000)


class IdsIn(BaseModel):
    ids: list[str] = Field(max_length=100_000)
    with_vectors: bool = False


class CountIn(BaseModel):
    filters: dict[str, Any] | None = None


class ScrollIn(BaseModel):
    filters: dict[str, Any] | None = None
    offset: str | None = None  # the item id to start at (the engine's scroll offset)
    limit: int = Field(default=256, ge=1, le=10_000)
    with_vectors: bool = False


class ScrollOut(BaseModel):
    points: list[PointWire]
    next_offset: str | None


class SearchIn(BaseModel):
    vectors: list[str] = Field(min_length=1, max_length=4096)
    modality: Modality
    k: int = Field(ge=1, le=10_000)
    filters: dict[str, Any] | None = None
    exclude_ids: list[list[str]] | None = None
    score_threshold: float | None = None
    distinct_images: bool = False


class SearchOut(BaseModel):
    hits: list[list[HitWire]]


class EnsureIn(BaseModel):
    dim: int = Field(ge=1, le=65_536)


class AliasIn(BaseModel):
    collection: str
