"""JSON columns: `JSONItems` (a batch's reports kept as JSON text) is stored as the array it encodes."""

from __future__ import annotations

import json

import pytest
from daemon_harness import fresh_postgres_database

from kb_daemon.config import Settings
from kb_daemon.db import Database, JSONItems, dump_json
from kb_daemon.models import Job
from kb_daemon.queue import enqueue, get_job, register_model

REPORTS = [{"fact_id": "f1", "answer": 'a "quoted" answer, caf\u00e9 \u2603', "radius": 1.5},
           {"fact_id": "f2", "nested": {"list": [1, None, True]}}]


def test_dump_json_writes_items_in_place_of_the_placeholder():
    value = {"version": 3, "reports": JSONItems([json.dumps(r) for r in REPORTS]), "canaries": {"changed": 0},
             "empty": JSONItems([])}
    text = dump_json(value)
    assert json.loads(text) == {"version": 3, "reports": REPORTS, "canaries": {"changed": 0}, "empty": []}


def test_dump_json_leaves_other_values_as_json_dumps_does():
    value = {"s": "JSONItems", "n": [1, 2.5, None], "u": "\u00e9"}
    assert dump_json(value) == json.dumps(value)
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        dump_json({"bad": {1, 2}})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_job_result_with_json_items_reads_back_as_plain_json(tmp_path, request, backend):
    url = (f"sqlite:///{tmp_path / 'kb.sqlite3'}" if backend == "sqlite"
           else fresh_postgres_database(request.getfixturevalue("postgres_url")))
    db = Database(Settings.from_env({"KB_HOME": str(tmp_path), "KB_DATABASE_URL": url}))
    db.upgrade()
    try:
        with db.session() as session:
            model = register_model(session, "m", "demo", actor="test")
            job_id = enqueue(session, model, "batch", {"facts": ["f1", "f2"]}, actor="test", source="cli").id
        with db.session() as session:
            job = session.get(Job, job_id)
            job.result = {"version": 1, "reports": JSONItems([json.dumps(r) for r in REPORTS])}
        with db.session() as session:
            assert get_job(session, job_id).result == {"version": 1, "reports": REPORTS}
    finally:
        db.engine.dispose()
