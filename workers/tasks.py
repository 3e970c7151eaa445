"""Celery tasks: thin, idempotent, JSON ids in. The work is in workers.runner."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutting_down

from kb_daemon.db import Database, DatabaseUnavailable
from kb_daemon.models import Model
from kb_daemon.notify import INGEST_NIGHTLY, PING, PROCESS_MODEL, REAP, signal_model
from kb_daemon.queue import get_model
from kb_daemon.runtime import ModelRuntime
from workers.app import app
from workers.runner import release_free_memory, run_pending

logger = logging.getLogger(__name__)


class RuntimeTask(Task):
    """Holds per-process resources: the database and the loaded model (loaded once)."""

    _db: Database | None = None
    _runtimes: dict[str, ModelRuntime] = {}
    edits_applied = 0  # facts this process has applied, for KB_WORKER_RESTART_FACTS
    can_restart = False  # set by `kbctl worker` / `kbctl up`, which re-execute themselves
    restart_requested = False
    stop_signalled = False  # an operator's SIGTERM/SIGINT: stop, do not come back

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
    settings = self.app.conf.kb_settings
    try:
        outcomes = run_pending(self.db, self.runtime_for, str(model_name), worker_id(), settings)
    except DatabaseUnavailable as exc:
        # Nothing was stored; the job's lease lapses and the reaper hands it out again.
        logger.warning("%s; the job will be retried when the database is back", exc)
        return []
    RuntimeTask.edits_applied += sum(int(o.get("edits", 0)) for o in outcomes)
    if (RuntimeTask.can_restart and settings.worker_restart_facts
            and RuntimeTask.edits_applied >= settings.worker_restart_facts):
        count = RuntimeTask.edits_applied
        request_restart(f"{count:,} {'fact' if count == 1 else 'facts'} applied since this worker started "
                        f"(KB_WORKER_RESTART_FACTS={settings.worker_restart_facts})")
    return outcomes


def request_restart(reason: str) -> None:
    """Stop taking work once this task returns (a warm shutdown: the job is stored and its message
    acknowledged); `kbctl worker` then executes its own command line again, in this process."""
    from celery.worker import state

    if not RuntimeTask.restart_requested:
        logger.warning("%s: restarting in place to give back the memory the edits left behind", reason)
    RuntimeTask.restart_requested = True
    state.should_stop = 0  # EX_OK, read by the consumer loop before it takes the next message


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


@worker_shutting_down.connect
def _note_stop_signal(**_kwargs: Any) -> None:
    """Sent by Celery's handlers of SIGTERM, SIGINT and SIGQUIT: a worker told to stop stops, even
    when a restart was already requested."""
    RuntimeTask.stop_signalled = True


@worker_ready.connect
def _load_and_drain_on_start(sender: Any = None, **_kwargs: Any) -> None:
    """A (re)started worker loads its model and the head codebook, then looks for waiting work at
    once instead of waiting for the reaper."""
    settings = app.conf.kb_settings
    queues = getattr(getattr(sender, "task_consumer", None), "queues", []) or []
    for queue in queues:
        if queue.name.startswith("kb.model."):
            model_name = queue.name[len("kb.model."):]
            preload(model_name)
            signal_model(settings, model_name, app)


def preload(model_name: str) -> None:
    """Load the model and its head version's codebook, so the worker's memory is what it holds
    while it serves and its first job does not wait for the load. A failure is logged, not
    raised: the first job reports it as a failed job, as it would without the preload."""
    task = process_model
    try:
        # As a job does (workers.runner._run_one): the model loaded outside any transaction, then
        # its spec recorded or checked and the head read and loaded in one.
        with task.db.session() as session:
            model = get_model(session, model_name)
        runtime = task.runtime_for(model)
        with task.db.session() as session:
            model = get_model(session, model_name)
            runtime.check_spec(session, model)
            head = model.head_version
            runtime.use_version(session, model, head)
        entries = len(runtime.editor.codebook)
        release_free_memory(task.db)
    except Exception as exc:  # noqa: BLE001 - logged; the job that needs the model reports it
        logger.warning("model %s not preloaded: %s", model_name, exc)
        return
    logger.info("model %s ready at version %d (%d entries)", model_name, head, entries)
