"""A worker's commit records a job's changes against the head it found, in O(changes) rows.

The same history of codebook states (adds that cut radii, a supersede, a retract, a rollback to an
earlier state) is committed to two models: one from the whole codebook (`commit_version`), one by
its changes to the parent (`workers.runner._commit_changes`). Every version must be the same on
both (entries, order, radii, counts, summaries, content hashes), and the rows the change commit
loads must grow with the changes, not with the codebook (counted, not timed). The additive content
hash is checked against its definition, and migration 0006 against both definitions.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import event

from editor.codebook import Codebook, CodebookSpec, Entry
from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.queue import FactInput, get_model, lock_model, record_fact, register_model
from kb_daemon.snapshots import (
    commit_version,
    content_hash,
    entries_at,
    entry_rows_for,
    get_version,
    manifest_at,
    store_entry,
)
from workers.runner import Change, Parent, _commit_changes

SPEC = CodebookSpec("test-model", "layer", 4, 3, "euclidean")
SIZE = 120


@pytest.fixture
def db(tmp_path):
    database = Database(Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'kb.sqlite3'}",
                                 broker_url="memory://"))
    database.upgrade()
    with database.session() as session:
        for name in ("whole", "changes"):
            model = register_model(session, name, "demo", actor="test")
            model.spec = {"model_id": SPEC.model_id, "layer": SPEC.layer, "input_size": SPEC.input_size,
                          "output_size": SPEC.output_size, "distance": SPEC.distance}
            model.hparams = {}
    yield database
    database.dispose()


def loaded_rows(session):
    """Counts the ORM rows loaded into `session` from now on (a one-item list)."""
    count = [0]
    event.listen(session, "loaded_as_persistent", lambda _session, _instance: count.__setitem__(0, count[0] + 1))
    return count


class Twin:
    """One model committed to from the whole codebook, its twin from the changes."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.books = {name: Codebook(SPEC) for name in ("whole", "changes")}
        self.entry_ids: list[int] = []  # the "changes" model's head entries, as a runtime keeps them
        self.generator = torch.Generator().manual_seed(0)
        self.made = 0
        self.loaded: list[tuple[int, int]] = []  # (changes committed, rows loaded) per change commit

    def new_entry(self, session, name: str, input_id: str | None = None) -> Entry:
        i = self.made
        model = get_model(session, name)
        fact = record_fact(session, model, FactInput(None, f"q {i}?", f"a {i}"), actor="test", source="test")
        key = torch.randn(4, generator=torch.Generator().manual_seed(i)) * 2
        made = Entry(fact.id, f"answer {i % 5}", input_id or f"in-{i}", key, torch.ones(2, 3) * i, 1.5)
        store_entry(session, model, made)
        return made

    def step(self, operation) -> None:
        """Apply `operation(book, session, name)` to both codebooks and commit each its way."""
        with self.db.session() as session:
            whole = lock_model(session, get_model(session, "whole").id)
            changes = lock_model(session, get_model(session, "changes").id)
            book = self.books["changes"]
            parent = Parent(changes.head_version, book.fact_ids, list(self.entry_ids), book.radii.clone())
            for name in ("whole", "changes"):
                operation(self.books[name], session, name)
            self.made += 1
            rows = entry_rows_for(session, whole, self.books["whole"].fact_ids)
            commit_version(session, whole, parent=whole.head_version, kind="edit", entries=rows,
                           radii=self.books["whole"].radii.tolist(), actor="test", source="test", job_id=None,
                           summary={})
            count = loaded_rows(session)
            job = SimpleNamespace(id=None, actor="test", source="test")
            recorded = _commit_changes(session, changes, book, parent, Change("edit"), job, {})
            assert recorded is not None
            version, self.entry_ids = recorded
            summary = version.summary
            self.loaded.append((len(summary["added"]) + len(summary["removed"]), count[0]))


def add(twin: Twin):
    def operation(book, session, name):
        book.add(twin.new_entry(session, name))
    return operation


