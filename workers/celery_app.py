"""The Celery application, built from :class:`~app.config.Settings` (nothing else is configured here).

Queues: ``embed`` (micro-batched item embedding), ``refine`` (RECO predict/search), ``maintenance``
(lost-row resends, reconciliation, re-embedding, watch-folder scans). Every task is
acknowledged late and rejected back to its queue when its worker process dies, so a crash redelivers
instead of losing; the work itself is idempotent (content-derived item ids, the ingest ledger).

Prefetch: 1 for ``refine`` and ``maintenance``. The embed task is a celery-batches task whose messages
stay unacknowledged while they wait in the batch buffer, so "prefetch 1" for embed means one *batch*:
``reco worker`` sets the prefetch of a worker that consumes ``embed`` to two micro-batches (one being
encoded, the next filling), see :func:`prefetch_multiplier`.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Exchange, Queue

from app.config import Settings, get_settings

EMBED, REFINE, MAINTENANCE = "embed", "refine", "maintenance"
QUEUES = (EMBED, REFINE, MAINTENANCE)


def result_backend_for(settings: Settings) -> str:
    """Explicit, or the broker itself (Redis), or the RPC backend (RabbitMQ)."""
    if settings.result_backend:
        return settings.result_backend
    return settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else "rpc://"


def prefetch_multiplier(settings: Settings, queues: list[str]) -> int:
    return 2 * settings.embed_max_batch if EMBED in queues else 1


def beat_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    every = timedelta(seconds=settings.maintenance_interval_s)
    return {
        "resend-lost-ingest-rows": {"task": "reco.maintenance.resend_lost", "schedule": every},
        "reconcile-memory": {"task": "reco.maintenance.reconcile", "schedule": every * 10},
        "scan-watch-folders": {"task": "reco.maintenance.scan_watch_folders",
                               "schedule": timedelta(seconds=settings.watch_interval_s)},
        "resume-reembedding": {"task": "reco.maintenance.reembed_check",
                               "schedule": timedelta(seconds=settings.reembed_check_interval_s)},
    }


def _redact_worker_logs(logger: object = None, **_: object) -> None:
    """Celery's own handlers (worker, beat, task loggers) redact secrets like the CLI's (app.errors)."""
    import logging

    from app.errors import install_log_redaction

    install_log_redaction()
    if isinstance(logger, logging.Logger):
        install_log_redaction(logger)


def create_celery_app(settings: Settings) -> Celery:
    from celery.signals import after_setup_logger, after_setup_task_logger

    after_setup_logger.connect(_redact_worker_logs, weak=False)
    after_setup_task_logger.connect(_redact_worker_logs, weak=False)
    app = Celery("reco", broker=settings.broker_url, backend=result_backend_for(settings), include=["workers.tasks"])
    transport: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # an unacked message of a dead worker comes back after the visibility timeout; sweep for them often
        vt = settings.broker_visibility_timeout_s
        transport = {"visibility_timeout": vt, "unacked_restore_interval": max(1, min(10, vt // 2)),
                     "unacked_restore_throttle": 1}
        if settings.broker_key_prefix:  # several deployments (or test runs) sharing one Redis database
            transport["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=MAINTENANCE,
        task_default_exchange=MAINTENANCE,
        task_default_routing_key=MAINTENANCE,
        task_routes={f"reco.{name}.*": {"queue": name, "exchange": name, "routing_key": name} for name in QUEUES},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_track_started=False,
        result_expires=3600,
        worker_prefetch_multiplier=1,
        worker_proc_alive_timeout=60,  # a new pool process may be slow to report up on a busy host
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart is waited out, not fatal
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        timezone="UTC",
    )
    app.reco_settings = settings  # the settings the app was built from
    return app


def app_settings(app: Celery) -> Settings:
    return app.reco_settings


app = create_celery_app(get_settings())
