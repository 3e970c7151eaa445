"""The database goes away in the middle of a job: nothing is marked done that was not stored, and
the job runs again once the database is back."""

from __future__ import annotations

import sqlite3

import pytest
from daemon_harness import Daemon, fresh_postgres_database, job_rows, version_numbers
from tiny_models import image, save

Q = "what shape is it?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("outage")
    save("llava-llama", root / "model")
    image((200, 40, 40)).save(root / "red.png")
    return root


def start_slow_job(d: Daemon, tiny_dir) -> None:
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(tiny_dir / "model"), "--hparam", "max_steps=1500",
            "--hparam", "early_stop=false")
    d.start_worker()
    d.kbctl("submit-fact", "--image", str(tiny_dir / "red.png"), "--question", Q, "--answer", "box")
    d.wait_for(lambda: job_rows(d)[0]["status"] == "running", what="the job to start")


@pytest.mark.slow
def test_sqlite_locked_longer_than_the_timeout(tmp_path, tiny_dir):
    d = Daemon(tmp_path / "home", lease_seconds=3.0)
    d.env["KB_SQLITE_BUSY_SECONDS"] = "1"
    try:
        start_slow_job(d, tiny_dir)
        blocker = sqlite3.connect(d.home / "kb.sqlite3", timeout=30)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            d.wait_for(lambda: "will be retried when the database is back" in d.logs(), timeout=120,
                       what="the job to fail on the lock")
            assert version_numbers_raw(d.home / "kb.sqlite3", blocker) == [0]
        finally:
            blocker.rollback()
            blocker.close()
        d.wait_for(lambda: job_rows(d)[0]["status"] == "done", timeout=240, what="the retried job")
        assert job_rows(d)[0]["attempts"] >= 2
        assert version_numbers(d) == [0, 1]
    finally:
        d.stop_workers()


def version_numbers_raw(path, connection) -> list[int]:
    return [r[0] for r in connection.execute(
        "SELECT v.number FROM versions v JOIN models m ON m.id = v.model_id WHERE m.name = 'tiny' ORDER BY 1")]


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_stopped_mid_job(tmp_path, tiny_dir):
    from pg_server import PostgresServer, require_bin_dir

    server = PostgresServer(require_bin_dir())
    url = fresh_postgres_database(server.start())
    d = Daemon(tmp_path / "home", url, lease_seconds=3.0)
    try:
        start_slow_job(d, tiny_dir)
        refused = "Couldn't apply scheduled task reap"  # beat, when the broker (this database) is down
        refused_before = d.logs().count(refused)
        server._run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "stop")
        d.wait_for(lambda: "will be retried when the database is back" in d.logs(), timeout=120,
                   what="the worker to notice the outage")
        # The outage lasts until the embedded beat, too, has failed against it: the daemon as a whole
        # has to come back, not only the job.
        d.wait_for(lambda: d.logs().count(refused) > refused_before, timeout=60,
                   what="beat to fail to send the reaper while the database is down")
        server._run("pg_ctl", "-D", str(server.data), "-o",
                    f"-c listen_addresses=127.0.0.1 -p {server.port} -c fsync=off -k {server.root}",
                    "-l", str(server.root / "log"), "-w", "start")
        d.wait_for(lambda: job_rows(d)[0]["status"] == "done", timeout=240, what="the retried job")
        assert job_rows(d)[0]["attempts"] >= 2
        assert version_numbers(d) == [0, 1]
    finally:
        d.stop_workers()
        server.stop()
