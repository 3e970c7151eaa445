"""Celery tasks: thin, idempotent, JSON ids in. The work is in workers.runner."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Task
from celery.signals import worker_ready

from kb_daemon.db import Database, DatabaseUnavailable
from kb_daemon.models import Model
from kb_daemon.notify import INGEST_NIGHTLY, PING, PROCESS_MODEL, REAP, signal_model
from kb_daemon.runtime import ModelRuntime
from workers.app import app
from workers.runner import run_pending

logger = logging.getLogger(__name__)


class RuntimeTask(Task):
    """Holds per-process resources: the database and the loaded model (loaded once)."""

    _db: Database | None = None
    _runtimes: dict[str, ModelRuntime] = {}

    @property
    def db(self) -> Database:
        if RuntimeTask._db is None:
            RuntimeTask._db = Database(self.app.conf.kb_settings)
        return RuntimeTask._db

    def runtime_for(self, model: Model) -> ModelRuntime:
        runtime = RuntimeTask._runtimes.get(model.name)
        if runtime is None:
            logger.info("loading model %s from %s", model.name, model.path)
            runtime = ModelRuntime(model)
            RuntimeTask._runtimes[model.name] = runtime
        return runtime


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=PROCESS_MODEL, base=RuntimeTask, bind=True, ignore_result=True)
def process_model(self: RuntimeTask, model_name: str) -> list[dict[str, Any]]:
    try:
        return run_pending(self.db, self.runtime_for, str(model_name), worker_id(), self.app.conf.kb_settings)
    except DatabaseUnavailable as exc:
        # Nothing was stored; the job's lease lapses and the reaper hands it out again.
        logger.warning("%s; the job will be retried when the database is back", exc)
        return []


@app.task(name=REAP, base=RuntimeTask, bind=True, ignore_result=True)
def reap(self: RuntimeTask) -> list[str]:
    from workers.maintenance import reap_once

    try:
        return reap_once(self.db, self.app.conf.kb_settings)
    except DatabaseUnavailable as exc:
        logger.warning("reaper skipped: %s", exc)
        return []


@app.task(name=INGEST_NIGHTLY, base=RuntimeTask, bind=True, ignore_result=True)
def ingest_nightly(self: RuntimeTask) -> list[dict[str, Any]]:
    from workers.maintenance import ingest_all

    return ingest_all(self.db, self.app.conf.kb_settings)


@app.task(name=PING, ignore_result=False)
def ping() -> str:
    return "pong"


@worker_ready.connect
def _drain_on_start(sender: Any = None, **_kwargs: Any) -> None:
    """A (re)started worker looks for waiting work at once instead of waiting for the reaper."""
    settings = app.conf.kb_settings
    queues = getattr(getattr(sender, "task_consumer", None), "queues", []) or []
    for queue in queues:
        if queue.name.startswith("kb.model."):
            signal_model(settings, queue.name[len("kb.model."):], app)
