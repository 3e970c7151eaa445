"""KB_WORKER_RESTART_FACTS: a worker restarts itself in place after applying that many facts.

A real `kbctl up` (worker with embedded beat) on a tiny LLaVA, SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, fresh_postgres_database
from tiny_models import image, save

Q = "what shape is it?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save("llava-llama", root / "tiny")
    for name, colour, shape in (("red", (230, 20, 20), "square"), ("green", (20, 200, 20), "circle"),
                                ("blue", (20, 20, 230), "square")):
        image(colour, shape).save(root / f"{name}.png")
    return root


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def daemon(request, tmp_path, assets):
    url = None
    if request.param == "postgres":
        url = fresh_postgres_database(request.getfixturevalue("postgres_url"))
    d = Daemon(tmp_path / "home", url)
    d.env["KB_WORKER_RESTART_FACTS"] = "2"
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(assets / "tiny"))
    yield d
    d.stop_workers()


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
    d = daemon
    worker = d.start_worker("up")
    d.wait_for(lambda: "model tiny ready at version 0 (0 entries)" in d.logs(), what="the model preloaded")
    first_members = group_members(worker.pid)
    assert len(first_members) == 2, first_members  # the worker and its embedded beat

    fact_ids = []
    for number, (name, answer) in enumerate((("red", "oblong box"), ("green", "ring")), 1):
        result = d.kbctl("submit-fact", "--image", str(assets / f"{name}.png"), "--question", Q, "--answer",
                         answer, "--wait", "--timeout", "120", "--json")
        assert result["version"] == number
        fact_ids.append(result["fact_id"])
    # The second fact reached KB_WORKER_RESTART_FACTS=2: the same process runs its command line
    # again and preloads the head it left.
    d.wait_for(lambda: "model tiny ready at version 2 (2 entries)" in d.logs(), what="the restarted worker")
    logs = d.logs()
    assert logs.count("2 facts applied since this worker started (KB_WORKER_RESTART_FACTS=2): restarting in place") == 1
    assert logs.count("model tiny ready at version") == 2
    assert worker.poll() is None  # same PID, still running
    time.sleep(1.0)
    members = group_members(worker.pid)
    assert worker.pid in {pid for pid, _ in members}
    # One embedded beat, a new one: the old beat stopped with the old worker.
    assert len(members) == 2, members
    assert {pid for pid, _ in members} - {worker.pid} != {pid for pid, _ in first_members} - {worker.pid}

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
