"""Load: concurrent submitters and two models, through real CLI processes and real workers."""

from __future__ import annotations

import gc
import os
import subprocess

import pytest
import sqlalchemy as sa
from daemon_harness import KBCTL, Daemon, fresh_postgres_database, job_rows
from tiny_models import image, save

Q = "what shape is it?"
SUBMITTERS, FACTS_EACH = 8, 25
# Random tiny models never emit end-of-sequence: cap generation so each edit stays cheap.
FAST = ("--hparam", "max_steps=3", "--hparam", "max_new_tokens=8", "--hparam", "max_answer_tokens=8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    save("llava-llama", root / "model")
    for i in range(SUBMITTERS):
        image((25 * i, 200 - 20 * i, 60), "circle" if i % 2 else "square").save(root / f"img{i}.png")
    return root


def fact_rows(d: Daemon, model: str) -> list[dict]:
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT f.id, f.question, f.status, f.entered_version, j.seq, j.attempts FROM facts f "
            "JOIN models m ON m.id = f.model_id JOIN jobs j ON j.model_id = m.id "
            "WHERE m.name = :name AND j.kind = 'edit' AND CAST(j.payload AS TEXT) LIKE '%' || f.id || '%' "
            "ORDER BY j.seq"),
            {"name": model}).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_eight_concurrent_submitters(backend, tmp_path, tiny_dir, request):
    url = fresh_postgres_database(request.getfixturevalue("postgres_url")) if backend == "postgres" else None
    d = Daemon(tmp_path / "home", url)
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(tiny_dir / "model"), *FAST)
    d.start_worker()
    script = "; ".join(
        f"{' '.join(KBCTL)} submit-fact --image {tiny_dir}/img{{p}}.png --question 'p{{p}} q{i}?' --answer a{i}"
        for i in range(FACTS_EACH))
    processes = [subprocess.Popen(["bash", "-c", f"set -e; {script.replace('{p}', str(p))}"],
                                  env={**os.environ, **d.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for p in range(SUBMITTERS)]
    try:
        for process in processes:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err.decode()[-2000:]
        total = SUBMITTERS * FACTS_EACH
        d.wait_for(lambda: len(job_rows(d)) == total and all(r["status"] == "done" for r in job_rows(d)),
                   timeout=600, what="all 200 jobs to be applied")
    finally:
        d.stop_workers()
    rows = fact_rows(d, "tiny")
    assert len(rows) == total
    assert all(r["status"] == "applied" and r["attempts"] == 1 for r in rows)
    assert sorted(r["entered_version"] for r in rows) == list(range(1, total + 1))
    assert [r["entered_version"] for r in rows] == [r["seq"] for r in rows]  # applied in queue order
    for p in range(SUBMITTERS):  # each submitter's facts in its own submission order
        mine = [r for r in rows if r["question"].startswith(f"p{p} ")]
        assert [r["question"] for r in mine] == [f"p{p} q{i}?" for i in range(FACTS_EACH)]


@pytest.mark.slow
def test_two_models_keep_their_own_histories(tmp_path, tiny_dir):
    d = Daemon(tmp_path / "home")
    d.kbctl("init")
    for name in ("alpha", "beta"):
        d.kbctl("model", "add", name, str(tiny_dir / "model"), *FAST)
    alpha = Daemon(d.home, model="alpha")
    beta = Daemon(d.home, model="beta")
    alpha.start_worker("worker")
    beta.start_worker("up")
    submitted: dict[str, list[str]] = {"alpha": [], "beta": []}
    try:
        for i in range(10):
            for name, daemon in (("alpha", alpha), ("beta", beta)):
                out = daemon.kbctl("submit-fact", "--image", str(tiny_dir / f"img{i % SUBMITTERS}.png"),
                                   "--question", f"{name} {i}?", "--answer", f"{name}{i}", "--json")
                submitted[name].append(out["fact_id"])
        for daemon in (alpha, beta):
            daemon.wait_for(lambda daemon=daemon: daemon.kbctl("status", "--json")["head_version"] == 10,
                            timeout=300, what=f"{daemon.model} to reach version 10")
    finally:
        alpha.stop_workers()
        beta.stop_workers()
    for name, daemon in (("alpha", alpha), ("beta", beta)):
        history = daemon.kbctl("history", "--json")
        added = [f for v in reversed(history) for f in v["added"]]
        assert added == submitted[name]
        assert [f["fact_id"] for f in daemon.kbctl("show", "10", "--json")["facts"]] == submitted[name]


def test_queues_exist_before_anyone_publishes(tmp_path, tiny_dir):
    # kombu's SQL transport creates a queue row on first use with a check-then-insert guarded only
    # per process: a worker declaring its queue while `submit-fact` first publishes to it could die
    # on "UNIQUE constraint failed: kombu_queue.name". init and model add declare the queues up front.
    d = Daemon(tmp_path / "home")
    d.kbctl("init")
    d.kbctl("model", "add", "alpha", str(tiny_dir / "model"), *FAST)
    engine = sa.create_engine(d.env["KB_BROKER_URL"][len("sqla+"):])
    with engine.connect() as connection:
        names = set(connection.execute(sa.text("SELECT name FROM kombu_queue")).scalars())
    engine.dispose()
    assert {"kb.maintenance", "kb.model.demo", "kb.model.alpha"} <= names


@pytest.mark.postgres
def test_declaring_existing_queues_leaves_no_connection_checked_out(tmp_path, postgres_url):
    # kombu's SQL transport leaves its session in a transaction after declaring a queue that
    # exists, and closing the channel does not end it: the connection stayed checked out until the
    # garbage collector found it (once after the server had stopped: a psycopg traceback at exit).
    from kb_daemon.config import Settings
    from kb_daemon.notify import prepare_broker

    url = fresh_postgres_database(postgres_url)
    settings = Settings.from_env({"KB_HOME": str(tmp_path), "KB_DATABASE_URL": url, "KB_BROKER_URL": "sqla+" + url})
    gc.disable()  # so that only prepare_broker itself can give the connection back
    try:
        prepare_broker(settings, ["alpha"])
        prepare_broker(settings, ["alpha"])  # every queue exists now
        engine = sa.create_engine(postgres_url)
        with engine.connect() as connection:
            states = connection.execute(sa.text(
                "SELECT state FROM pg_stat_activity WHERE datname = :name"),
                {"name": url.rsplit("/", 1)[1]}).scalars().all()
        engine.dispose()
    finally:
        gc.enable()
    assert states == []
