"""Micro-batching for the embed task: celery-batches, plus what it lacks for crash safety.

``celery_batches.Batches`` buffers messages in the worker's main process and hands the buffer to the
pool when it holds ``flush_every`` requests or ``flush_interval`` seconds passed: "up to N items or T ms,
whichever first". With ``acks_late`` it acknowledges the messages after the batch *returned* — also
when the batch raised (the exception is logged and swallowed), so the task body must itself decide
what to do with a failed batch (:mod:`workers.tasks` re-publishes it with a backoff).

What it lacks: when the pool process running a batch dies (SIGKILL, OOM), it never rejects the
messages, so ``reject_on_worker_lost`` is ignored and on RabbitMQ they would stay unacknowledged until
the worker's connection closes. :class:`CrashSafeBatches` adds the pool's error callback: a lost worker
rejects its batch back to the queue (requeue), as Celery does for ordinary tasks.

And it keeps batches full: its timer flushes every ``flush_interval`` whatever the buffer holds, even
while the pool is still busy with the previous batch, which splits a steady stream into small batches.
:class:`CrashSafeBatches` skips such a flush until a pool process is free (a full buffer still goes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any

from billiard.exceptions import WorkerLostError
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

log = logging.getLogger(__name__)


class CrashSafeBatches(Batches):
    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def _do_flush(self) -> None:
        """The timer's flush is skipped while every pool process is busy and the buffer is not full: a partial
        batch would only wait behind the running one, and merged with later items it makes a fuller batch."""
        limit = int(getattr(self._pool, "limit", None) or 1)
        if self._in_flight >= limit and self._buffer.qsize() < self.flush_every:
            return
        super()._do_flush()

    def _done(self) -> None:
        with self._in_flight_lock:
            self._in_flight = max(0, self._in_flight - 1)

    def flush(self, requests: Collection[Any]) -> Any:
        acks_early = [r for r in requests if not r.task.acks_late]
        acks_late = [r for r in requests if r.task.acks_late]
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in acks_early:
                req.acknowledge()

        def on_return(result: Any) -> None:
            self._done()
            for req in acks_late:
                req.acknowledge()

        def on_error(exc_info: Any) -> None:
            exc = getattr(exc_info, "exception", exc_info)
            exc = getattr(exc, "exc", exc)  # billiard wraps it in ExceptionWithTraceback
            requeue = isinstance(exc, WorkerLostError) and bool(self.reject_on_worker_lost)
            self._done()
            log.error("embed batch of %d lost (%r); %s", len(acks_late), exc, "requeued" if requeue else "dropped")
            for req in acks_late:
                if requeue:
                    req.reject(requeue=True)
                else:
                    req.acknowledge()

        with self._in_flight_lock:
            self._in_flight += 1
        return self._pool.apply_async(
            apply_batches_task, (self, serializable, 0, None),
            accept_callback=on_accepted, callback=on_return, error_callback=on_error)
