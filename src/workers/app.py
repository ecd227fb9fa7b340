"""The Celery app: ``celery -A workers worker -Q explain.openai,score.openai,...``.

Delivery is at least once and the work idempotent: a task is acknowledged only after
its outcome is written (late acknowledgement), a task whose worker dies is handed to
another after the visibility timeout (longer than any task may run), each worker takes
one message at a time, and a task whose outcome already exists does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger

from labeler.redaction import redact_handlers
from workers.settings import FleetSettings

QUEUE_STAGES = ("explain", "score", "classify", "label")
QUEUE_PROVIDERS = ("openai", "anthropic", "local", "heuristic")


def make_app(settings: FleetSettings | None = None) -> Celery:
    settings = settings or FleetSettings.from_env()
    app = Celery("labeler", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        # kombu's Redis transport, kept alive when the connection to Redis breaks
        broker_transport="workers.broker:Transport",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # every worker looks for messages of dead workers this often (by default kombu
            # looks every 100 s, so they would return that long after the timeout)
            "unacked_restore_interval": settings.restore_sweep_s,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": settings.restore_lock_s,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep trying while Redis restarts
        task_ignore_result=True,  # outcomes travel on the run's stream, not as results
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="label.heuristic",
        worker_send_task_events=True,  # celery events, Flower
        task_send_sent_event=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.labeler_settings = settings
    return app


@after_setup_logger.connect  # type: ignore[untyped-decorator]
@after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _redact_worker_logs(logger: logging.Logger, **_: Any) -> None:
    """Keys echoed in an error never reach the worker's log."""
    redact_handlers(logger)
    redact_handlers()


app = make_app()
