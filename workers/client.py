"""Talking to the workers from other processes (CLI, UI, beat): send by task *name*, never import tasks.

Importing :mod:`workers.tasks` loads the services (and torch); a dispatcher needs only the broker.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from celery import Celery

from app.config import Settings
from app.services.ingest_ledger import TaskRef

EMBED_TASK = "reco.embed.items"


class CeleryTaskSender:
    """The ingestion side's :class:`~ingestion.dispatch.TaskSender` over a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, refs: Sequence[TaskRef], *, attempt: int = 0, countdown: float | None = None) -> None:
        if not refs:
            return
        with self.app.producer_or_acquire() as producer:
            for ref in refs:
                self.app.send_task(EMBED_TASK, args=(ref.job_id, ref.seq),
                                   kwargs={"attempt": attempt} if attempt else None,
                                   countdown=countdown, producer=producer)

    def queue_depth(self, queue: str = "embed") -> int:
        with self.app.connection_for_read() as conn:
            try:
                return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
            except conn.channel_errors:  # never declared yet: empty
                return 0


def default_sender(settings: Settings | None = None) -> CeleryTaskSender:
    """A sender for these settings' broker (a Celery app of its own), or the worker module's shared app."""
    if settings is not None:
        from workers.celery_app import create_celery_app

        return CeleryTaskSender(create_celery_app(settings))
    from workers.celery_app import app

    return CeleryTaskSender(app)


class RefineTimeout(TimeoutError):
    """No refine worker answered in time (none running, or the request was lost with a worker that died)."""


class RefineClient:
    """``predict`` / ``search`` answered by a refine worker (waits ``refine_timeout_s``, never longer)."""

    def __init__(self, app: Celery, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        from celery.exceptions import TimeoutError as ResultTimeout

        result = self.app.send_task(name, args=args, kwargs=kwargs)
        try:
            return result.get(timeout=self.timeout_s)
        except ResultTimeout as exc:  # Celery says only "The operation timed out."
            raise RefineTimeout(
                f"no refine worker answered {name} within {self.timeout_s:g} s: is `reco worker --queues refine` "
                "running and connected to the broker? (a request held by a worker that died is lost; ask again)"
            ) from exc
        finally:
            result.forget()

    def predict(self, image: bytes, classes: Sequence[str], *, mode: str | None = None,
                k: int | None = None) -> dict[str, Any]:
        encoded = base64.b64encode(image).decode("ascii")
        return self._call("reco.refine.predict", encoded, list(classes), mode=mode, k=k)

    def search(self, query: dict[str, Any], *, mode: str | None = None, k: int | None = None) -> dict[str, Any]:
        return self._call("reco.refine.search", query, mode=mode, k=k)

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        """Latency p50/p99 of one refine worker (whichever takes the message); ``reset`` starts over."""
        return self._call("reco.refine.stats", reset=reset)


def refine_client() -> RefineClient:
    from workers.celery_app import app, app_settings

    return RefineClient(app, app_settings(app).refine_timeout_s)
