"""Job and fact statuses: one transition table each, enforced by `change_status`, used by the queue,
the runner and promotion."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.models import (
    FACT_TRANSITIONS,
    JOB_TRANSITIONS,
    Fact,
    FactStatus,
    IllegalTransition,
    Job,
    JobStatus,
    change_status,
    utcnow,
)

# The strings stored in jobs.status and facts.status: changing one needs a migration.
STORED_JOB_STATUSES = {"queued", "running", "done", "failed", "held", "cancelled"}
STORED_FACT_STATUSES = {"pending", "applied", "held", "superseded", "retracted", "rolled_back", "failed",
                        "cancelled"}

JOB_PAIRS = [(a, b) for a in JobStatus for b in JobStatus]
FACT_PAIRS = [(a, b) for a in FactStatus for b in FactStatus]


def test_statuses_are_the_stored_strings_and_every_one_has_a_row_in_its_table():
    assert {s.value for s in JobStatus} == STORED_JOB_STATUSES
    assert {s.value for s in FactStatus} == STORED_FACT_STATUSES
    assert set(JOB_TRANSITIONS) == set(JobStatus)
    assert set(FACT_TRANSITIONS) == set(FactStatus)


@pytest.mark.parametrize(("current", "new"), JOB_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in JOB_PAIRS])
def test_job_transition(current, new):
    job = Job(id=7, status=current.value)
    if new in JOB_TRANSITIONS[current]:
        change_status(job, new)
        assert job.status == new.value and type(job.status) is str
    else:
        with pytest.raises(IllegalTransition, match=f"^job 7 cannot go from {current.value} to {new.value} "):
            change_status(job, new)
        assert job.status == current.value


@pytest.mark.parametrize(("current", "new"), FACT_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in FACT_PAIRS])
def test_fact_transition(current, new):
    fact = Fact(id="f-1", status=current.value)
    if new in FACT_TRANSITIONS[current]:
        change_status(fact, new)
        assert fact.status == new.value and type(fact.status) is str
    else:
        with pytest.raises(IllegalTransition, match=f"^fact f-1 cannot go from {current.value} to {new.value} "):
            change_status(fact, new)
        assert fact.status == current.value


def test_terminal_statuses_say_nothing_follows_them():
    with pytest.raises(IllegalTransition, match=r"^job 3 cannot go from done to queued \(from done: nothing\)$"):
        change_status(Job(id=3, status="done"), JobStatus.QUEUED)
    with pytest.raises(IllegalTransition, match=r"\(from queued: cancelled, failed, running\)$"):
        change_status(Job(id=3, status="queued"), JobStatus.DONE)


def test_an_unknown_stored_status_or_the_other_table_is_refused():
    with pytest.raises(IllegalTransition, match="^job 4 has the unknown status 'paused'$"):
        change_status(Job(id=4, status="paused"), JobStatus.RUNNING)
    fact = Fact(id="f-2", status="pending")
    with pytest.raises(TypeError, match="a fact's status is a FactStatus"):
        change_status(fact, JobStatus.FAILED)  # type: ignore[arg-type]
    assert fact.status == "pending"


# ----- the table in use: the queue, the runner and promotion on a real database ----------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    from daemon_harness import fresh_postgres_database

    url = (f"sqlite:///{tmp_path / 'kb.sqlite3'}" if request.param == "sqlite"
           else fresh_postgres_database(request.getfixturevalue("postgres_url")))
    database = Database(Settings.from_env({"KB_HOME": str(tmp_path), "KB_DATABASE_URL": url}))
    database.upgrade()
    yield database
    database.dispose()


def _model_with_fact(db: Database) -> tuple[str, int]:
    from kb_daemon.queue import FactInput, register_model, submit_fact

    with db.session() as session:
        model = register_model(session, "m", "demo", actor="test")
        fact, job = submit_fact(session, model, FactInput(None, "what shape?", "circle"), actor="test")
        assert (fact.status, job.status) == ("pending", "queued")
        return fact.id, job.id


def _claim(db: Database, worker: str, now=None) -> Job | None:
    from kb_daemon.queue import claim_next_job, get_model

    with db.session() as session:
        return claim_next_job(session, get_model(session, "m"), worker, 30.0, now)


def _statuses(db: Database, fact_id: str, job_id: int) -> tuple[str, str]:
    with db.session() as session:
        return session.get(Fact, fact_id).status, session.get(Job, job_id).status


def test_claim_release_reclaim_and_failure_follow_the_table(db):
    from workers.runner import record_failure, release

    fact_id, job_id = _model_with_fact(db)
    assert _claim(db, "w1").status == "running"
    release(db, job_id, "w2")  # not w2's job: nothing changes
    assert _statuses(db, fact_id, job_id) == ("pending", "running")
    release(db, job_id, "w1")
    assert _statuses(db, fact_id, job_id) == ("pending", "queued")
    assert _claim(db, "w1").status == "running"
    # The lease lapses; another worker claims the running job again.
    later = utcnow() + timedelta(seconds=60)
    job = _claim(db, "w2", later)
    assert (job.id, job.status, job.lease_owner, job.attempts) == (job_id, "running", "w2", 3)
    record_failure(db, job_id, "w1", "too late")  # w1's lease is gone: nothing changes
    assert _statuses(db, fact_id, job_id) == ("pending", "running")
    record_failure(db, job_id, "w2", "broken image")
    assert _statuses(db, fact_id, job_id) == ("failed", "failed")
    record_failure(db, job_id, "w2", "again")  # a failed job is not running: left as it is
    with db.session() as session:
        assert session.get(Job, job_id).error == "broken image"


def test_a_job_is_given_up_after_too_many_attempts(db):
    from kb_daemon.queue import MAX_ATTEMPTS

    fact_id, job_id = _model_with_fact(db)
    with db.session() as session:
        session.get(Job, job_id).attempts = MAX_ATTEMPTS
    assert _claim(db, "w1") is None
    assert _statuses(db, fact_id, job_id) == ("pending", "failed")
    with db.session() as session:
        assert session.get(Job, job_id).error == f"gave up after {MAX_ATTEMPTS} attempts"


def _held_version(db: Database, fact_id: str, job_id: int, ledger_status: str) -> None:
    """A held version of job `job_id` whose ledger gives `fact_id` the status `ledger_status`."""
    from kb_daemon.queue import get_model
    from kb_daemon.snapshots import commit_version

    assert _claim(db, "w1").id == job_id
    with db.session() as session:
        model = get_model(session, "m")
        version = commit_version(session, model, parent=0, kind="edit", entries=[], actor="test", source="test",
                                 job_id=job_id, summary={"job": job_id}, held=True)
        version.summary = {**version.summary, "ledger": {fact_id: ledger_status}}
        change_status(session.get(Job, job_id), JobStatus.HELD)
        change_status(session.get(Fact, fact_id), FactStatus.HELD)


def test_promotion_moves_the_held_job_and_facts_through_the_table(db):
    from kb_daemon.queue import get_model, lock_model
    from kb_daemon.snapshots import promote_version

    fact_id, job_id = _model_with_fact(db)
    _held_version(db, fact_id, job_id, "applied")
    assert _statuses(db, fact_id, job_id) == ("held", "held")
    with db.session() as session:
        promote_version(session, lock_model(session, get_model(session, "m").id), 1, "admin")
    assert _statuses(db, fact_id, job_id) == ("applied", "done")


def test_promotion_refuses_a_ledger_the_table_does_not_allow_and_changes_nothing(db):
    from kb_daemon.queue import get_model, lock_model
    from kb_daemon.snapshots import promote_version

    fact_id, job_id = _model_with_fact(db)
    _held_version(db, fact_id, job_id, "retracted")  # a held fact cannot be retracted
    with pytest.raises(IllegalTransition, match=f"^fact {fact_id} cannot go from held to retracted "):
        with db.session() as session:
            promote_version(session, lock_model(session, get_model(session, "m").id), 1, "admin")
    assert _statuses(db, fact_id, job_id) == ("held", "held")
    with db.session() as session:
        assert get_model(session, "m").head_version == 0
