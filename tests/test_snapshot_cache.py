"""The derived codebook cache and O(changes) version moves.

A version's cache file must give exactly the codebook the database gives; any file that does not
check out (corrupted, truncated, padded, stale, foreign) is ignored, logged, deleted and written
again from the database; a runtime that holds a version and moves to another reads only the blobs
of the entries that differ (counted, not timed).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import kb_daemon.snapshots as snapshots_module
from editor.codebook import Codebook, CodebookSpec, Entry
from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.errors import InvalidInput
from kb_daemon.queue import FactInput, get_model, lock_model, record_fact, register_model
from kb_daemon.snapshot_cache import CodebookCache, capture, load_version
from kb_daemon.snapshots import commit_version, entry_rows_for, get_version, manifest_at, materialise, store_entry

HEAD_ENTRIES = 200


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A tiny registered model with versions 1..HEAD_ENTRIES, each adding one synthetic entry
    (version v holds v entries), then version HEAD_ENTRIES + 1 retracting entry 100 again.
    Returns (db, fact ids in order)."""
    from tiny_models import save

    from kb_daemon.runtime import load_model

    root = tmp_path_factory.mktemp("snapshot-cache")
    save("llava-llama", root / "tiny")
    db = Database(Settings.from_env({"KB_HOME": str(root / "home")}))
    db.upgrade()
    with db.session() as session:
        register_model(session, "tiny", str(root / "tiny"), actor="test")
    load_model(db, "tiny").runtime.wait_for_cache()  # records the spec
    generator = torch.Generator().manual_seed(0)
    fact_ids: list[str] = []
    with db.session() as session:
        model = lock_model(session, get_model(session, "tiny").id)
        assert model.spec is not None
        spec = CodebookSpec(**model.spec)
        book = Codebook(spec, dict(model.hparams))
        for i in range(HEAD_ENTRIES):
            fact = record_fact(session, model, FactInput(None, f"q {i}?", f"a {i}"), actor="test", source="test")
            made = Entry(fact.id, f"a {i % 7}", f"in-{i}", torch.randn(spec.input_size, generator=generator),
                         torch.randn(2 + i % 5, spec.output_size, generator=generator), 0.5 + (i % 3))
            store_entry(session, model, made)
            book.add(made)
            fact_ids.append(fact.id)
            commit_version(session, model, parent=model.head_version, kind="edit",
                           entries=entry_rows_for(session, model, book.fact_ids), radii=book.radii.tolist(),
                           actor="test", source="test", job_id=None, summary={})
        book.remove(fact_ids[100])
        commit_version(session, model, parent=model.head_version, kind="retract",
                       entries=entry_rows_for(session, model, book.fact_ids), radii=book.radii.tolist(),
                       actor="test", source="test", job_id=None, summary={})
    yield db, fact_ids
    db.dispose()


@pytest.fixture
def cache(history):
    db, _facts = history
    cache = CodebookCache(db.settings.home / "cache" / "codebooks", keep_versions=2)
    cache.clear()
    return cache


def database_codebook(db, number):
    with db.session() as session:
        return materialise(session, get_model(session, "tiny"), number)


def write(db, cache, number):
    with db.session() as session:
        model = get_model(session, "tiny")
        snapshot = capture(model, number, materialise(session, model, number))
        assert snapshot is not None
        return cache.write(snapshot, get_version(session, model, number), manifest_at(session, model, number), model)


def load(db, cache, number, held=None):
    with db.session() as session:
        return load_version(session, get_model(session, "tiny"), number, cache, held)


def assert_same(book, expected):
    assert book.to_bytes() == expected.to_bytes()
    assert torch.equal(book.radii, expected.radii)
    assert book.fact_ids == expected.fact_ids


