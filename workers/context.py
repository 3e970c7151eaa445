"""What one worker process holds while it runs, made once when the worker starts.

Tasks reach it through their Celery app (`worker_context(task.app)`); nothing of it lives in
class attributes or module globals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.models import Model
from kb_daemon.runtime import Loaded, ModelRuntime, load_model

logger = logging.getLogger(__name__)


@dataclass
class RestartPolicy:
    """When a worker restarts itself in place: after `facts_limit` facts (KB_WORKER_RESTART_FACTS).

    Only a worker started by `python -m workers worker` can execute its own command line again
    (`allowed`); one started as `celery -A workers.app worker` counts facts but never restarts.
    """

    facts_limit: int  # 0: never
    allowed: bool
    facts_applied: int = 0  # facts this process has applied
    requested: bool = False
    stop_signalled: bool = False  # an operator's SIGTERM/SIGINT: stop, do not come back

    def count(self, facts: int) -> bool:
        """Add the facts a task applied; True when the worker must restart after this task."""
        self.facts_applied += facts
        return self.allowed and self.facts_limit > 0 and self.facts_applied >= self.facts_limit

    @property
    def restart_in_place(self) -> bool:
        """After the worker stopped: run again, unless an operator asked it to stop."""
        return self.requested and not self.stop_signalled


@dataclass
class WorkerContext:
    """The settings, the database, the loaded models (one runtime per model name) and the restart
    policy of one worker process."""

    settings: Settings
    db: Database
    restart: RestartPolicy
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings, db: Database | None = None, *, can_restart: bool = False) -> WorkerContext:
        return cls(settings, db or Database(settings), RestartPolicy(settings.worker_restart_facts, can_restart))

    def runtime_for(self, model: Model) -> ModelRuntime:
        """The model's runtime, loaded on first use and kept for the life of the process."""
        runtime = self.runtimes.get(model.name)
        if runtime is None:
            logger.info("loading model %s from %s", model.name, model.path)
            runtime = ModelRuntime(model, self.settings)
            self.runtimes[model.name] = runtime
        return runtime

    def load(self, model_name: str, *, load_codebook: bool = True) -> Loaded:
        """The model's kept runtime at the head (see kb_daemon.runtime.load_model)."""
        return load_model(self.db, model_name, runtime_for=self.runtime_for, load_codebook=load_codebook)

    def close(self) -> None:
        """Finish the codebook cache writes under way (the restarted process reads the head from
        its cache file), then close the database's pooled connections (before the process
        executes itself again)."""
        for runtime in self.runtimes.values():
            runtime.wait_for_cache()
        self.db.dispose()


def worker_context(app: Any) -> WorkerContext:
    """The context of the worker whose app runs a task (workers.app.WorkerApp.context)."""
    context = getattr(app, "context", None)
    if context is None:
        raise RuntimeError("this Celery app has no WorkerContext; start workers with `python -m workers worker`")
    return context
