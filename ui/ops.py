"""Celery as the Operations page sees it: is the broker there, how long are the queues, which workers answer.

Every call is bounded by a short timeout: the page must not hang on a broker that is down.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from celery import Celery

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}


def broker_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """A TCP connection to the broker's host and port (before kombu, whose retries can take long)."""
    parsed = urlparse(url)
    if parsed.scheme in {"memory", "filesystem"}:
        return True
    port = parsed.port or DEFAULT_PORTS.get(parsed.scheme)
    if not parsed.hostname or port is None:
        return False
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def queue_lengths(app: Celery) -> dict[str, int]:
    from workers.celery_app import QUEUES
    from workers.client import CeleryTaskSender

    sender = CeleryTaskSender(app)
    return {queue: sender.queue_depth(queue) for queue in QUEUES}


def worker_health(app: Celery, timeout_s: float = 1.0) -> dict[str, str]:
    """Worker name → its answer to a ping ("pong"); a worker that does not answer in time is absent."""
    replies = app.control.ping(timeout=timeout_s) or []
    return {name: str(answer.get("ok", answer)) for reply in replies for name, answer in reply.items()}


def refine_stats(app: Celery, timeout_s: float = 2.0) -> dict[str, Any]:
    """Latency and what is loaded, from whichever refine worker takes the message."""
    from workers.client import RefineClient

    return RefineClient(app, timeout_s).stats()
