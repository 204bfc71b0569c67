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
    return {
        "items": repo.count_items(),
        "status": repo.status_counts(),
        "collections": collections,
        "alias": {"name": settings.memory_alias, "collection": store.live_collection(settings.memory_alias)},
        "versions": [as_dict(v) for v in repo.versions()],
        "recent_jobs": [as_dict(j) for j in jobs],
        "database": _redact(settings.resolved_database_url),
        "memory": {"backend": store.backend, "location": store.location},
    }


def _redact(url: str) -> str:
    """Never print a password that came in a URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
