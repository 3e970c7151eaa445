"""Conflicts surfaced and `--supersedes` (issue 21, point 3), through kbctl and a real worker, on
SQLite and PostgreSQL: a fact whose input already fires another fact's entry is told so, and a
fact submitted with --supersedes (or an ingestion line with `supersedes`, or a changed key)
replaces the old fact in the same version, recorded in the ledger."""

from __future__ import annotations

import json

import pytest
from daemon_harness import Daemon, registered_daemon

Q = "what shape is it?"
R = "which shape is this?"


@pytest.fixture
def daemon(tmp_path, tiny_assets, database_url):
    d = registered_daemon(tmp_path / "home", database_url, tiny_assets / "tiny")
    worker = Daemon(d.home, model="tiny")
    worker.env = d.env
    worker.start_worker("worker")
    yield d
    worker.stop_workers()


@pytest.mark.slow
def test_conflicts_are_named_and_supersedes_replaces_the_old_fact(daemon, tiny_assets):
    d = daemon
    red, green = str(tiny_assets / "red.png"), str(tiny_assets / "green.png")
    old = d.kbctl("submit-fact", "--image", red, "--question", Q, "--answer", "brick", "--rephrase", R,
                  "--negative-image", green, "--wait", "--json")
    assert old["conflicts"] == [] and old["superseded"] == []
    # The new fact's input is the old fact's rephrasing, inside the old entry's ball.
    new = d.kbctl("submit-fact", "--image", red, "--question", R, "--answer", "ring", "--negative-image", green,
                  "--wait", "--json")
    conflict, = new["conflicts"]
    assert conflict["fact_id"] == old["fact_id"] and conflict["answer"] == "brick"
    assert conflict["kind"] == "fires_on_new_input" and conflict["radius_after"] <= conflict["radius_before"]
    assert any(w.startswith(f"conflicts with {old['fact_id']} ('brick')") for w in new["warnings"])
    text = d.kbctl("fact", new["fact_id"]).stdout
    assert f"warning: conflicts with {old['fact_id']}" in text and "--supersedes" in text
    report = d.kbctl("fact", new["fact_id"], "--json")["report"]  # the job result's edit report
    assert [c["fact_id"] for c in report["conflicts"]] == [old["fact_id"]]

    replacing = d.kbctl("submit-fact", "--image", red, "--question", "what is it?", "--answer", "slab",
                        "--supersedes", old["fact_id"], "--wait", "--json")
    assert replacing["superseded"] == [old["fact_id"]]
    gone = d.kbctl("fact", old["fact_id"], "--json")
    assert (gone["status"], gone["superseded_by"], gone["left_version"]) == (
        "superseded", replacing["fact_id"], replacing["version"])
    assert d.kbctl("fact", replacing["fact_id"], "--json")["supersedes"] == old["fact_id"]
    assert f"submitted to supersede {old['fact_id']}" in d.kbctl("fact", replacing["fact_id"]).stdout
    shown = d.kbctl("show", str(replacing["version"]), "--json")
    assert old["fact_id"] not in [f["fact_id"] for f in shown["facts"]]

    # A fact that is not applied cannot be superseded; nothing is recorded.
    before = d.kbctl("jobs", "--json")
    refused = d.kbctl("submit-fact", "--image", red, "--question", Q, "--answer", "x",
                      "--supersedes", old["fact_id"], expect=1)
    assert refused.stderr.strip() == f"Error: cannot supersede {old['fact_id']}: it is superseded, not applied"
    unknown = d.kbctl("submit-fact", "--image", red, "--question", Q, "--answer", "x",
                      "--supersedes", "f-nope", expect=1)
    assert "cannot supersede 'f-nope'" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    assert d.kbctl("jobs", "--json") == before


@pytest.mark.slow
def test_ingestion_supersedes_by_field_and_by_changed_key(daemon, tiny_assets, tmp_path):
    d = daemon
    for name in ("red", "green", "blue"):
        (tmp_path / f"{name}.png").write_bytes((tiny_assets / f"{name}.png").read_bytes())
    source = tmp_path / "facts.jsonl"

    def write(*lines: dict) -> None:
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))

    write({"key": "k1", "image": "red.png", "question": Q, "answer": "brick"},
          {"key": "k2", "image": "green.png", "question": Q, "answer": "ring"})
    first = d.kbctl("ingest", str(source), "--wait", "--json")
    assert first["new"] == 2
    head = d.kbctl("show", str(first["version"]), "--json")
    facts = {{"brick": "k1", "ring": "k2"}[f["answer"]]: f["fact_id"] for f in head["facts"]}

    # k1 changes its answer AND its image: the old fact must still leave; k3 names k2's fact.
    write({"key": "k1", "image": "blue.png", "question": Q, "answer": "slab"},
          {"key": "k3", "image": "red.png", "question": "what is it?", "answer": "disc",
           "supersedes": facts["k2"]})
    second = d.kbctl("ingest", str(source), "--wait", "--json")
    assert (second["changed"], second["new"], second["unchanged"]) == (1, 1, 0)
    # k3 is applied first (new lines before changed ones) and its input fires k1's "brick" entry
    # (the tiny model's keys all lie close), which the changed k1 line then replaces: the result
    # names what collided on the way.
    named = {c["fact_id"] for item in second["conflicts"] for c in item["conflicts"]}
    assert facts["k1"] in named
    for key in ("k1", "k2"):
        assert d.kbctl("fact", facts[key], "--json")["status"] == "superseded"

    write({"key": "k4", "image": "red.png", "question": Q, "answer": "cone", "supersedes": "f-missing"})
    bad = d.kbctl("ingest", str(source), expect=1)
    assert f"{source}:1: cannot supersede 'f-missing'" in bad.stderr
