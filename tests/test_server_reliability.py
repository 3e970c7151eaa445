"""`kbctl serve` when things go wrong or change under it: the database going away and coming back,
a killed server restarted, a version change that reads only what changed, and `kbctl up --serve`."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from daemon_harness import KBCTL, Daemon, fresh_postgres_database, registered_daemon
from server_harness import Server, chat_body, free_port, make_token
from waiting import wait_until

FAST = ("--hparam", "max_steps=3", "--hparam", "max_new_tokens=8", "--hparam", "max_answer_tokens=8")
Q = "what shape is it?"


def served_version(server: Server, token: str, image: bytes) -> int:
    with server.client(token) as http:
        response = http.post("/v1/chat/completions", json=chat_body("tiny", Q, image))
    assert response.status_code == 200, response.text
    return int(response.headers["X-KB-Version"])


def submit(d: Daemon, image_path, answer: str) -> int:
    return d.kbctl("submit-fact", "--image", str(image_path), "--question", Q, "--answer", answer, "--wait",
                   "--json")["version"]


@pytest.mark.slow
@pytest.mark.postgres
def test_database_outage_and_a_killed_server(tmp_path, tiny_assets):
    from pg_server import PostgresServer, require_bin_dir

    postgres = PostgresServer(require_bin_dir())
    d = registered_daemon(tmp_path / "home", fresh_postgres_database(postgres.start()), tiny_assets / "tiny", *FAST)
    token = make_token(d, "ops", "reader")
    red = (tiny_assets / "red.png").read_bytes()
    d.start_worker("up")
    server = Server(d, "--model", "tiny").start()
    try:
        first = submit(d, tiny_assets / "red.png", "box")
        wait_until(lambda: served_version(server, token, red) == first, 10, f"answers from version {first}")

        postgres._run("pg_ctl", "-D", str(postgres.data), "-m", "fast", "-w", "stop")
        with server.client(token) as http:
            def not_ready() -> dict | None:
                response = http.get("/readyz")
                return response.json() if response.status_code == 503 else None

            state = wait_until(not_ready, 10, "/readyz to report the outage")["models"]["tiny"]
            assert (state["database_ok"], state["loaded_version"]) == (False, first)
            assert state["error"]
            time.sleep(1.0)
            for _ in range(3):  # still answering, from the last version loaded
                assert served_version(server, token, red) == first
            assert http.get("/readyz").json()["models"]["tiny"]["staleness_seconds"] >= 1.0
            refused = http.get("/v1/models/tiny/versions")  # needs the database: a clear 503
            assert refused.status_code == 503
            assert refused.json()["error"] == {"type": "unavailable",
                                               "message": "the database cannot be reached; retry later"}

        postgres._run("pg_ctl", "-D", str(postgres.data), "-o",
                      f"-c listen_addresses=127.0.0.1 -p {postgres.port} -c fsync=off -k {postgres.root}",
                      "-l", str(postgres.root / "log"), "-w", "start")
        with server.client(token) as http:
            wait_until(lambda: http.get("/readyz").status_code == 200, 30, "/readyz after the outage")
        second = d.wait_for(lambda: _try_submit(d, tiny_assets / "green.png", "disc"), timeout=120,
                            what="a fact applied after the outage")
        wait_until(lambda: served_version(server, token, red) == second, 10, f"answers from version {second}")

        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        back = d.kbctl("rollback", "0", "--wait", "--json")["version"]
        restarted = Server(d, "--model", "tiny").start()
        try:
            assert served_version(restarted, token, red) == back  # the current head, at once
        finally:
            restarted.stop()
        assert token not in server.log() + restarted.log() + d.logs()
    finally:
        server.stop()
        d.stop_workers()
        postgres.stop()


def _try_submit(d: Daemon, image_path, answer: str) -> int | None:
    try:
        return submit(d, image_path, answer)
    except AssertionError:  # the worker is still reconnecting to the broker
        return None


@pytest.mark.slow
def test_a_version_change_reads_only_the_changed_entries(tmp_path, tiny_assets):
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.errors import InvalidInput
    from kb_daemon.runtime import open_image
    from kb_daemon.server.hosting import ModelHost

    d = registered_daemon(tmp_path / "home", None, tiny_assets / "tiny", *FAST)
    d.start_worker("worker")
    names = ("red", "green", "blue", "black")
    try:
        versions = [submit(d, tiny_assets / f"{name}.png", name) for name in names[:3]]
        # Without the worker's codebook cache, the first load reads every entry.
        db = Database(Settings.from_env({**d.env, "KB_CODEBOOK_CACHE_VERSIONS": "0"}))
        host = ModelHost(db, "tiny", poll_seconds=0.1)
        host.start()
        try:
            assert (host.head_number, host.blobs_read) == (versions[-1], 3)
            added = submit(d, tiny_assets / "black.png", "black")
            wait_until(lambda: host.head_number == added, 10, "the host to follow the edit")
            assert host.blobs_read == 4  # one new entry: one blob
            back = d.kbctl("rollback", str(versions[0]), "--wait", "--json")["version"]
            wait_until(lambda: host.head_number == back, 10, "the host to follow the rollback")
            assert host.blobs_read == 4  # entries it already holds: no blob read
            with pytest.raises(InvalidInput, match="answers questions about an image; send one"):
                host.submit(None, Q)
            pinned = host.submit(open_image((tiny_assets / "red.png").read_bytes()), Q, versions[1]).result(timeout=30)
            assert pinned.version == versions[1] and host.blobs_read == 4
        finally:
            host.stop()
            db.dispose()
        # With it, a server starting at the head reads its cache file and no blob.
        cache = d.home / "cache" / "codebooks"
        wait_until(lambda: any(p.name == f"version-{back}.safetensors" for p in cache.rglob("*")),
                   30, "the worker to write the head's cache file")
        db = Database(Settings.from_env(d.env))
        host = ModelHost(db, "tiny", poll_seconds=0.1)
        host.start()
        try:
            assert (host.head_number, host.blobs_read) == (back, 0)
        finally:
            host.stop()
            db.dispose()
    finally:
        d.stop_workers()


@pytest.mark.slow
def test_a_head_that_fails_to_load_is_reported_apart_from_a_database_outage(tmp_path, tiny_assets):
    import sqlalchemy as sa

    from kb_daemon.config import Settings
    from kb_daemon.db import Database, make_engine
    from kb_daemon.server.hosting import ModelHost

    d = registered_daemon(tmp_path / "home", None, tiny_assets / "tiny", *FAST)
    d.start_worker("worker")
    try:
        first = submit(d, tiny_assets / "red.png", "box")
        # No local codebook cache: the host reads the blobs, so the corrupt one is what it meets.
        db = Database(Settings.from_env({**d.env, "KB_CODEBOOK_CACHE_VERSIONS": "0"}))
        host = ModelHost(db, "tiny", poll_seconds=3600)  # follows only when woken
        host.start()
        try:
            assert (host.head_number, host.state().database_ok, host.state().last_error) == (first, True, None)
            second = submit(d, tiny_assets / "green.png", "disc")
            with db.engine.begin() as connection:  # damage the one blob the new version adds
                digest = connection.execute(sa.text("SELECT blob_sha256 FROM entries WHERE answer = 'disc'")).scalar()
                data = connection.execute(sa.text("SELECT data FROM blobs WHERE sha256 = :d"), {"d": digest}).scalar()
                connection.execute(sa.text("UPDATE blobs SET data = :b WHERE sha256 = :d"),
                                   {"b": bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]), "d": digest})
            host.wake()
            state = wait_until(lambda: host.state() if host.state().last_error else None, 10, "the load to fail")
            assert (state.database_ok, state.loaded_version, state.head_version) == (True, first, second)
            assert "fails its SHA-256 check" in state.last_error

            reachable = db.engine
            db.engine = make_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'kb.sqlite3'}", 1.0)
            host.wake()
            state = wait_until(lambda: host.state() if not host.state().database_ok else None, 10, "the outage")
            assert state.loaded_version == first and "is unavailable" in state.last_error
            db.engine.dispose()
            db.engine = reachable

            back = d.kbctl("rollback", str(first), "--wait", "--json")["version"]
            host.wake()
            wait_until(lambda: host.head_number == back, 10, "the host to follow the rollback")
            state = host.state()
            assert (state.database_ok, state.last_error, state.lag_versions) == (True, None, 0)
        finally:
            host.stop()
            db.dispose()
    finally:
        d.stop_workers()


@pytest.mark.slow
def test_up_serve_runs_worker_and_server_together(tmp_path, tiny_assets):
    import os
    import subprocess

    d = registered_daemon(tmp_path / "home", None, tiny_assets / "tiny", *FAST)
    token = make_token(d, "me", "reader")
    port = free_port()
    log = open(d.home / "up-serve.log", "wb")
    up = subprocess.Popen([*KBCTL, "up", "--serve", "--port", str(port)], env={**os.environ, **d.env}, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _alive(url), 120, "the server of kbctl up --serve",
                   describe=lambda: (d.home / "up-serve.log").read_text())
        version = submit(d, tiny_assets / "red.png", "box")  # the worker of the same command applies it
        server = Server(d, port=port)
        red = (tiny_assets / "red.png").read_bytes()
        wait_until(lambda: served_version(server, token, red) == version, 10, "the server to follow the edit")
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    wait_until(lambda: not _alive(url), 10, "the server to stop with the worker")


def _alive(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