@pytest.mark.parametrize("number", [0, 1, HEAD_ENTRIES, HEAD_ENTRIES + 1])
def test_a_cache_hit_gives_the_databases_codebook_byte_for_byte(history, cache, number):
    db, _facts = history
    path = write(db, cache, number)
    assert path.exists()
    loaded, source = load(db, cache, number)
    assert source == "cache" and loaded.blobs_read == 0
    assert_same(loaded.codebook, database_codebook(db, number))
    with db.session() as session:
        assert loaded.entry_ids == [row.entry_id for row in manifest_at(session, get_model(session, "tiny"), number)]


def test_the_cache_file_is_plain_safetensors(history, cache):
    from safetensors import safe_open

    db, _facts = history
    path = write(db, cache, HEAD_ENTRIES)
    expected = database_codebook(db, HEAD_ENTRIES)
    with safe_open(str(path), framework="pt") as opened:
        assert torch.equal(opened.get_tensor("keys"), expected.keys)
        assert torch.equal(opened.get_tensor("radii"), expected.radii)
        assert opened.metadata()["entries"] == str(HEAD_ENTRIES)


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def flip_header_byte(path):
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def pad(path):
    path.write_bytes(path.read_bytes() + b"\0" * 8)


DAMAGES = {
    "a flipped payload byte": (flip_last_byte, "corrupted"),
    "a flipped header byte": (flip_header_byte, ""),
    "truncated": (truncate, "truncated"),
    "padded": (pad, "truncated or padded"),
    "empty": (lambda path: path.write_bytes(b""), "truncated"),
    "pickle bytes": (lambda path: path.write_bytes(b"\x80\x04\x95" + b"\0" * 64), ""),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_file_is_ignored_logged_and_deleted(history, cache, caplog, damage):
    db, _facts = history
    path = write(db, cache, HEAD_ENTRIES)
    harm, reason = DAMAGES[damage]
    harm(path)
    with caplog.at_level(logging.WARNING, logger="kb_daemon.snapshot_cache"):
        loaded, source = load(db, cache, HEAD_ENTRIES)
    assert source == "database" and loaded.blobs_read == HEAD_ENTRIES
    assert_same(loaded.codebook, database_codebook(db, HEAD_ENTRIES))
    assert not path.exists()
    assert any("not used" in r.message and reason in r.message for r in caplog.records), caplog.text


def test_a_stale_cache_file_is_ignored(history, cache, caplog):
    """Another version's file under this version's name (e.g. a database restored from a backup)."""
    db, _facts = history
    other = write(db, cache, HEAD_ENTRIES - 1)
    path = other.with_name(f"version-{HEAD_ENTRIES}.safetensors")
    shutil.copy(other, path)
    with caplog.at_level(logging.WARNING, logger="kb_daemon.snapshot_cache"):
        loaded, source = load(db, cache, HEAD_ENTRIES)
    assert source == "database"
    assert_same(loaded.codebook, database_codebook(db, HEAD_ENTRIES))
    assert "stale" in caplog.text and not path.exists()


def test_the_cache_keeps_the_last_versions_and_can_be_cleared(history, cache):
    db, _facts = history
    paths = [write(db, cache, number) for number in (10, 11, 12)]
    assert [p.exists() for p in paths] == [False, True, True]
    assert cache.clear() == 2 and not any(p.exists() for p in paths)
    disabled = CodebookCache(cache.root, keep_versions=0)
    write(db, disabled, 10)
    loaded, source = load(db, disabled, 10)
    assert source == "database"


def counting_blob_reads(monkeypatch):
    """Counts the blob digests read through get_blobs (a one-item list)."""
    count = [0]
    real = snapshots_module.get_blobs

    def counting(session, digests, what):
        count[0] += len(set(digests))
        return real(session, digests, what)

    monkeypatch.setattr(snapshots_module, "get_blobs", counting)
    return count


@pytest.mark.parametrize(("start", "target", "most_blobs"), [
    (HEAD_ENTRIES + 1, HEAD_ENTRIES, 1),  # a rollback over one retract: the retracted entry comes back
    (HEAD_ENTRIES, HEAD_ENTRIES + 1, 0),  # the retract itself: nothing to read
    (HEAD_ENTRIES - 3, HEAD_ENTRIES, 3),  # another worker committed 3 edits in between
    (HEAD_ENTRIES, 150, 0),  # a rollback over 50 edits: only removals
])
def test_moving_a_held_version_reads_only_the_changed_blobs(history, cache, monkeypatch, start, target,
                                                            most_blobs):
    db, _facts = history
    held = database_codebook(db, start)
    reads = counting_blob_reads(monkeypatch)
    loaded, source = load(db, cache, target, held=held)
    assert source == "reuse"
    assert reads[0] == loaded.blobs_read == most_blobs
    assert_same(loaded.codebook, database_codebook(db, target))


def spans_with_an_end_between(db, low, high):
    """Span rows of the model that open or close in versions (low, high], counted in SQL."""
    from sqlalchemy import func, or_, select

    from kb_daemon.models import EntrySpan

    with db.session() as session:
        return session.execute(select(func.count(EntrySpan.id)).where(
            EntrySpan.model_id == get_model(session, "tiny").id,
            or_(EntrySpan.from_version.between(low + 1, high), EntrySpan.to_version.between(low + 1, high)),
        )).scalar_one()


@pytest.mark.parametrize(("start", "target", "blobs"), [
    (HEAD_ENTRIES + 1, HEAD_ENTRIES, 1),  # a rollback over one retract: the retracted entry comes back
    (HEAD_ENTRIES, HEAD_ENTRIES + 1, 0),  # the retract itself
    (HEAD_ENTRIES - 3, HEAD_ENTRIES, 3),  # another worker committed 3 edits in between
    (HEAD_ENTRIES, 180, 0),  # a rollback over 20 edits: only removals
    (150, HEAD_ENTRIES + 1, 50),  # forward over 50 edits and the retract of an entry held before them
    (0, 10, 10),  # from the empty codebook
    (10, 0, 0),  # to the empty codebook
])
def test_moving_by_the_changes_reads_rows_and_blobs_in_proportion_to_them(history, monkeypatch, start, target,
                                                                          blobs):
    """The span rows and blobs read are the versions' difference, not their size (counted, not
    timed), and the spliced codebook is the database's, byte for byte."""
    from kb_daemon.snapshots import Materialised, materialise_from

    db, _facts = history
    with db.session() as session:
        model = get_model(session, "tiny")
        base = materialise_from(session, model, start, {})
        differ = set(manifest_at(session, model, start)) ^ set(manifest_at(session, model, target))
    assert base.spans_read == len(base.codebook)  # a full load reads a span per entry
    before = base.codebook.to_bytes()
    reads = counting_blob_reads(monkeypatch)
    with db.session() as session:
        loaded, source = load_version(session, get_model(session, "tiny"), target, None,
                                      base=(start, Materialised(base.codebook, base.entry_ids, 0)))
    assert source == "changes"
    assert loaded.blobs_read == reads[0] == blobs
    # Every span read opens or closes between the two versions; the entries or radii that differ need one each.
    assert len(differ) <= loaded.spans_read == spans_with_an_end_between(db, min(start, target), max(start, target))
    if abs(target - start) <= 3:
        assert loaded.spans_read <= 4 * abs(target - start) + 8 and loaded.spans_read < len(loaded.codebook) // 10
    assert_same(loaded.codebook, database_codebook(db, target))
    with db.session() as session:
        assert loaded.entry_ids == [row.entry_id for row in manifest_at(session, get_model(session, "tiny"), target)]
    assert base.codebook.to_bytes() == before  # the base is left as it was (a server keeps serving it)


def test_a_move_across_more_span_changes_than_entries_loads_the_version_in_full(history):
    """Rolling 200 entries back to 150 crosses the spans of 50 edits and of the radii they cut:
    more rows than the target's 150 entries, so the version is read whole instead."""
    from kb_daemon.snapshots import Materialised, materialise_from

    db, _facts = history
    assert spans_with_an_end_between(db, 150, HEAD_ENTRIES) > 150
    with db.session() as session:
        model = get_model(session, "tiny")
        base = materialise_from(session, model, HEAD_ENTRIES, {})
        loaded, source = load_version(session, model, 150, None, base.codebook,
                                      base=(HEAD_ENTRIES, Materialised(base.codebook, base.entry_ids, 0)))
    assert (source, loaded.spans_read, loaded.blobs_read) == ("reuse", 150, 0)
    assert_same(loaded.codebook, database_codebook(db, 150))


def test_load_model_writes_the_cache_then_reads_it_and_rebuilds_a_damaged_one(history, monkeypatch, caplog):
    from tiny_models import image

    from kb_daemon.runtime import load_model

    db, _facts = history
    CodebookCache(db.settings.home / "cache" / "codebooks").clear()
    cold = load_model(db, "tiny")
    cold.runtime.wait_for_cache()
    assert cold.runtime.last_load.source == "database" and cold.version == HEAD_ENTRIES + 1
    path = cold.runtime.cache.path(cold.model, cold.version)
    assert path.exists()
    reads = counting_blob_reads(monkeypatch)
    warm = load_model(db, "tiny")
    assert warm.runtime.last_load.source == "cache" and reads[0] == 0
    assert_same(warm.runtime.editor.codebook, cold.runtime.editor.codebook)
    picture = image((230, 20, 20), "square")
    assert warm.runtime.editor.answer(picture, "q 3?") == cold.runtime.editor.answer(picture, "q 3?")
    truncate(path)
    with caplog.at_level(logging.WARNING, logger="kb_daemon.snapshot_cache"):
        again = load_model(db, "tiny")
    again.runtime.wait_for_cache()
    assert again.runtime.last_load.source == "database" and "truncated" in caplog.text
    assert_same(again.runtime.editor.codebook, cold.runtime.editor.codebook)
    assert path.exists()  # rebuilt from the database
    reads[0] = 0
    rolled = load_model(db, "tiny", HEAD_ENTRIES, runtime_for=lambda model: again.runtime)
    # From the version it holds, a runtime reads only the spans and blobs that differ.
    assert rolled.runtime.last_load.source == "changes" and reads[0] == 1
    assert_same(rolled.runtime.editor.codebook, database_codebook(db, HEAD_ENTRIES))


def test_kb_index_entries_indexes_a_loaded_codebook_in_the_background(history):
    from tiny_models import image

    from editor.ann import IndexSettings
    from kb_daemon.runtime import load_model

    db, _facts = history
    indexed = Database(Settings.from_env({"KB_HOME": str(db.settings.home), "KB_INDEX_ENTRIES": "150"}))
    try:
        loaded = load_model(indexed, "tiny")
        book = loaded.runtime.editor.codebook
        assert len(book) == HEAD_ENTRIES - 1
        assert book.index_settings == IndexSettings(threshold=150, background=True)
        assert book.memory_bytes()["index"] == 0  # nothing is built before a lookup needs it
        picture = image((230, 20, 20), "square")
        scanned = loaded.runtime.editor.answer(picture, "q 3?")  # answered by the scan; the build begins
        built = book.wait_for_index(120)
        assert built is not None and len(built) == len(book)
        assert loaded.runtime.editor.answer(picture, "q 3?") == scanned
        # A version below the threshold is scanned and holds no index.
        small = load_model(indexed, "tiny", 100, runtime_for=lambda model: loaded.runtime)
        small.runtime.editor.answer(picture, "q 3?")
        assert small.runtime.editor.codebook.wait_for_index(5) is None
    finally:
        indexed.dispose()
    with pytest.raises(InvalidInput, match="KB_INDEX_ENTRIES must be an integer"):
        Settings.from_env({"KB_HOME": str(db.settings.home), "KB_INDEX_ENTRIES": "many"})
