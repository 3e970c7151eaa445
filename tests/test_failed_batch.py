"""A batch that fails on one fact strands none: every fact of it is marked failed with the reason,
`kbctl jobs` names the fact that stopped it, and re-running the source queues them all again."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from daemon_harness import Daemon, job_rows, registered_daemon

Q = "what shape is it?"


@pytest.fixture
def daemon(tmp_path, tiny_assets, database_url):
    d = registered_daemon(tmp_path / "home", database_url, tiny_assets / "tiny")
    yield d
    d.stop_workers()


def set_blob(d: Daemon, digest: str, data: bytes) -> None:
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE blobs SET data = :data WHERE sha256 = :sha"), {"data": data, "sha": digest})
    engine.dispose()


@pytest.mark.slow
def test_a_failed_batch_marks_its_facts_failed_and_a_rerun_queues_them_again(daemon, tmp_path, tiny_assets):
    assets = tiny_assets
    d = daemon
    source = tmp_path / "src"
    source.mkdir()
    for name in ("red", "green", "blue"):
        (source / f"{name}.png").write_bytes((assets / f"{name}.png").read_bytes())
    (source / "facts.jsonl").write_text("".join(
        json.dumps({"key": name, "image": f"{name}.png", "question": Q, "answer": answer}) + "\n"
        for name, answer in (("red", "brick"), ("green", "ring"), ("blue", "tile"))))
    queued = d.kbctl("ingest", str(source), "--json")
    assert queued["new"] == 3

    # The green fact's image is damaged in the database before the worker reads it.
    facts = {f["answer"]: f for f in (d.kbctl("fact", fid, "--json") for fid in _fact_ids(d))}
    green = facts["ring"]
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        digest, original = connection.execute(sa.text(
            "SELECT b.sha256, b.data FROM blobs b JOIN facts f ON f.image_sha256 = b.sha256 WHERE f.id = :id"),
            {"id": green["fact_id"]}).one()
    engine.dispose()
    set_blob(d, digest, b"not the image")

    d.start_worker()
    d.wait_for(lambda: job_rows(d)[0]["status"] == "failed", what="the batch to fail")
    [job] = d.kbctl("jobs", "--json")
    assert job["error"].startswith(f"fact {green['fact_id']}: ")
    assert f"fact {green['fact_id']}: " in d.kbctl("jobs").stdout
    after = {fid: d.kbctl("fact", fid, "--json") for fid in _fact_ids(d)}
    assert {f["status"] for f in after.values()} == {"failed"}
    assert after[green["fact_id"]]["error"] == job["error"]
    others = [f for fid, f in after.items() if fid != green["fact_id"]]
    assert all(f["error"] == f"not applied: batch job {job['id']} failed on fact {green['fact_id']}"
               for f in others)
    assert d.kbctl("status", "--json")["head_version"] == 0

    # The damage repaired, the unchanged source queues all three again, and they land.
    set_blob(d, digest, bytes(original))
    again = d.kbctl("ingest", str(source), "--wait", "--json")
    assert (again["new"], again["retried"], again["unchanged"], again["version"]) == (0, 3, 0, 1)
    assert sorted(f["answer"] for f in d.kbctl("show", "1", "--json")["facts"]) == ["brick", "ring", "tile"]


def _fact_ids(d: Daemon) -> list[str]:
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        ids = connection.execute(sa.text("SELECT id FROM facts ORDER BY submitted_at")).scalars().all()
    engine.dispose()
    return list(ids)
