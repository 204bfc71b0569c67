"""What is in the memory: counts per embedding status and per collection, the live version, jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.db.repo import MetadataRepo, as_dict
from app.memory.store import open_store

if TYPE_CHECKING:
    from app.config import Settings
    from app.memory.base import MemoryStore


def memory_status(settings: Settings, repo: MetadataRepo | None = None, *,
                  store: MemoryStore | None = None) -> dict[str, Any]:
    repo = repo or MetadataRepo.from_url(settings.resolved_database_url)
    store = store or open_store(settings)
    collections = {name: store.collection(name).count() for name in store.list_collections()}
    jobs = repo.recent_jobs(5)
    missing = _missing_vectors(settings, repo, store)
    return {
        "missing_vectors": missing,
        "items": repo.count_items(),
        "status": repo.status_counts(),
        "collections": collections,
        "alias": {"name": settings.memory_alias, "collection": store.live_collection(settings.memory_alias)},
        "versions": [as_dict(v) for v in repo.versions()],
        "recent_jobs": [as_dict(j) for j in jobs],
        "database": _redact(settings.resolved_database_url),
        "memory": {"backend": store.backend, "location": store.location},
    }


def _missing_vectors(settings: Settings, repo: MetadataRepo, store: MemoryStore) -> dict[str, int]:
    """Per version with a collection: items marked embedded whose vectors the collection lacks (lost vectors).

    Checked id by id only where the counts disagree (the collection holds fewer points than items embedded).
    """
    from app.services.restore import missing_vector_ids

    out: dict[str, int] = {}
    collections = set(store.list_collections())
    counts = repo.status_counts()
    for version in repo.versions():
        embedded = counts.get(version.encoder_id, {}).get("embedded", 0)
        if not embedded:
            continue
        memory = store.collection(version.collection)
        points = memory.count() if version.collection in collections else 0
        if points >= embedded:
            continue
        out[version.encoder_id] = embedded if version.collection not in collections else len(
            missing_vector_ids(repo, memory, version.encoder_id))
    return out


def _redact(url: str) -> str:
    """Never print a password that came in a URL."""
    from app.db.urls import hide_password

    return hide_password(url)
