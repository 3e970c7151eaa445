"""Task names, queues and the Celery configuration; signals go out only after a commit.

A Celery message carries no work, only "model X has jobs waiting": losing one delays work until
the reaper re-signals, and a duplicate finds nothing to claim.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kb_daemon.config import Settings, redact

logger = logging.getLogger(__name__)

PROCESS_MODEL = "kb.process_model"
REAP = "kb.reap"
INGEST_NIGHTLY = "kb.ingest_nightly"
PING = "kb.ping"
MAINTENANCE_QUEUE = "kb.maintenance"


def model_queue(model_name: str) -> str:
    return f"kb.model.{model_name}"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": False,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": MAINTENANCE_QUEUE,
    }


def make_sender(settings: Settings) -> Any:
    from celery import Celery

    app = Celery("kb-daemon-client")
    app.conf.update(celery_config(settings))
    return app


def signal_model(settings: Settings, model_name: str, app: Any = None) -> bool:
    """Tell the model's worker that jobs are waiting. Failure is logged, not raised."""
    try:
        sender = app or make_sender(settings)
        sender.send_task(PROCESS_MODEL, args=[model_name], queue=model_queue(model_name))
        return True
    except Exception as exc:  # noqa: BLE001  (the reaper re-signals; the job is already recorded)
        logger.warning("could not signal the worker of %r through %s (%s); the reaper will retry",
                       model_name, redact(settings.broker_url), type(exc).__name__)
        return False


def prepare_broker(settings: Settings, model_names: Iterable[str] = ()) -> None:
    """Create kombu's tables and declare the queues once, before workers and submitters start.

    Both steps race when done concurrently by several processes: kombu's SQL transport guards
    table creation and its check-then-insert of a queue row with a per-process lock only, so a
    worker declaring `kb.model.X` while `kbctl submit-fact` first publishes to it can fail with
    "UNIQUE constraint failed: kombu_queue.name". Declaring every queue here (from `kbctl init`,
    `kbctl model add` and before a worker starts) leaves nothing to create later.
    """
    if settings.broker_url.startswith("sqla+sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    sender = make_sender(settings)
    with sender.connection_for_write() as connection:
        channel = connection.default_channel
        session = getattr(channel, "session", None)  # the SQL transport creates its tables on first use
        try:
            for queue in (MAINTENANCE_QUEUE, *(model_queue(name) for name in model_names)):
                channel.queue_declare(queue=queue)
        finally:
            # Declaring a queue that exists leaves the SQL transport's session in a transaction,
            # holding a pooled connection, and closing the channel does not end it; unclosed, it
            # stays checked out until garbage collection, maybe after the server has gone.
            if session is not None:
                session.close()
    _close_broker_engines()


def _close_broker_engines() -> None:
    """Close the engines kombu's SQL transport caches per URL for the life of the process.

    `kbctl up` forks Celery beat right after `prepare_broker`; a child that inherits a pooled
    SQLite connection fails with "disk I/O error" on its first query (measured: the beat of a
    restarted worker could not send one reaper message). The worker opens its own engine later.
    """
    from kombu.transport.sqlalchemy import Channel

    for engine, _sessionmaker in list(Channel._engines.values()):
        engine.dispose()
    Channel._engines.clear()
