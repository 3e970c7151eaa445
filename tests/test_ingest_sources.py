"""Ingestion sources: a schema per line, CSV with a byte-order mark, a sync limited to its own
source, and an unchanged line that does not undo a rollback or a retract."""

from __future__ import annotations

import json

import pytest
from daemon_harness import Daemon, registered_daemon

Q = "what shape is it?"


@pytest.fixture
def assets(tiny_assets):
    return tiny_assets


def make_daemon(tmp_path, assets, url: str | None = None) -> Daemon:
    return registered_daemon(tmp_path / "home", url, assets / "tiny")


def folder(tmp_path, assets, name: str) -> object:
    path = tmp_path / name
    path.mkdir()
    for colour in ("red", "green", "blue"):
        (path / f"{colour}.png").write_bytes((assets / f"{colour}.png").read_bytes())
    return path


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(("row", "message"), [
    ({"image": "red.png", "question": Q, "answer": "a", "negative_images": "green.png"},
     "field 'negative_images': Input should be a valid list (got \"green.png\")"),
    ({"image": "red.png", "question": Q, "answer": "a", "colour": "red"},
     "unknown field 'colour' (known: image, question, answer, rephrases, negatives, negative_images, "
     "negative_questions, supersedes)"),
    ({"image": "red.png", "answer": "a"}, "missing field 'question'"),
    ({"image": "red.png", "question": Q, "answer": 7}, "field 'answer': Input should be a valid string (got 7)"),
    ({"image": "red.png", "question": Q, "answer": "a", "negatives": [{"image": "green.png", "colour": 1}]},
     "unknown field 'negatives.0.colour' (known: image, question)"),
    ({"image": "red.png", "question": Q, "answer": "a", "negatives": [{}]},
     "field 'negatives.0': a negative needs an 'image' or a 'question' (got {})"),
])
def test_a_malformed_line_is_refused_by_name_with_nothing_queued(tmp_path, assets, row, message):
    d = make_daemon(tmp_path, assets)
    source = folder(tmp_path, assets, "src")
    write_jsonl(source / "facts.jsonl", [{"key": "ok", "image": "red.png", "question": Q, "answer": "b"}, row])
    result = d.kbctl("ingest", str(source), expect=1)
    assert result.stderr == f"Error: {source / 'facts.jsonl'}:2: {message}\n"
    assert d.kbctl("jobs", "--json") == []


def test_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path, assets):
    from kb_daemon.config import Settings
    from kb_daemon.ingest import parse_source

    source = folder(tmp_path, assets, "csvsrc")
    (source / "facts.csv").write_bytes(
        "\ufeffimage,question,answer,negative_images\nred.png,what shape is it?,brick,green.png|blue.png\n"
        .encode("utf-8"))
    [parsed] = parse_source(source, Settings.from_env({"KB_HOME": str(tmp_path / "home")}))
    assert parsed.fact.image == (source / "red.png").read_bytes()
    assert parsed.fact.negative_images == ((source / "green.png").read_bytes(), (source / "blue.png").read_bytes())
    assert (parsed.fact.question, parsed.fact.answer) == (Q, "brick")


def test_a_csv_column_nobody_knows_is_refused(tmp_path, assets):
    d = make_daemon(tmp_path, assets)
    source = folder(tmp_path, assets, "csvsrc")
    (source / "facts.csv").write_text("image,question,answer,colour\nred.png,what shape is it?,brick,red\n")
    result = d.kbctl("ingest", str(source / "facts.csv"), expect=1)
    assert result.stderr.startswith(f"Error: {source / 'facts.csv'}:2: unknown field 'colour'")


@pytest.fixture
def daemon(tmp_path, assets, database_url):
    d = make_daemon(tmp_path, assets, database_url)
    yield d
    d.stop_workers()


@pytest.mark.slow
def test_sync_stays_within_its_source_and_a_feed_does_not_undo_a_rollback(daemon, tmp_path, assets):
    d = daemon
    nightly, csvsrc = folder(tmp_path, assets, "nightly"), folder(tmp_path, assets, "csvsrc")
    rows = [{"key": "red", "image": "red.png", "question": Q, "answer": "brick"},
            {"key": "green", "image": "green.png", "question": Q, "answer": "ring",
             "negative_images": ["red.png"]}]
    write_jsonl(nightly / "facts.jsonl", rows)
    (csvsrc / "facts.csv").write_text("key,image,question,answer\nblue,blue.png,what shape is it?,tile\n")
    d.start_worker()
    assert d.kbctl("ingest", str(nightly), "--wait", "--json")["version"] == 1
    assert d.kbctl("ingest", str(csvsrc), "--wait", "--json")["version"] == 2

    # One line removed from the nightly source: only that fact is retracted, not the CSV's.
    write_jsonl(nightly / "facts.jsonl", rows[:1])
    synced = d.kbctl("ingest", str(nightly), "--sync", "--wait", "--json")
    assert (synced["retract"], synced["source"], synced["version"]) == (1, str(nightly), 3)
    applied = {f["answer"] for f in d.kbctl("show", "3", "--json")["facts"]}
    assert applied == {"brick", "tile"}
    text = d.kbctl("ingest", str(nightly), "--sync").stdout
    assert f"0 to retract from {nightly}; nothing to do" in text

    # Roll back to version 1 (the two nightly facts), then back to 0: the feed, unchanged, must
    # not bring them back; a changed line may.
    write_jsonl(nightly / "facts.jsonl", rows)
    assert d.kbctl("rollback", "0", "--wait", "--json")["version"] == 4
    again = d.kbctl("ingest", str(nightly), "--json")
    assert again["job_id"] is None and again["new"] == 0
    reasons = {s["key"]: s["reason"] for s in again["skipped"]}
    assert reasons == {"red": "rolled back at version 4; change the line to apply it again",
                       "green": "retracted at version 3; change the line to apply it again"}
    shown = d.kbctl("ingest", str(nightly)).stdout
    assert "2 skipped (removed by a retract or rollback)" in shown and "nothing to do" in shown
    rows[0]["answer"] = "block"
    write_jsonl(nightly / "facts.jsonl", rows)
    changed = d.kbctl("ingest", str(nightly), "--wait", "--json")
    assert (changed["new"], len(changed["skipped"]), changed["version"]) == (1, 1, 5)
    assert [f["answer"] for f in d.kbctl("show", "5", "--json")["facts"]] == ["block"]
