"""Security and stored-state faults: pickle refused, credentials hidden, old schema, corrupt blobs."""

from __future__ import annotations

import os
import pickle

import pytest
import sqlalchemy as sa
from daemon_harness import Daemon, fresh_postgres_database
from tiny_models import image, save

Q = "what shape is it?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    save("llava-llama", root / "model")
    image((220, 30, 30)).save(root / "red.png")
    image((30, 30, 220), "circle").save(root / "blue.png")
    return root


class Exploit:
    """Unpickling this runs a command: a worker that unpickles messages would create the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
def test_worker_refuses_pickle_messages(tmp_path, assets):
    from kombu import Connection, Queue

    d = Daemon(tmp_path / "home")
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(assets / "model"))
    marker = tmp_path / "pwned"
    d.start_worker("worker")
    try:
        d.wait_for(lambda: "ready" in d.logs(), what="the worker to start")
        with Connection(d.env["KB_BROKER_URL"]) as connection:
            connection.Producer().publish(
                pickle.dumps(Exploit(str(marker))), routing_key="kb.model.tiny",
                content_type="application/x-python-serialize", content_encoding="binary",
                headers={"task": "kb.process_model", "id": "evil-1", "argsrepr": "", "kwargsrepr": ""},
                declare=[Queue("kb.model.tiny")],
            )
        d.wait_for(lambda: "untrusted content" in d.logs(), timeout=30, what="the refusal in the log")
        # The worker is still healthy: a JSON-signalled edit goes through. The worker has handled the
        # pickled message before this job's, so an unpickled exploit would have created the file by now.
        done = d.kbctl("submit-fact", "--image", str(assets / "red.png"), "--question", Q, "--answer", "box",
                       "--wait", "--timeout", "120", "--json")
        assert done["version"] == 1
        assert not marker.exists()
    finally:
        d.stop_workers()


@pytest.mark.postgres
@pytest.mark.slow
def test_credentials_never_appear_in_output_or_logs(tmp_path, assets, postgres_url):
    secret = "S3cret-Pa55word"
    url = fresh_postgres_database(postgres_url).replace("postgres@", f"postgres:{secret}@")
    d = Daemon(tmp_path / "home", url)  # the test server trusts local connections, any password
    outputs = [d.kbctl("init", "--json"), d.kbctl("model", "add", "tiny", str(assets / "model"), "--json")]
    d.start_worker()
    try:
        outputs.append(d.kbctl("submit-fact", "--image", str(assets / "red.png"), "--question", Q,
                               "--answer", "box", "--wait", "--timeout", "120", "--json"))
        outputs += [d.kbctl(cmd, "--json") for cmd in ("status", "history", "jobs")]
        outputs.append(d.kbctl("model", "list", "--json"))
    finally:
        d.stop_workers()
    unreachable = Daemon(tmp_path / "other", url.rsplit(":", 1)[0] + ":1/nowhere")
    failed = unreachable.kbctl("status", expect=1)
    assert "***" in failed.stderr and failed.stderr.startswith("Error: database ")
    assert failed.stderr.count("\n") == 1
    text = repr(outputs) + failed.stderr + failed.stdout + d.logs()
    assert secret not in text
    assert "postgres:***@" in repr(outputs[0])


def test_worker_refuses_a_database_without_the_current_schema(tmp_path, assets):
    d = Daemon(tmp_path / "home")
    result = d.kbctl_process("worker")
    assert result.returncode == 1, result
    assert result.stderr.startswith("Error: database sqlite:///") and "run `kbctl init`" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    d.kbctl("init")
    # A real older schema: migrate the fresh database back to the first revision.
    from alembic import command

    from kb_daemon.config import Settings
    from kb_daemon.db import SCHEMA_REVISION, Database

    db = Database(Settings.from_env(d.env))
    command.downgrade(db.alembic_config(), "0001")
    db.dispose()
    assert SCHEMA_REVISION != "0001"
    for daemon_command in ("worker", "beat", "up"):
        result = d.kbctl_process(daemon_command)
        assert (result.returncode, result.stderr) == (1, (
            f"Error: database schema is at revision 0001, this code needs {SCHEMA_REVISION}; "
            "run `kbctl db upgrade`\n")), (daemon_command, result)
    assert d.kbctl("status", expect=1).stderr == result.stderr
    d.kbctl("db", "upgrade")
    assert d.kbctl("--model", "demo", "status", "--json")["head_version"] == 0


@pytest.mark.slow
def test_corrupted_blob_names_the_version_and_rollback_restores_service(tmp_path, assets):
    d = Daemon(tmp_path / "home")
    # Loads from the database only: a local cache file of the version, checked against the
    # version's blob digests, would still hold the intact tensors (tests/test_snapshot_cache.py).
    d.env["KB_CODEBOOK_CACHE_VERSIONS"] = "0"
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(assets / "model"))
    d.start_worker()
    try:
        first = d.kbctl("submit-fact", "--image", str(assets / "red.png"), "--question", Q, "--answer", "box",
                        "--negative-image", str(assets / "blue.png"), "--wait", "--timeout", "120", "--json")
        second = d.kbctl("submit-fact", "--image", str(assets / "blue.png"), "--question", Q, "--answer", "ring",
                         "--negative-image", str(assets / "red.png"), "--wait", "--json")
        engine = sa.create_engine(d.env["KB_DATABASE_URL"])
        with engine.begin() as connection:
            digest = connection.execute(sa.text("SELECT blob_sha256 FROM entries WHERE fact_id = :f"),
                                        {"f": second["fact_id"]}).scalar()
            data = connection.execute(sa.text("SELECT data FROM blobs WHERE sha256 = :d"), {"d": digest}).scalar()
            damaged = bytes(data[:-1]) + bytes([data[-1] ^ 0xFF])
            connection.execute(sa.text("UPDATE blobs SET data = :b WHERE sha256 = :d"), {"b": damaged, "d": digest})
        engine.dispose()
        ask = ["ask", "--image", str(assets / "red.png"), "--question", Q]
        broken = d.kbctl(*ask, expect=1)
        assert broken.stderr.startswith(f"Error: version 2 of model 'tiny': stored blob {digest[:12]} fails its "
                                        "SHA-256 check (corrupted); `kbctl rollback V` to an intact version")
        assert d.kbctl(*ask, "--version", "1", "--json")["fact_id"] == first["fact_id"]
        assert d.kbctl("rollback", "1", "--wait", "--json")["version"] == 3
        assert d.kbctl(*ask, "--json") == {"answer": "box", "version": 3, "fact_id": first["fact_id"]}
    finally:
        d.stop_workers()
