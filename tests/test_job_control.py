"""Steering work: cancel a queued or a running job, retry it, wait for a job submitted earlier."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_IMAGES
from daemon_harness import Daemon, job_rows, registered_daemon

Q = "what shape is it?"
COLOURS = list(TINY_IMAGES)


@pytest.fixture
def daemon(tmp_path, tiny_assets, database_url):
    # Slow edits (no early stop), so that a cancel lands while a batch runs.
    d = registered_daemon(tmp_path / "home", database_url, tiny_assets / "tiny", "--hparam", "max_steps=400",
                          "--hparam", "early_stop=false")
    yield d
    d.stop_workers()


def fact_status(d: Daemon, fact_id: str) -> tuple[str, str | None]:
    fact = d.kbctl("fact", fact_id, "--json")
    return fact["status"], fact["error"]


@pytest.mark.slow
def test_cancel_retry_and_wait(daemon, tiny_assets, tmp_path):
    assets = tiny_assets
    d = daemon
    red, green = str(assets / "red.png"), str(assets / "green.png")
    # A queued job: cancelled, it never runs; retried, it lands.
    first = d.kbctl("submit-fact", "--image", red, "--question", Q, "--answer", "brick", "--json")
    assert d.kbctl("cancel", str(first["job_id"]), "--actor", "carol", "--json") == {
        "job_id": first["job_id"], "status": "cancelled"}
    assert fact_status(d, first["fact_id"]) == ("cancelled", f"cancelled by carol (job {first['job_id']})")
    refused = d.kbctl("cancel", str(first["job_id"]), expect=1)
    assert refused.stderr == (f"Error: job {first['job_id']} is cancelled; only a queued or running job can be "
                              "cancelled\n")
    waited = d.kbctl_process("wait", str(first["job_id"]))
    assert (waited.returncode, waited.stderr) == (1, f"Error: job {first['job_id']} was cancelled by carol\n")

    d.start_worker()
    second = d.kbctl("submit-fact", "--image", green, "--question", Q, "--answer", "ring", "--wait", "--json")
    assert second["version"] == 1
    assert [f["fact_id"] for f in d.kbctl("show", "1", "--json")["facts"]] == [second["fact_id"]]
    retried = d.kbctl("retry", str(first["job_id"]), "--actor", "dave", "--wait", "--json")
    assert retried["retry_of"] == first["job_id"] and retried["version"] == 2
    assert fact_status(d, first["fact_id"]) == ("applied", None)
    assert [j["source"] for j in d.kbctl("jobs", "--json")][0] == f"retry:{first['job_id']}"
    refused = d.kbctl("retry", str(second["job_id"]), expect=1)
    assert refused.stderr == f"Error: job {second['job_id']} is done; only a failed or cancelled job can be retried\n"

    # A running batch: cancelled at a fact boundary, nothing stored, its facts cancelled.
    source = tmp_path / "src"
    source.mkdir()
    for name in COLOURS:
        (source / f"{name}.png").write_bytes((assets / f"{name}.png").read_bytes())
    (source / "facts.jsonl").write_text("".join(
        json.dumps({"image": f"{name}.png", "question": "what colour is it?", "answer": f"{name}ish"}) + "\n"
        for name in COLOURS))
    batch = d.kbctl("ingest", str(source), "--json")
    # `kbctl wait` without a terminal prints one progress line per fact done.
    waiting = d.kbctl_process("wait", str(batch["job_id"]), "--timeout", "1")
    assert waiting.returncode == 1 and "timed out after 1 s waiting for job" in waiting.stderr
    d.wait_for(lambda: job_rows(d)[-1]["progress_done"] >= 1, what="the batch's first fact")
    cancelled = d.kbctl("cancel", str(batch["job_id"]), "--wait", "--json")
    assert cancelled == {"job_id": batch["job_id"], "status": "cancelled"}
    assert d.kbctl("status", "--json")["head_version"] == 2
    batch_facts = [f for f in _ledger(d) if f["key"] and f["status"] != "applied"]
    assert len(batch_facts) == 4 and {f["status"] for f in batch_facts} == {"cancelled"}
    # Retried, the whole batch lands, with progress lines on stderr for a waiting operator.
    again = d.kbctl("retry", str(batch["job_id"]), "--json")
    progress = d.kbctl_process("wait", str(again["job_id"]), "--timeout", "300")
    assert progress.returncode == 0, progress.stderr
    assert progress.stdout == f"job {again['job_id']} done: version 3\n"
    assert f"job {again['job_id']}: 4/4 facts" in progress.stderr.splitlines()
    assert len(d.kbctl("show", "3", "--json")["facts"]) == 6

    # A single edit is cancelled inside its value optimisation (its progress is in steps), and the
    # worker's next edit is unaffected.
    slow = d.kbctl("submit-fact", "--image", red, "--question", "what colour is it?", "--answer", "crimson",
                   "--json")
    d.wait_for(lambda: job_rows(d)[-1]["progress_done"] >= 10, what="the edit's first optimisation steps")
    assert d.kbctl("cancel", str(slow["job_id"]), "--wait", "--json")["status"] == "cancelled"
    assert job_rows(d)[-1]["progress_done"] < 400 and d.kbctl("status", "--json")["head_version"] == 3
    last = d.kbctl("submit-fact", "--image", green, "--question", "what colour is it?", "--answer", "jade",
                   "--wait", "--json")
    assert last["version"] == 4
    assert d.kbctl("ask", "--image", green, "--question", "what colour is it?", "--json")["answer"] == "jade"


def _ledger(d: Daemon) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT id, key, status FROM facts ORDER BY submitted_at")).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]
