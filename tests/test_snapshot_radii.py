"""Versions store their entries' effective radii on the spans; materialising reads them.

The radii a worker computed (GRACE's overlap rule, applied incrementally) are recorded with each
version, so loading a version is linear in its size instead of replaying the rule over every pair.
These tests check the stored radii equal the replay exactly, across adds, cuts, a retract that
restores a radius and a rollback, and that versions recorded without radii still replay.
"""

from __future__ import annotations

import pytest
import torch

import editor.codebook as codebook_module
from editor.codebook import Codebook, CodebookSpec, Entry
from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.models import EntrySpan
from kb_daemon.queue import FactInput, get_model, lock_model, record_fact, register_model
from kb_daemon.snapshots import commit_version, entry_rows_for, materialise, store_entry

SPEC = CodebookSpec("test-model", "layer", 4, 3, "euclidean")


@pytest.fixture
def db(tmp_path):
    database = Database(Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'kb.sqlite3'}",
                                 broker_url="memory://"))
    database.upgrade()
    with database.session() as session:
        model = register_model(session, "m", "demo", actor="test")
        model.spec = {"model_id": SPEC.model_id, "layer": SPEC.layer, "input_size": SPEC.input_size,
                      "output_size": SPEC.output_size, "distance": SPEC.distance}
        model.hparams = {}
    yield database
    database.dispose()


@pytest.fixture
def replays(monkeypatch):
    """Counts the replays of the overlap rule while a codebook is built (a one-item list)."""
    count = [0]
    real = codebook_module.resolve_overlaps

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(codebook_module, "resolve_overlaps", counting)
    return count


def entry(session, model, x: float, answer: str, radius: float) -> Entry:
    """An entry whose key lies on the first axis at `x`, stored in the database."""
    fact = record_fact(session, model, FactInput(None, f"q {x}?", answer), actor="test", source="test")
    made = Entry(fact.id, answer, f"in-{x}", torch.tensor([x, 0.0, 0.0, 0.0]), torch.ones(2, 3), radius)
    store_entry(session, model, made)
    return made


def commit(session, model, book: Codebook, with_radii: bool = True) -> int:
    rows = entry_rows_for(session, model, book.fact_ids)
    version = commit_version(session, model, parent=model.head_version, kind="edit", entries=rows,
                             radii=book.radii.tolist() if with_radii else None, actor="test", source="test",
                             job_id=None, summary={})
    return version.number


def test_materialised_radii_equal_the_replay_through_cuts_retract_and_rollback(db, replays):
    book = Codebook(SPEC)
    versions: dict[int, list[str]] = {}
    with db.session() as session:
        model = lock_model(session, get_model(session, "m").id)
        a = entry(session, model, 0.0, "ring", 3.0)
        book.add(a)
        versions[commit(session, model, book)] = list(book.fact_ids)
        b = entry(session, model, 4.0, "wedge", 3.0)  # overlaps a with another answer: both cut to 2.0
        book.add(b)
        versions[commit(session, model, book)] = list(book.fact_ids)
        c = entry(session, model, 5.0, "wedge", 0.5)  # same answer as b: may overlap
        book.add(c)
        versions[commit(session, model, book)] = list(book.fact_ids)
        book.remove(b.fact_id)  # a gets its 3.0 back
        versions[commit(session, model, book)] = list(book.fact_ids)
        assert book.radii.tolist() == [3.0, 0.5]
        target = materialise(session, model, 2)  # rollback: the content and radii of version 2
        rows = entry_rows_for(session, model, target.fact_ids)
        rolled = commit_version(session, model, parent=model.head_version, kind="rollback", entries=rows,
                                radii=target.radii.tolist(), actor="test", source="test", job_id=None,
                                summary={})
        versions[rolled.number] = target.fact_ids
        spans = session.query(EntrySpan).filter(EntrySpan.entry_id.in_([r.id for r in rows])).count()

    replays[0] = 0
    with db.session() as session:
        model = get_model(session, "m")
        loaded = {number: materialise(session, model, number) for number in versions}
    assert replays[0] == 0, "stored radii must be read, not replayed"
    for number, fact_ids in versions.items():
        replayed = Codebook(SPEC, {}, list(loaded[number].entries))
        assert loaded[number].fact_ids == fact_ids
        assert torch.equal(loaded[number].radii, replayed.radii), number
        assert loaded[number].keys.tolist() == replayed.keys.tolist()
    assert loaded[2].radii.tolist() == [2.0, 2.0]
    assert loaded[3].radii.tolist() == [2.0, 2.0, 0.5]
    assert loaded[4].radii.tolist() == [3.0, 0.5]
    assert torch.equal(loaded[5].radii, loaded[2].radii)
    # a: 3.0 (v1), 2.0 (v2-3), 3.0 (v4), 2.0 (v5); b: 2.0 (v2-3), 2.0 (v5)
    assert spans == 6


def test_versions_recorded_without_radii_are_replayed(db, replays):
    book = Codebook(SPEC)
    with db.session() as session:
        model = lock_model(session, get_model(session, "m").id)
        book.add(entry(session, model, 0.0, "ring", 3.0))
        book.add(entry(session, model, 4.0, "wedge", 3.0))
        number = commit(session, model, book, with_radii=False)  # as before migration 0002
    replays[0] = 0
    with db.session() as session:
        loaded = materialise(session, get_model(session, "m"), number)
    assert replays[0] == 1
    assert loaded.radii.tolist() == [2.0, 2.0]
