"""The worker and beat processes: checks before Celery starts, and the worker's restart in place.

Run as `python -m workers worker --model NAME [--beat] [--loglevel LEVEL]` or
`python -m workers beat [--loglevel LEVEL]` (what `kbctl worker`, `kbctl up` and `kbctl beat`
execute), with the settings in the environment (KB_HOME, KB_DATABASE_URL, KB_BROKER_URL, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.errors import KbError
from kb_daemon.notify import MAINTENANCE_QUEUE, model_queue, prepare_broker
from kb_daemon.queue import get_model
from workers.context import WorkerContext

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Seconds a worker that stopped without being told to (Celery gave up on its broker, say, during
# a long database outage) waits before it runs its command line again.
UNEXPECTED_STOP_RESTART_SECONDS = 5.0
logger = logging.getLogger(__name__)


def run_worker(settings: Settings, model_name: str, *, beat: bool = False, loglevel: str = "INFO") -> int:
    """Run the worker of one model in the foreground (solo pool: one process, model loaded once),
    with Celery beat embedded when `beat`. Returns Celery's exit code when the worker has stopped,
    unless it restarts itself in place, in which case it does not return: after its fact count,
    or after a stop with an error that no operator asked for (a worker must outlive a database
    or broker outage of any length)."""
    from workers.app import create_app

    db = Database(settings)
    db.check_schema()  # refuses an old schema: "run kbctl db upgrade"
    with db.session() as session:
        get_model(session, model_name)
    db.dispose()  # no pooled connection may cross the fork of the embedded beat
    prepare_broker(settings, [model_name])
    context = WorkerContext.create(settings, db, can_restart=True)
    app = create_app(settings, context)
    argv = ["worker", "--pool=solo", "--concurrency=1", f"--loglevel={loglevel}",
            "-Q", f"{model_queue(model_name)},{MAINTENANCE_QUEUE}", "-n", f"kb-{model_name}-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if beat:
        settings.home.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", f"--schedule={settings.home / 'celerybeat-schedule'}"]
    code = 1
    try:
        code = run_celery(app, argv)
        if code and not context.restart.stop_signalled and context.restart.allowed:
            logger.error("the worker stopped with exit code %d without being told to; starting again in %.0f s",
                         code, UNEXPECTED_STOP_RESTART_SECONDS)
            time.sleep(UNEXPECTED_STOP_RESTART_SECONDS)
            context.restart.requested = True
    finally:
        if context.restart.restart_in_place:
            restart_in_place(context)
    return code


def run_celery(app: Any, argv: list[str]) -> int:
    """`celery <argv>` with `app`, returning its exit code (`Celery.worker_main` drops it)."""
    from celery.bin.celery import celery as command
    from click.exceptions import Exit

    command.params[0].default = app
    try:
        code = command.main(args=argv, standalone_mode=False)
    except Exit as exc:
        code = exc.exit_code
    finally:
        command.params[0].default = None
    return int(code or 0)


def restart_in_place(context: WorkerContext) -> None:
    """Replace this process by a fresh run of its own command line (same PID, environment, output
    and process group; Python's file descriptors are not inherited): after its warm shutdown the
    worker starts again, empty of what its edits left in the allocators, and reloads the model."""
    context.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def run_beat(settings: Settings, loglevel: str = "INFO") -> None:
    """Run Celery beat (the reaper and the nightly ingestion) in the foreground. Run exactly one."""
    from workers.app import create_app

    db = Database(settings)
    db.check_schema()
    db.dispose()
    prepare_broker(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    create_app(settings).start(["beat", f"--loglevel={loglevel}",
                                f"--schedule={settings.home / 'celerybeat-schedule'}"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run the worker of one model")
    worker.add_argument("--model", required=True, help="registered model whose jobs this worker applies")
    worker.add_argument("--beat", action="store_true", help="embed Celery beat (the reaper, nightly ingestion)")
    worker.add_argument("--loglevel", default="INFO")
    beat = commands.add_parser("beat", help="run Celery beat")
    beat.add_argument("--loglevel", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The error boundary of the entry point: a KbError is one line `Error: ...` on stderr, exit 1."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    try:
        settings = Settings.from_env()
        if args.command == "worker":
            return run_worker(settings, args.model, beat=args.beat, loglevel=args.loglevel)
        run_beat(settings, args.loglevel)
    except KbError as exc:
        print(f"Error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0
