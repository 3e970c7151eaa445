"""Run kb-daemon for real in tests: kbctl through Click, workers as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner
from waiting import wait_until

from kb_daemon.cli import cli

KBCTL = [sys.executable, "-m", "kb_daemon.cli"]


class Daemon:
    """One isolated kb-daemon installation (home, database, broker) and its worker processes."""

    def __init__(self, home: Path, database_url: str | None = None, model: str = "tiny",
                 lease_seconds: float = 4.0) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.env = {
            "KB_HOME": str(home),
            "KB_DATABASE_URL": database_url or f"sqlite:///{home / 'kb.sqlite3'}",
            "KB_BROKER_URL": ("sqla+" + database_url) if database_url else f"sqla+sqlite:///{home / 'broker.sqlite3'}",
            "KB_MODEL": model,
            "KB_LEASE_SECONDS": str(lease_seconds),
            "KB_HEARTBEAT_SECONDS": "1",
            "KB_REAPER_SECONDS": "2",
            "KB_POLLING_SECONDS": "0.2",
            "KB_BATCH_CHECKPOINT_FACTS": "5",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        self.workers: list[subprocess.Popen[bytes]] = []
        self.commands: dict[int, str] = {}  # pid -> the kbctl command that process runs

    def kbctl(self, *args: str, expect: int = 0) -> Any:
        """Run kbctl in process; parse --json output when asked for."""
        result = CliRunner().invoke(cli, list(args), env=self.env, catch_exceptions=False)
        assert result.exit_code == expect, f"kbctl {' '.join(args)} -> {result.exit_code}\n{result.output}"
        if "--json" in args and expect == 0:
            return json.loads(result.stdout)
        return result

    def kbctl_process(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run kbctl as its own process (for commands that replace their process, like `worker`)."""
        return subprocess.run([*KBCTL, *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)

    def start_worker(self, command: str = "up") -> subprocess.Popen[bytes]:
        # Daemons that share a home (two models) must not write into each other's log files.
        index = len(list(self.home.glob("worker-*.log")))
        log = open(self.home / f"worker-{index}-{self.model}-{command}.log", "wb")
        process = subprocess.Popen([*KBCTL, command], env={**os.environ, **self.env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(process)
        self.commands[process.pid] = command
        return process

    def stop_workers(self) -> list[tuple[str, int]]:
        """SIGTERM every process started here (SIGKILL after 20 s); return (command, exit code) of
        each, in start order. A process killed by a signal has a negative exit code."""
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        codes = [(self.commands.pop(p.pid, "?"), p.returncode) for p in self.workers]
        self.workers.clear()
        return codes

    def kill9(self, process: subprocess.Popen[bytes]) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def logs(self, tail: int | None = None) -> str:
        texts = []
        for path in sorted(self.home.glob("worker-*.log")):
            text = path.read_text(errors="replace")
            texts.append(f"--- {path.name}\n" + (text[-tail:] if tail else text))
        return "\n".join(texts)

    def wait_for(self, predicate: Any, timeout: float = 90.0, what: str = "condition") -> Any:
        """wait_until(predicate), failing with the workers' states and the tail of their logs."""
        def describe() -> str:
            states = ", ".join(f"pid {p.pid}: {'running' if p.poll() is None else f'exited {p.returncode}'}"
                               for p in self.workers)
            return f"(workers: {states or 'none'})\n{self.logs(tail=3000)}"

        return wait_until(predicate, timeout, what, describe)


def job_rows(d: Daemon) -> list[dict]:
    """The jobs of `d`'s model, oldest first, read from its database."""
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT j.seq, j.status, j.attempts, j.result, j.started_at, j.finished_at, j.lease_owner, "
            "j.progress_done "
            "FROM jobs j JOIN models m ON m.id = j.model_id WHERE m.name = :name ORDER BY j.seq"),
            {"name": d.model}).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def version_numbers(d: Daemon) -> list[int]:
    """Every version number of `d`'s model, as `kbctl history` lists them, ascending."""
    return sorted(v["version"] for v in d.kbctl("history", "--limit", "1000", "--json"))


def fresh_postgres_database(server_url: str) -> str:
    """Create an empty database on the test server and return its URL."""
    import sqlalchemy as sa

    name = "kb_" + uuid.uuid4().hex[:10]
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


def registered_daemon(home: Path, database_url: str | None, model_dir: Path, *options: str,
                      model: str = "tiny") -> Daemon:
    """A daemon whose database is initialised, with `model_dir` registered as `model`."""
    d = Daemon(home, database_url, model=model)
    d.kbctl("init")
    d.kbctl("model", "add", model, str(model_dir), *options)
    return d
