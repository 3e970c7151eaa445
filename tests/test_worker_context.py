"""The explicit worker: no import-time side effects, the entry point's checks, the restart policy,
the app made at start with its WorkerContext, and the one load sequence (kb_daemon.runtime.load_model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.errors import NotFound
from kb_daemon.notify import INGEST_NIGHTLY, PING, PROCESS_MODEL, REAP

ROOT = Path(__file__).resolve().parent.parent

IMPORT_ONLY = """
import json, kombu.transport.sqlalchemy as sql
before = sql.Transport.polling_interval
import workers.app, workers.tasks, workers.process, workers.context, workers.maintenance, workers.runner
print(json.dumps({"before": before, "after": sql.Transport.polling_interval}))
"""


def test_importing_workers_reads_no_settings_and_sets_nothing(tmp_path):
    home = tmp_path / "home"
    # Settings.from_env() would refuse this value: importing must not read the settings.
    env = {"PATH": "/usr/bin:/bin", "KB_HOME": str(home), "KB_LEASE_SECONDS": "not-a-number",
           "KB_POLLING_SECONDS": "0.01", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", IMPORT_ONLY], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    polling = json.loads(result.stdout.splitlines()[-1])
    assert polling["after"] == polling["before"] != 0.01
    assert not home.exists()  # no database was opened


def run_entry_point(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", *args], env={"PATH": "/usr/bin:/bin", **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_entry_point_refuses_a_missing_schema_an_unknown_model_and_a_bad_setting(tmp_path):
    env = {"KB_HOME": str(tmp_path)}
    url = f"sqlite:///{tmp_path / 'kb.sqlite3'}"
    result = run_entry_point(env, "worker", "--model", "tiny")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"Error: database {url} has no kb-daemon schema; run `kbctl init`\n"
    result = run_entry_point(env, "beat")
    assert result.returncode == 1 and result.stderr.endswith("has no kb-daemon schema; run `kbctl init`\n")

    db = Database(Settings.from_env(env))
    db.upgrade()
    db.dispose()
    result = run_entry_point(env, "worker", "--model", "tiny")
    assert result.returncode == 1
    assert result.stderr == "Error: unknown model 'tiny' (registered: none; run `kbctl init`)\n"
    result = run_entry_point({**env, "KB_LEASE_SECONDS": "soon"}, "worker", "--model", "tiny")
    assert result.returncode == 1
    assert result.stderr == "Error: KB_LEASE_SECONDS must be a number of seconds, got 'soon'\n"
    assert not (tmp_path / "broker.sqlite3").exists()  # refused before the broker was prepared


def test_the_entry_point_needs_a_command_and_a_model():
    assert run_entry_point({}, "worker").returncode == 2
    assert run_entry_point({}).returncode == 2


def test_restart_policy_counts_facts_and_restarts_only_when_allowed():
    from workers.context import RestartPolicy

    policy = RestartPolicy(facts_limit=3, allowed=True)
    assert [policy.count(n) for n in (1, 1, 0, 1, 2)] == [False, False, False, True, True]
    assert policy.facts_applied == 5
    assert not policy.restart_in_place
    policy.requested = True
    assert policy.restart_in_place
    policy.stop_signalled = True  # an operator's SIGTERM wins
    assert not policy.restart_in_place
    assert not RestartPolicy(facts_limit=3, allowed=False).count(10)  # celery -A workers.app: never
    assert not RestartPolicy(facts_limit=0, allowed=True).count(10_000)  # KB_WORKER_RESTART_FACTS=0


def test_the_app_is_made_from_the_settings_with_the_context_and_its_tasks(tmp_path):
    import kombu.transport.sqlalchemy

    from workers.app import create_app
    from workers.context import WorkerContext, worker_context

    settings = Settings.from_env({"KB_HOME": str(tmp_path), "KB_REAPER_SECONDS": "7", "KB_POLLING_SECONDS": "0.3"})
    context = WorkerContext.create(settings, can_restart=True)
    app = create_app(settings, context)
    try:
        assert worker_context(app) is context and context.restart.allowed
        assert context.restart.facts_limit == settings.worker_restart_facts
        assert app.conf.broker_url == settings.broker_url
        assert app.conf.beat_schedule["reap"]["schedule"] == 7.0
        assert kombu.transport.sqlalchemy.Transport.polling_interval == 0.3
        app.loader.import_default_modules()
        assert {PROCESS_MODEL, REAP, INGEST_NIGHTLY, PING} <= set(app.tasks)
        beat_app = create_app(settings)
        with pytest.raises(RuntimeError, match="no WorkerContext"):
            worker_context(beat_app)
    finally:
        context.close()


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    from tiny_models import save

    from kb_daemon.queue import register_model

    root = tmp_path_factory.mktemp("load")
    save("llava-llama", root / "tiny")
    db = Database(Settings.from_env({"KB_HOME": str(root / "home")}))
    db.upgrade()
    with db.session() as session:
        register_model(session, "tiny", str(root / "tiny"), actor="test")
    yield db
    db.dispose()


def test_load_model_records_the_spec_reads_the_head_and_reuses_a_kept_runtime(tiny_db):
    from kb_daemon.queue import get_model
    from workers.context import WorkerContext

    context = WorkerContext.create(tiny_db.settings, tiny_db)
    with tiny_db.session() as session:
        assert get_model(session, "tiny").spec is None
    loaded = context.load("tiny")
    assert (loaded.model.name, loaded.head, loaded.version, loaded.runtime.version) == ("tiny", 0, 0, 0)
    with tiny_db.session() as session:
        assert get_model(session, "tiny").spec == loaded.runtime.spec  # recorded by the first load
    again = context.load("tiny", load_codebook=False)
    assert again.runtime is loaded.runtime and list(context.runtimes) == ["tiny"]


def test_load_model_without_the_codebook_and_for_unknown_names(tiny_db):
    from kb_daemon.runtime import load_model

    made = []

    def runtime_for(model):
        made.append(model.name)
        raise AssertionError("no runtime may be made for an unknown model or version")

    with pytest.raises(NotFound, match="unknown model 'nope'"):
        load_model(tiny_db, "nope", runtime_for=runtime_for)
    with pytest.raises(NotFound):
        load_model(tiny_db, "tiny", 5, runtime_for=runtime_for)
    assert made == []
    fresh = load_model(tiny_db, "tiny", 0, load_codebook=False)  # a fresh runtime of its own
    assert (fresh.version, fresh.runtime.version) == (0, None)


@pytest.mark.parametrize(("code", "stop_signalled", "restarts"), [
    (1, False, True),  # Celery stopped on its own with an error (e.g. it gave up on the broker): come back
    (1, True, False),  # an operator's SIGTERM: stay stopped, with the code
    (0, False, False),  # a clean stop
])
def test_a_worker_that_stops_with_an_error_nobody_asked_for_starts_again(tmp_path, monkeypatch, code,
                                                                          stop_signalled, restarts):
    import workers.process as process
    from kb_daemon.queue import register_model

    env = {"KB_HOME": str(tmp_path)}
    db = Database(Settings.from_env(env))
    db.upgrade()
    with db.session() as session:
        register_model(session, "tiny", "demo", actor="test")
    db.dispose()
    restarted = []

    def celery_stops(app, argv):
        app.context.restart.stop_signalled = stop_signalled
        return code

    monkeypatch.setattr(process, "run_celery", celery_stops)
    monkeypatch.setattr(process, "restart_in_place", lambda context: restarted.append(context))
    monkeypatch.setattr(process, "UNEXPECTED_STOP_RESTART_SECONDS", 0.0)
    assert process.run_worker(Settings.from_env(env), "tiny") == code
    assert bool(restarted) == restarts
