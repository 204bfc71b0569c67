"""``reco memory migrate``: a qdrant-client local-mode store (the retired embedded backend) into Qdrant Edge.

Reads every collection of the old folder through qdrant-client (vectors and payloads, page by page),
writes them into the Edge store of the settings, copies the aliases, checks the counts, then renames the
old folder (``<name>.local-mode-backup``) so it is neither read again nor lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.memory.base import ItemPayload, MemoryRecord, MemoryStoreError
from app.memory.store import is_local_mode_store

if TYPE_CHECKING:
    from app.memory.edge import EdgeStore

log = logging.getLogger(__name__)
PAGE = 1024


def migrate_local_mode(source: Path, target: EdgeStore, *, on_points: Callable[[int], None] | None = None,
                       keep_source: bool = False) -> dict[str, Any]:
    """Copy every collection and alias of ``source`` into ``target``; returns what was moved."""
    from qdrant_client import QdrantClient

    if not is_local_mode_store(source):
        raise MemoryStoreError(f"{source} is not a qdrant-client local-mode store (no meta.json / collection/)")
    try:
        client = QdrantClient(path=str(source))
    except RuntimeError as exc:  # portalocker: another process holds it
        raise MemoryStoreError(f"{source} is open in another process ({exc}); stop it first") from exc
    moved: dict[str, int] = {}
    try:
        for description in client.get_collections().collections:
            name = description.name
            vectors = client.get_collection(name).config.params.vectors
            if not isinstance(vectors, dict) or set(vectors) != {"image", "text"}:
                raise MemoryStoreError(f"collection {name} in {source} has no image/text vectors: not a RECO memory")
            target_memory = target.ensure_collection(name, int(vectors["image"].size))
            offset = None
            while True:
                points, offset = client.scroll(name, limit=PAGE, offset=offset, with_payload=True, with_vectors=True)
                records = [MemoryRecord(ItemPayload.model_validate(p.payload),
                                        np.asarray(p.vector["image"], np.float32),  # type: ignore[index, call-overload]
                                        np.asarray(p.vector["text"], np.float32))  # type: ignore[index, call-overload]
                           for p in points]
                target_memory.upsert(records)
                if on_points is not None:
                    on_points(len(records))
                if offset is None:
                    break
            count = client.count(name, exact=True).count
            if target_memory.count() != count:
                raise MemoryStoreError(f"collection {name}: {count} points in {source}, {target_memory.count()} "
                                       "after the copy: the source was kept, nothing renamed")
            moved[name] = count
        aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        for alias, collection in aliases.items():
            target.swap_alias(alias, collection)
    finally:
        client.close()
    backup = None
    if not keep_source:
        backup = source.with_name(source.name + ".local-mode-backup")
        source.rename(backup)
    log.warning("migrated %d collections (%d points) from %s into %s", len(moved), sum(moved.values()), source,
                target.location)
    return {"source": str(source), "target": target.location, "collections": moved, "aliases": aliases,
            "source_kept_as": str(backup) if backup else str(source)}


def source_points(source: Path) -> int:
    """How many points the old store holds (for a progress bar)."""
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(source))
    try:
        return sum(client.count(c.name, exact=True).count for c in client.get_collections().collections)
    finally:
        client.close()
