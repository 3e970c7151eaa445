"""The Celery app: JSON only, one queue per model plus a maintenance queue, beat schedule.

Start a worker with `kbctl worker --model NAME`, or `celery -A workers.app worker --pool=solo
-Q kb.model.NAME,kb.maintenance`.
"""

from __future__ import annotations

import kombu.transport.sqlalchemy
from celery import Celery
from celery.schedules import crontab

from kb_daemon.config import Settings
from kb_daemon.notify import INGEST_NIGHTLY, REAP, celery_config


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    # broker_transport_options={"polling_interval": ...} crashes this transport (the key reaches
    # create_engine); the class attribute is the working knob.
    kombu.transport.sqlalchemy.Transport.polling_interval = settings.polling_seconds
    app = Celery("kb-daemon", include=["workers.tasks"])
    app.conf.update(celery_config(settings))
    minute, hour, day_of_month, month, day_of_week = settings.ingest_schedule.split()
    app.conf.beat_schedule = {
        "reap": {"task": REAP, "schedule": settings.reaper_seconds},
        "nightly-ingest": {
            "task": INGEST_NIGHTLY,
            "schedule": crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                                day_of_week=day_of_week),
        },
    }
    app.conf.kb_settings = settings
    return app


app = create_app()
