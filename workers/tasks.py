"""Celery tasks: thin, idempotent, JSON ids in. The work is in workers.runner.

Tasks are shared tasks: they join the app each process makes at start (workers.app.create_app)
and reach that process's WorkerContext through it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Task, shared_task

from kb_daemon.db import DatabaseUnavailable
from kb_daemon.notify import INGEST_NIGHTLY, PING, PROCESS_MODEL, REAP, model_queue, signal_model
from workers.context import WorkerContext, worker_context
from workers.runner import release_free_memory, run_pending

logger = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@shared_task(name=PROCESS_MODEL, bind=True, ignore_result=True)
def process_model(self: Task, model_name: str) -> list[dict[str, Any]]:
    context = worker_context(self.app)
    try:
        outcomes = run_pending(context.db, context.runtime_for, str(model_name), worker_id(), context.settings)
    except DatabaseUnavailable as exc:
        # Nothing was stored; the job's lease lapses and the reaper hands it out again.
        logger.warning("%s; the job will be retried when the database is back", exc)
        return []
    restart = context.restart
    if restart.count(sum(int(o.get("edits", 0)) for o in outcomes)):
        count = restart.facts_applied
        request_restart(context, f"{count:,} {'fact' if count == 1 else 'facts'} applied since this worker "
                                 f"started (KB_WORKER_RESTART_FACTS={restart.facts_limit})")
    return outcomes


def request_restart(context: WorkerContext, reason: str) -> None:
    """Stop taking work once this task returns; `python -m workers` then executes its own command
    line again, in this process (workers.process)."""
    if not context.restart.requested:
        logger.warning("%s: restarting in place to give back the memory the edits left behind", reason)
    context.restart.requested = True
    request_warm_shutdown()


def request_warm_shutdown() -> None:
    """Make the worker stop after the task that is running: its message is acknowledged, the
    embedded beat stops, and `worker_main` returns.

    Celery has no public API for a warm shutdown asked for from inside a task. Its own SIGTERM
    handler sets the internal `celery.worker.state.should_stop`, which the consumer loop reads
    before it takes the next message; this is the one place in kb-daemon that sets it.
    """
    from celery.worker import state

    state.should_stop = 0  # EX_OK: the exit status of a warm shutdown


@shared_task(name=REAP, bind=True, ignore_result=True)
def reap(self: Task) -> list[str]:
    from workers.maintenance import reap_once

    context = worker_context(self.app)
    try:
        return reap_once(context.db, context.settings)
    except DatabaseUnavailable as exc:
        logger.warning("reaper skipped: %s", exc)
        return []


@shared_task(name=INGEST_NIGHTLY, bind=True, ignore_result=True)
def ingest_nightly(self: Task) -> list[dict[str, Any]]:
    from workers.maintenance import ingest_all

    context = worker_context(self.app)
    return ingest_all(context.db, context.settings)


@shared_task(name=PING, ignore_result=False)
def ping() -> str:
    return "pong"


def load_and_drain_on_start(app: Any, context: WorkerContext, consumer: Any) -> None:
    """A (re)started worker loads its model and the head codebook, then looks for waiting work at
    once instead of waiting for the reaper (run on Celery's worker_ready signal)."""
    queues = getattr(getattr(consumer, "task_consumer", None), "queues", []) or []
    prefix = model_queue("")
    for queue in queues:
        if queue.name.startswith(prefix):
            model_name = queue.name[len(prefix):]
            preload(context, model_name)
            signal_model(context.settings, model_name, app)


def preload(context: WorkerContext, model_name: str) -> None:
    """Load the model and its head version's codebook, so the worker's memory is what it holds
    while it serves and its first job does not wait for the load. A failure is logged, not
    raised: the first job reports it as a failed job, as it would without the preload."""
    try:
        loaded = context.load(model_name)
        entries = len(loaded.runtime.editor.codebook)
        release_free_memory(context.db)
    except Exception as exc:  # noqa: BLE001 - logged; the job that needs the model reports it
        logger.warning("model %s not preloaded: %s", model_name, exc)
        return
    logger.info("model %s ready at version %d (%d entries)", model_name, loaded.version, entries)
