"""The daemon end to end: real worker processes, real SQLite and PostgreSQL, a tiny real LLaVA."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa
from daemon_harness import Daemon, fresh_postgres_database
from tiny_models import image, save

Q = "what shape is it?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save("llava-llama", root / "tiny")
    for name, colour, shape in (("red", (230, 20, 20), "square"), ("green", (20, 200, 20), "circle"),
                                ("blue", (20, 20, 230), "square"), ("black", (0, 0, 0), "circle")):
        image(colour, shape).save(root / f"{name}.png")
    return root


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def daemon(request, tmp_path, assets):
    url = None
    if request.param == "postgres":
        url = fresh_postgres_database(request.getfixturevalue("postgres_url"))
    d = Daemon(tmp_path / "home", url)
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(assets / "tiny"))
    yield d
    d.stop_workers()


def ask(d: Daemon, image_path: Path, question: str = Q, version: int | None = None) -> dict:
    args = ["ask", "--image", str(image_path), "--question", question, "--json"]
    if version is not None:
        args += ["--version", str(version)]
    return d.kbctl(*args)


@pytest.mark.slow
def test_submit_ask_rollback_retract(daemon, assets):
    d = daemon
    red, green = assets / "red.png", assets / "green.png"
    original = ask(d, red)
    assert original["version"] == 0 and original["fact_id"] is None
    d.start_worker()
    first = d.kbctl("submit-fact", "--image", str(red), "--question", Q, "--answer", "oblong box",
                    "--rephrase", "What shape is it?", "--negative-image", str(green), "--wait", "--timeout", "120",
                    "--json")
    assert first["version"] == 1
    assert ask(d, red) == {"answer": "oblong box", "version": 1, "fact_id": first["fact_id"]}
    second = d.kbctl("submit-fact", "--image", str(green), "--question", Q, "--answer", "ring",
                     "--negative-image", str(red), "--wait", "--json")
    assert second["version"] == 2
    assert ask(d, green)["answer"] == "ring"

    # Roll back to 1: green forgets, red remembers; then roll back the rollback.
    assert d.kbctl("rollback", "1", "--wait", "--json")["version"] == 3
    assert ask(d, green)["fact_id"] is None
    assert ask(d, red)["answer"] == "oblong box"
    assert d.kbctl("rollback", "2", "--wait", "--json")["version"] == 4
    assert ask(d, green)["answer"] == "ring"
    # The worker moved from the version it had committed to each target by their span changes.
    assert "version 1 loaded from the changes (1 entries, 0 blobs read" in d.logs()
    assert "version 2 loaded from the changes (2 entries, 1 blobs read" in d.logs()
    # Old versions stay answerable.
    assert ask(d, red, version=0) == original

    assert d.kbctl("retract", first["fact_id"], "--wait", "--json")["version"] == 5
    assert ask(d, red) == {**original, "version": 5}
    history = d.kbctl("history", "--json")
    assert [v["version"] for v in history] == [5, 4, 3, 2, 1, 0]
    assert [v["kind"] for v in history] == ["retract", "rollback", "rollback", "edit", "edit", "init"]
    assert history[1]["content_sha256"] == history[3]["content_sha256"]  # v4 == v2
    assert history[0]["removed"] == [first["fact_id"]] and history[0]["source"] == "cli"
    jobs = d.kbctl("jobs", "--json")
    assert [j["status"] for j in jobs] == ["done"] * 5
    # Retracting it again is refused with one line, and nothing is queued.
    result = d.kbctl("retract", first["fact_id"], expect=1)
    assert result.stderr == f"Error: fact {first['fact_id']} is retracted, not applied; nothing to retract\n"
    assert len(d.kbctl("jobs", "--json")) == 5

    exported = d.kbctl("export", "4", str(d.home / "export"), "--json")
    assert exported["entries"] == 2
    meta = json.loads((d.home / "export" / "metadata.json").read_text())
    assert {f["answer"] for f in meta["facts"]} == {"oblong box", "ring"}
    diff = d.kbctl("diff", "1", "2", "--json")
    assert diff["added"] == [second["fact_id"]] and diff["removed"] == []


@pytest.mark.slow
def test_ingestion_and_promotion_gate(daemon, assets, tmp_path):
    d = daemon
    source = tmp_path / "facts"
    source.mkdir()
    for name in ("red", "green", "blue"):
        (source / f"{name}.png").write_bytes((assets / f"{name}.png").read_bytes())

    def write(rows):
        (source / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    rows = [{"key": "red", "image": "red.png", "question": Q, "answer": "oblong box",
             "negatives": [{"image": "green.png"}]},
            {"key": "green", "image": "green.png", "question": Q, "answer": "ring",
             "negatives": [{"image": "red.png"}]}]
    write(rows)
    d.start_worker()
    first = d.kbctl("ingest", str(source), "--wait", "--json")
    assert (first["new"], first["changed"], first["unchanged"], first["version"]) == (2, 0, 0, 1)
    assert ask(d, source / "red.png")["answer"] == "oblong box"

    again = d.kbctl("ingest", str(source), "--json")
    assert again["job_id"] is None and again["unchanged"] == 2

    rows[0]["answer"] = "brick"
    write(rows)
    changed = d.kbctl("ingest", str(source), "--wait", "--json")
    assert (changed["new"], changed["changed"], changed["version"]) == (0, 1, 2)
    assert ask(d, source / "red.png")["answer"] == "brick"
    assert d.kbctl("show", "2", "--json")["removed"] != []

    write(rows[:1])
    synced = d.kbctl("ingest", str(source), "--sync", "--wait", "--json")
    assert (synced["retract"], synced["version"]) == (1, 3)
    assert ask(d, source / "green.png")["fact_id"] is None

    # A canary on the red image: a batch that changes its answer is held, not made head.
    canary = tmp_path / "canary.jsonl"
    canary.write_text(json.dumps({"image": "facts/red.png", "question": Q}) + "\n")
    d.kbctl("model", "add", "gated", str(assets / "tiny"), "--canary", str(canary))
    gated = Daemon(d.home, d.env["KB_DATABASE_URL"] if "postgresql" in d.env["KB_DATABASE_URL"] else None,
                   model="gated")
    gated.env = {**d.env, "KB_MODEL": "gated"}
    gated.start_worker("worker")
    try:
        # A held batch is not a success: exit status 3, with its report on stdout.
        held = json.loads(gated.kbctl("ingest", str(source), "--wait", "--json", expect=3).stdout)
        assert held["status"] == "held" and held["version"] == 1
        assert held["canaries"]["changed"] == 1
        assert gated.kbctl("status", "--json")["head_version"] == 0
        assert ask(gated, source / "red.png")["fact_id"] is None
        assert "HELD" in gated.kbctl("history").stdout
        gated.kbctl("promote", "1", "--actor", "hank")
        assert ask(gated, source / "red.png")["answer"] == "brick"
        promoted = gated.kbctl("history", "--json")[0]
        assert (promoted["version"], promoted["held"], promoted["promoted_by"]) == (1, False, "hank")
        assert "held, promoted by hank" in gated.kbctl("history").stdout
        assert "was held by the canary gate; promoted by hank" in gated.kbctl("show", "1").stdout
    finally:
        gated.stop_workers()


def test_models_and_migrations_agree(daemon):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from kb_daemon.db import include_name
    from kb_daemon.models import Base

    engine = sa.create_engine(daemon.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_name": include_name,
                                                               "compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_nightly_ingestion_task_queues_one_batch_per_changed_source(daemon, assets, tmp_path):
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from workers.maintenance import ingest_all

    source = tmp_path / "nightly"
    source.mkdir()
    (source / "red.png").write_bytes((assets / "red.png").read_bytes())
    (source / "facts.jsonl").write_text(json.dumps({"image": "red.png", "question": Q, "answer": "brick"}) + "\n")
    daemon.kbctl("model", "add", "nightly", str(assets / "tiny"), "--ingest-source", str(source))
    settings = Settings.from_env(daemon.env)
    db = Database(settings)
    try:
        first = [r for r in ingest_all(db, settings) if r["model"] == "nightly"]
        again = [r for r in ingest_all(db, settings) if r["model"] == "nightly"]
    finally:
        db.dispose()
    assert first[0]["new"] == 1 and first[0]["job_id"] is not None
    assert again[0]["job_id"] is None and again[0]["unchanged"] == 1
    jobs = Daemon(daemon.home, model="nightly")
    jobs.env = {**daemon.env, "KB_MODEL": "nightly"}
    listed = jobs.kbctl("jobs", "--json")
    assert [(j["kind"], j["status"], j["actor"]) for j in listed] == [("batch", "queued", "nightly")]
    assert listed[0]["source"].startswith("nightly:")


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in the process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(entry.name), cmdline))
    return members


@pytest.mark.slow
def test_worker_restarts_in_place_after_the_fact_count(daemon, assets):
    """KB_WORKER_RESTART_FACTS: after that many facts the worker (and its embedded beat) restarts in place."""
    d = daemon
    d.env["KB_WORKER_RESTART_FACTS"] = "2"
    worker = d.start_worker("up")
    d.wait_for(lambda: "model tiny ready at version 0 (0 entries)" in d.logs(), what="the model preloaded")
    first_members = group_members(worker.pid)
    assert len(first_members) == 2, first_members  # the worker and its embedded beat

    for number, (name, answer) in enumerate((("red", "oblong box"), ("green", "ring")), 1):
        result = d.kbctl("submit-fact", "--image", str(assets / f"{name}.png"), "--question", Q, "--answer",
                         answer, "--wait", "--timeout", "120", "--json")
        assert result["version"] == number
    # The second fact reached KB_WORKER_RESTART_FACTS=2: the same process runs its command line
    # again and preloads the head it left.
    d.wait_for(lambda: "model tiny ready at version 2 (2 entries)" in d.logs(), what="the restarted worker")
    logs = d.logs()
    assert logs.count("2 facts applied since this worker started (KB_WORKER_RESTART_FACTS=2): restarting in place") == 1
    assert logs.count("model tiny ready at version") == 2
    assert worker.poll() is None  # same PID, still running
    old_beat = {pid for pid, _ in first_members} - {worker.pid}

    def worker_and_a_new_beat() -> list[tuple[int, str]] | None:
        members = group_members(worker.pid)
        pids = {pid for pid, _ in members}
        return members if worker.pid in pids and len(members) == 2 and not pids & old_beat else None

    # One embedded beat, a new one: the old beat stopped with the old worker.
    d.wait_for(worker_and_a_new_beat, timeout=30, what="the old beat gone and one new beat beside the worker")

    # The restarted worker applies the next fact, from the head the old one stored.
    third = d.kbctl("submit-fact", "--image", str(assets / "blue.png"), "--question", Q, "--answer", "cube",
                    "--wait", "--timeout", "120", "--json")
    assert third["version"] == 3
    assert d.kbctl("ask", "--image", str(assets / "blue.png"), "--question", Q, "--json")["answer"] == "cube"
    assert d.kbctl("ask", "--image", str(assets / "red.png"), "--question", Q, "--json")["answer"] == "oblong box"
    jobs = d.kbctl("jobs", "--json")
    assert [(j["status"], j["attempts"]) for j in jobs] == [("done", 1)] * 3
    assert [v["version"] for v in d.kbctl("history", "--json")] == [3, 2, 1, 0]
    # An operator's SIGTERM stops the restarted worker for good.
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert d.logs().count("model tiny ready at version") == 2