def test_commits_by_changes_record_the_same_versions_as_whole_commits_in_o_changes_rows(db):
    twin = Twin(db)
    for _ in range(SIZE):
        twin.step(add(twin))
    before_removals = {name: book.copy() for name, book in twin.books.items()}
    for fact_index in (3, 50):  # retracts: the radii they cut come back
        twin.step(lambda book, _session, _name, i=fact_index: book.remove(book.fact_id(i)))
    # A new fact for an input the codebook holds supersedes its entry.
    twin.step(lambda book, session, name: book.add(twin.new_entry(session, name, input_id="in-7")))

    def roll_back(book, session, name):
        # A rollback's codebook is the earlier version's, entries in row order (what the worker loads).
        earlier = before_removals[name]
        model = get_model(session, name)
        target = next(v for v in range(model.head_version, -1, -1)
                      if [e.fact_id for e in entries_at(session, model, v)] == earlier.fact_ids)
        book.__dict__.update(Codebook.with_radii(SPEC, {}, earlier.entries, earlier.radii.tolist()).__dict__)
        assert target == SIZE
    twin.step(roll_back)

    with db.session() as session:
        whole, changes = get_model(session, "whole"), get_model(session, "changes")
        assert whole.head_version == changes.head_version == SIZE + 4
        for number in range(whole.head_version + 1):
            # The twins' facts are separate rows (other ids) made in the same order: compare by input.
            a, b = manifest_at(session, whole, number), manifest_at(session, changes, number)
            assert [(r.input_id, r.answer, r.radius, r.base_radius) for r in a] == \
                [(r.input_id, r.answer, r.radius, r.base_radius) for r in b]
            va, vb = get_version(session, whole, number), get_version(session, changes, number)
            inputs = {r.fact_id: r.input_id for r in [*a, *manifest_at(session, whole, max(number - 1, 0))]}
            inputs_b = {r.fact_id: r.input_id for r in [*b, *manifest_at(session, changes, max(number - 1, 0))]}
            assert va.num_entries == vb.num_entries == len(a)
            for key in ("added", "removed"):
                assert sorted(inputs[f] for f in va.summary[key]) == sorted(inputs_b[f] for f in vb.summary[key])
            assert va.content_sha256 == content_hash(entries_at(session, whole, number))
            assert vb.content_sha256 == content_hash(entries_at(session, changes, number))
        # The rollback's content hash is its target's: the same entries.
        rolled_back, target = get_version(session, changes, SIZE + 4), get_version(session, changes, SIZE)
        assert rolled_back.content_sha256 == target.content_sha256
    assert twin.entry_ids == [r.entry_id for r in manifest_at_head(db, "changes")]
    # Rows loaded per change commit: a few per change (the spans closed, the entries added or
    # removed, the parent version), however large the codebook.
    for changed, loaded in twin.loaded[SIZE // 2:]:
        assert loaded <= 3 * changed + 12 < SIZE // 2, twin.loaded


def manifest_at_head(db, name):
    with db.session() as session:
        model = get_model(session, name)
        return manifest_at(session, model, model.head_version)


def test_a_version_held_after_the_parent_makes_the_change_commit_decline(db):
    twin = Twin(db)
    twin.step(add(twin))
    with db.session() as session:
        model = lock_model(session, get_model(session, "changes").id)
        book = twin.books["changes"]
        parent = Parent(model.head_version, book.fact_ids, list(twin.entry_ids), book.radii.clone())
        rows = entry_rows_for(session, model, book.fact_ids)
        commit_version(session, model, parent=model.head_version, kind="batch", entries=rows,
                       radii=book.radii.tolist(), actor="test", source="test", job_id=None, summary={}, held=True)
        book.add(twin.new_entry(session, "changes"))
        job = SimpleNamespace(id=None, actor="test", source="test")
        assert _commit_changes(session, model, book, parent, Change("edit"), job, {}) is None


def old_definition(session, model, number):
    rows = [[e.fact_id, e.blob_sha256, e.base_radius] for e in sorted(entries_at(session, model, number),
                                                                      key=lambda e: e.id)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_migration_0006_recomputes_every_content_hash_both_ways(db):
    from alembic import command

    twin = Twin(db)
    for _ in range(6):
        twin.step(add(twin))
    twin.step(lambda book, _session, _name: book.remove(book.fact_id(2)))
    command.downgrade(db.alembic_config(), "0005")
    with db.session() as session:
        model = get_model(session, "changes")
        for number in range(model.head_version + 1):
            assert get_version(session, model, number).content_sha256 == old_definition(session, model, number)
    command.upgrade(db.alembic_config(), "head")
    with db.session() as session:
        for name in ("whole", "changes"):
            model = get_model(session, name)
            hashes = [get_version(session, model, n).content_sha256 for n in range(model.head_version + 1)]
            assert hashes == [content_hash(entries_at(session, model, n)) for n in range(model.head_version + 1)]
            assert len(set(hashes)) == len(hashes)  # every version here holds other entries
