"""The memory's records, hits and the interface both backends (Qdrant, exact in-RAM) serve."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.schemas import Modality

# Fixed namespace: the same (image bytes, caption) gives the same item id on every machine.
ITEM_NAMESPACE = uuid.UUID("6f1c9a52-3c4b-4d8e-9f6a-2b7e1d0c5a93")

# Payload fields users filter on; Qdrant server gets a payload index on each.
FILTER_FIELDS: dict[str, str] = {
    "dataset": "keyword",
    "split": "keyword",
    "source": "keyword",
    "label": "integer",
    "image_hash": "keyword",
}


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(image_sha256: str, caption: str) -> str:
    return hashlib.sha256(f"{image_sha256}\n{caption}".encode()).hexdigest()


def item_id_for(image_sha256: str, caption: str) -> str:
    """Deterministic item id: one image with five captions gives five items."""
    return str(uuid.uuid5(ITEM_NAMESPACE, content_hash(image_sha256, caption)))


class ItemPayload(BaseModel):
    """What Qdrant stores beside the two vectors (and what search returns)."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    image_hash: str
    caption: str
    dataset: str | None = None
    split: str | None = None
    source: str | None = None
    label: int | None = None
    extra: dict[str, Any] = {}


@dataclass(frozen=True)
class MemoryRecord:
    payload: ItemPayload
    image_vector: np.ndarray
    text_vector: np.ndarray

    @property
    def item_id(self) -> str:
        return self.payload.item_id


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    score: float
    payload: ItemPayload | None = None


@dataclass
class MemoryMatrices:
    """The whole memory as row-aligned arrays, for the exact index and for training."""

    ids: list[str]
    image: np.ndarray  # (n, d) float32, L2-normalised
    text: np.ndarray  # (n, d)
    image_hashes: list[str]
    payloads: list[ItemPayload] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


Filters = Mapping[str, str | int | Sequence[str | int]]


class VectorMemory(Protocol):
    """Search over one embedding version. Both backends must return the same neighbours."""

    def search(
        self,
        vector: np.ndarray,
        modality: Modality,
        k: int,
        *,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> list[SearchHit]: ...

    def count(self) -> int: ...
