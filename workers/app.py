"""The Celery app: JSON only, one queue per model plus a maintenance queue, the beat schedule.

`python -m workers worker --model NAME` (workers.process) makes the app when the worker starts,
from the settings it has read, with the worker's context. Importing this module reads nothing
and configures nothing; `celery -A workers.app worker --pool=solo -Q kb.model.NAME,kb.maintenance`
gets an app made from the environment when Celery first asks for `workers.app.app`.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_ready, worker_shutting_down

from kb_daemon.config import Settings
from kb_daemon.notify import INGEST_NIGHTLY, REAP, celery_config
from workers.context import WorkerContext


class WorkerApp(Celery):
    """A Celery app that carries its worker's context (None in a beat process)."""

    context: WorkerContext | None = None


def create_app(settings: Settings, context: WorkerContext | None = None) -> WorkerApp:
    """The app of this process. With a context, the worker's start and stop signals reach it."""
    import kombu.transport.sqlalchemy

    # broker_transport_options={"polling_interval": ...} crashes this transport (the key reaches
    # create_engine); the class attribute is the working knob.
    kombu.transport.sqlalchemy.Transport.polling_interval = settings.polling_seconds
    app = WorkerApp("kb-daemon", include=["workers.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = beat_schedule(settings)
    app.context = context
    if context is not None:
        _connect_worker_signals(app, context)
    return app


def beat_schedule(settings: Settings) -> dict[str, Any]:
    minute, hour, day_of_month, month, day_of_week = settings.ingest_schedule.split()
    return {
        "reap": {"task": REAP, "schedule": settings.reaper_seconds},
        "nightly-ingest": {
            "task": INGEST_NIGHTLY,
            "schedule": crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                                day_of_week=day_of_week),
        },
    }


def _connect_worker_signals(app: WorkerApp, context: WorkerContext) -> None:
    def note_stop_signal(**_kwargs: Any) -> None:
        """Sent by Celery's handlers of SIGTERM, SIGINT and SIGQUIT: a worker told to stop stops,
        even when a restart was already requested."""
        context.restart.stop_signalled = True

    def load_and_drain(sender: Any = None, **_kwargs: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        from workers.tasks import load_and_drain_on_start

        load_and_drain_on_start(app, context, sender)

    worker_shutting_down.connect(note_stop_signal, weak=False)
    worker_ready.connect(load_and_drain, weak=False)


@functools.cache
def _app_from_environment() -> WorkerApp:
    settings = Settings.from_env()
    return create_app(settings, WorkerContext.create(settings))


def __getattr__(name: str) -> Any:
    """`workers.app.app`, the app `celery -A workers.app` looks for, made on first access."""
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
