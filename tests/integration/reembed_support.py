"""What the two re-embedding tests with real workers share: the two encoder versions, the count of rows embedded
under one, and a client that searches through the refine worker the whole time."""

from __future__ import annotations

import threading
import time

from celery import Celery
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import Embedding
from app.db.repo import MetadataRepo
from app.schemas import EmbedStatus
from tests.integration.workers_support import wait_until
from workers.celery_app import create_celery_app
from workers.client import RefineClient

OLD, NEW = "reco-tiny/random/s0", "reco-tiny/random/s1"


def embedded(repo: MetadataRepo, encoder_id: str) -> int:
    with repo.session() as s:
        return int(s.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.encoder_id == encoder_id, Embedding.status == EmbedStatus.EMBEDDED)) or 0)


class Searcher(threading.Thread):
    """Searches through the refine worker until stopped; every failure is kept."""

    def __init__(self, client: RefineClient) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stop = threading.Event()
        self.answers: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                found = self.client.search({"text": f"a dog runs {n}"}, mode="clip", k=5)
                assert len(found["results"]) == 5, found
                self.answers.append(found["encoder_id"])
            except Exception as exc:  # noqa: BLE001 - the test counts them
                self.errors.append(f"{type(exc).__name__}: {exc}")
            n += 1
            time.sleep(0.1)


def start_searching(settings: Settings, before: str) -> tuple[Celery, Searcher]:
    """The workers' Celery app and a :class:`Searcher` through the refine worker, once it has answered three
    searches (waited for as "searches answered before ``before``")."""
    app = create_celery_app(settings)
    searcher = Searcher(RefineClient(app, timeout_s=60))
    searcher.start()
    wait_until(lambda: len(searcher.answers) >= 3, 60, f"searches answered before {before}")
    return app, searcher
