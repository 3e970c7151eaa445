"""Crashes and concurrency with real worker processes: kill -9 mid-edit, two workers on one model."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from daemon_harness import Daemon, job_rows, version_numbers
from tiny_models import image, save

Q = "what shape is it?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save("llava-llama", root / "model")
    for i in range(8):
        image((30 * i, 255 - 30 * i, 90), "circle" if i % 2 else "square").save(root / f"img{i}.png")
    return root


def as_dict(value: object) -> dict:
    """JSON columns come back as text from SQLite through a raw query, as dicts from PostgreSQL."""
    return value if isinstance(value, dict) else json.loads(str(value))


@pytest.mark.slow
def test_kill_9_during_an_edit_then_restart_completes_the_job_exactly_once(tmp_path, tiny_dir):
    d = Daemon(tmp_path / "home", lease_seconds=3.0)
    d.kbctl("init")
    # A long optimisation so that the kill lands inside it.
    d.kbctl("model", "add", "tiny", str(tiny_dir / "model"), "--hparam", "max_steps=3000",
            "--hparam", "early_stop=false")
    worker = d.start_worker()
    try:
        submitted = d.kbctl("submit-fact", "--image", str(tiny_dir / "img0.png"), "--question", Q,
                            "--answer", "oblong box", "--json")
        d.wait_for(lambda: job_rows(d)[0]["status"] == "running", what="the job to start")
        # While the worker lives, status shows its lease being renewed and the worker seen lately
        # (renewals count as sightings, not only claims).
        alive = d.wait_for(lambda: (s := d.kbctl("status", "--json"))["last_worker_seen_seconds_ago"] is not None
                           and s["running_seconds"] > 2 and s, what="a lease renewal")
        assert alive["running_job"] == submitted["job_id"] and alive["worker_lost"] is False
        assert alive["lease_expires_in_seconds"] > 0 and alive["last_worker_seen_seconds_ago"] < 2.5
        d.kill9(worker)
        row = job_rows(d)[0]
        assert row["status"] == "running" and row["attempts"] == 1
        assert d.kbctl("status", "--json")["head_version"] == 0
        assert version_numbers(d) == [0]
        # Once the lease lapses, status says the worker is lost and when the job is retried.
        lost = d.wait_for(lambda: (s := d.kbctl("status", "--json"))["worker_lost"] and s, timeout=30,
                          what="the lease to lapse")
        assert lost["lease_expires_in_seconds"] < 0 and lost["retry_at"] is not None
        assert "worker lost: its lease lapsed" in d.kbctl("status").stdout

        d.start_worker()
        d.wait_for(lambda: job_rows(d)[0]["status"] == "done", timeout=180, what="the job to finish")
        row = job_rows(d)[0]
        assert row["attempts"] == 2
        assert version_numbers(d) == [0, 1]
        answer = d.kbctl("ask", "--image", str(tiny_dir / "img0.png"), "--question", Q, "--json")
        assert answer == {"answer": "oblong box", "version": 1, "fact_id": submitted["fact_id"]}
    finally:
        d.stop_workers()


@pytest.mark.slow
def test_two_workers_on_one_model_never_interleave(tmp_path, tiny_dir):
    d = Daemon(tmp_path / "home")
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(tiny_dir / "model"), "--hparam", "max_steps=150",
            "--hparam", "early_stop=false")
    d.start_worker("worker")
    d.start_worker("up")
    try:
        fact_ids = [d.kbctl("submit-fact", "--image", str(tiny_dir / f"img{i}.png"), "--question", Q,
                            "--answer", f"shape number {i}", "--json")["fact_id"] for i in range(8)]
        d.wait_for(lambda: all(r["status"] == "done" for r in job_rows(d)), timeout=240,
                   what="all jobs to finish")
    finally:
        d.stop_workers()
    rows = job_rows(d)
    assert [r["seq"] for r in rows] == list(range(1, 9))
    assert [r["attempts"] for r in rows] == [1] * 8
    # Strict order: job k made version k, and no job started before the previous one finished.
    assert [as_dict(r["result"])["version"] for r in rows] == list(range(1, 9))
    for previous, current in zip(rows, rows[1:], strict=False):
        assert str(previous["finished_at"]) <= str(current["started_at"])
    assert version_numbers(d) == list(range(0, 9))
    head = d.kbctl("show", "8", "--json")
    assert [f["fact_id"] for f in head["facts"]] == fact_ids


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_batch_resumes_without_reapplying(tmp_path, tiny_dir):
    d = Daemon(tmp_path / "home", lease_seconds=3.0)
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(tiny_dir / "model"), "--hparam", "max_steps=60",
            "--hparam", "early_stop=false")
    source = tmp_path / "source"
    source.mkdir()
    for i in range(8):
        (source / f"img{i}.png").write_bytes((tiny_dir / f"img{i}.png").read_bytes())
    rows = [{"key": f"k{i}", "image": f"img{i % 8}.png", "question": f"what is shape number {i}?",
             "answer": f"s{i}"} for i in range(16)]
    (source / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    worker = d.start_worker()
    try:
        d.kbctl("ingest", str(source))
        d.wait_for(lambda: job_rows(d)[0]["progress_done"] >= 7, timeout=240, what="the batch to pass 7 facts")
        # Meanwhile the head is still the old one, whole.
        assert d.kbctl("status", "--json")["head_version"] == 0
        d.kill9(worker)
        assert job_rows(d)[0]["status"] == "running"
        d.start_worker()
        d.wait_for(lambda: job_rows(d)[0]["status"] == "done", timeout=300, what="the batch to finish")
    finally:
        d.stop_workers()
    job = job_rows(d)[0]
    result = as_dict(job["result"])
    assert job["attempts"] == 2
    assert result["resumed_at"] in (5, 10, 15)  # checkpoints every 5 facts in these tests
    assert result["applied_in_this_attempt"] == 16 - result["resumed_at"]
    assert version_numbers(d) == [0, 1]
    version = d.kbctl("show", "1", "--json")
    assert [f["answer"] for f in version["facts"]] == [f"s{i}" for i in range(16)]


def model_rows(d: Daemon) -> dict[str, list]:
    """Everything the snapshot write touches for the daemon's model, straight from the database."""
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    queries = {
        "versions": "SELECT v.number, v.parent, v.kind FROM versions v JOIN models m ON m.id = v.model_id "
                    "WHERE m.name = :name ORDER BY v.number",
        "entries": "SELECT e.id, e.fact_id, e.blob_sha256 FROM entries e JOIN models m ON m.id = e.model_id "
                   "WHERE m.name = :name ORDER BY e.id",
        "spans": "SELECT s.entry_id, s.from_version, s.to_version FROM entry_spans s "
                 "JOIN models m ON m.id = s.model_id WHERE m.name = :name ORDER BY s.id",
        "facts": "SELECT f.id, f.status, f.entered_version FROM facts f JOIN models m ON m.id = f.model_id "
                 "WHERE m.name = :name ORDER BY f.submitted_at",
        "head": "SELECT head_version FROM models WHERE name = :name",
        # Blobs referenced by nothing: neither a fact's image nor an entry's tensors.
        "unreferenced_blobs": "SELECT b.kind, b.sha256 FROM blobs b WHERE b.sha256 NOT IN "
                              "(SELECT blob_sha256 FROM entries) AND b.sha256 NOT IN "
                              "(SELECT image_sha256 FROM facts WHERE image_sha256 IS NOT NULL)",
    }
    with engine.connect() as connection:
        rows = {name: [tuple(r) for r in connection.execute(sa.text(sql), {"name": d.model})]
                for name, sql in queries.items()}
    engine.dispose()
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kill_9_during_the_snapshot_write_leaves_the_old_head_and_reruns_once(backend, tmp_path, tiny_dir,
                                                                               request):
    from daemon_harness import fresh_postgres_database

    from workers.runner import FAULT_PAUSE_IN_COMMIT

    url = fresh_postgres_database(request.getfixturevalue("postgres_url")) if backend == "postgres" else None
    d = Daemon(tmp_path / "home", url, lease_seconds=3.0)
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(tiny_dir / "model"), "--hparam", "max_steps=300",
            "--hparam", "max_new_tokens=16", "--hparam", "max_answer_tokens=16")
    img = str(tiny_dir / "img0.png")
    # The first worker pauses inside the commit of its result: blobs, entry, span, version row and
    # ledger written, the transaction still open. It is killed there.
    d.env[FAULT_PAUSE_IN_COMMIT] = "600"
    worker = d.start_worker()
    del d.env[FAULT_PAUSE_IN_COMMIT]
    try:
        submitted = d.kbctl("submit-fact", "--image", img, "--question", Q, "--answer", "oblong box", "--json")
        d.wait_for(lambda: f"test hook {FAULT_PAUSE_IN_COMMIT}" in d.logs(), timeout=180,
                   what="the worker to pause inside the commit")
        if backend == "postgres":
            # MVCC: readers see the old head, whole, while the new version's rows are uncommitted.
            # (On SQLite every transaction begins IMMEDIATE, so a reader waits for the commit.)
            assert d.kbctl("status", "--json")["head_version"] == 0
            paused = d.kbctl("ask", "--image", img, "--question", Q, "--json")
            assert paused["version"] == 0 and paused["fact_id"] is None
        d.kill9(worker)

        after_kill = model_rows(d)
        assert after_kill["head"] == [(0,)]
        assert after_kill["versions"] == [(0, None, "init")]
        assert after_kill["entries"] == [] and after_kill["spans"] == []
        assert after_kill["facts"] == [(submitted["fact_id"], "pending", None)]
        assert after_kill["unreferenced_blobs"] == []  # the entry blob went with the transaction
        row = job_rows(d)[0]
        assert row["status"] == "running" and row["attempts"] == 1
        assert version_numbers(d) == [0]
        answer = d.kbctl("ask", "--image", img, "--question", Q, "--json")
        assert answer["version"] == 0 and answer["fact_id"] is None and answer["answer"] != "oblong box"

        d.start_worker()
        d.wait_for(lambda: job_rows(d)[0]["status"] == "done", timeout=180, what="the job to finish")
    finally:
        d.stop_workers()
    row = job_rows(d)[0]
    assert row["attempts"] == 2 and as_dict(row["result"])["version"] == 1
    assert len(job_rows(d)) == 1
    assert version_numbers(d) == [0, 1]
    final = model_rows(d)
    assert final["head"] == [(1,)]
    assert final["versions"] == [(0, None, "init"), (1, 0, "edit")]
    [(entry_id, fact_id, _blob)] = final["entries"]
    assert fact_id == submitted["fact_id"]
    assert final["spans"] == [(entry_id, 1, None)]
    assert final["facts"] == [(submitted["fact_id"], "applied", 1)]
    assert final["unreferenced_blobs"] == []
    answer = d.kbctl("ask", "--image", img, "--question", Q, "--json")
    assert answer == {"answer": "oblong box", "version": 1, "fact_id": submitted["fact_id"]}
