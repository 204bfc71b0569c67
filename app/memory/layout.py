"""How collections are built and searched (HNSW, quantization, on-disk vectors): one value for every engine.

Qdrant Edge and a Qdrant server read the same settings (``RECO_MEMORY_*``); the server also takes the
cluster fields (shards, replication), which Edge ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import Settings


@dataclass(frozen=True)
class MemoryLayout:
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    hnsw_ef: int = 128  # search-time candidate list: recall against latency (docs/performance.md)
    int8: bool = False  # scalar quantization: 1 byte a dimension in RAM, originals rescored
    oversampling: float = 2.0  # int8: candidates fetched per result before rescoring with the originals
    on_disk: bool = False  # original vectors memory-mapped from disk (large memories)
    indexing_threshold: int = 20_000  # unindexed points searched exactly until there are this many
    exact: bool = False  # every search exact (no HNSW): for checks, never the default
    min_free_mb: int = 256  # Edge refuses writes below this much free disk (see RECO_MEMORY_MIN_FREE_MB)
    shards: int | None = None  # server/cluster only
    replication: int | None = None  # server/cluster only

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryLayout:
        return cls(
            hnsw_m=settings.memory_hnsw_m, hnsw_ef_construct=settings.memory_hnsw_ef_construct,
            hnsw_ef=settings.memory_hnsw_ef, int8=settings.memory_quantization == "int8",
            oversampling=settings.memory_oversampling, on_disk=settings.memory_on_disk,
            indexing_threshold=settings.memory_indexing_threshold, exact=settings.memory_exact_search,
            min_free_mb=settings.memory_min_free_mb,
            shards=settings.qdrant_shard_number, replication=settings.qdrant_replication_factor,
        )
