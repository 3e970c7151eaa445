"""What kbctl tells an operator: the edit report of a fact, warnings after --wait, --model after
the command, identical versions said so, help examples that keep their lines, and stored text
that cannot act on the terminal."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from daemon_harness import Daemon, registered_daemon

from kb_daemon.cli import cli, printable

Q = "what shape is it?"


@pytest.fixture
def daemon(tmp_path, tiny_assets, database_url):
    d = registered_daemon(tmp_path / "home", database_url, tiny_assets / "tiny")
    d.env["KB_MODEL"] = "demo"  # every command below names --model tiny after the command itself
    yield d
    d.stop_workers()


@pytest.mark.slow
def test_fact_report_and_warnings(daemon, tiny_assets):
    assets = tiny_assets
    d = daemon
    worker = Daemon(d.home, model="tiny")
    worker.env = {**d.env, "KB_MODEL": "tiny"}
    worker.start_worker("worker")
    try:
        red, green = str(assets / "red.png"), str(assets / "green.png")
        # The red image itself as a negative: it lies at distance 0, inside any radius.
        text = d.kbctl("submit-fact", "--model", "tiny", "--image", red, "--question", Q, "--answer", "brick",
                       "--negative-image", green, "--negative-image", red, "--wait").stdout
        assert "applied as version 1 (radius " in text
        assert "warning: 1 negative inside the radius" in text
        data = d.kbctl("submit-fact", "--model", "tiny", "--image", green, "--question", Q, "--answer", "ring",
                       "--negative-image", red, "--wait", "--json")
        assert data["version"] == 2
        # The two facts' balls overlapped (another answer): the only warning names that conflict.
        assert [c["answer"] for c in data["conflicts"]] == ["brick"]
        assert [w.split(" (")[0] for w in data["warnings"]] == [f"conflicts with {data['conflicts'][0]['fact_id']}"]

        detail = d.kbctl("fact", "--model", "tiny", data["fact_id"], "--json")
        report = detail["report"]
        assert (detail["status"], detail["entered_version"], detail["answer"]) == ("applied", 2, "ring")
        assert report["fact_id"] == data["fact_id"] and report["answer"] == "ring"
        assert len(report["negative_distances"]) >= 1 and all(n > report["radius"]
                                                              for n in report["negative_distances"])
        shown = d.kbctl("fact", "--model", "tiny", data["fact_id"]).stdout
        assert f"fact {data['fact_id']}: applied (entered v2)" in shown
        assert f"radius {report['radius']:.4g}" in shown and "unedited answer" in shown

        # --model after the command, on commands that had it only before.
        assert [j["kind"] for j in d.kbctl("jobs", "--model", "tiny", "--json")] == ["edit", "edit"]
        assert d.kbctl("status", "--model", "tiny", "--json")["head_version"] == 2
        assert d.kbctl("diff", "--model", "tiny", "2", "2").stdout == \
            "versions 2 and 2 hold the same facts with the same radii\n"

        # A stored answer holding a right-to-left override and a bell is printed escaped.
        engine = sa.create_engine(d.env["KB_DATABASE_URL"])
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE facts SET answer = :a WHERE id = :i"),
                               {"a": "ri\u202eng\x07", "i": data["fact_id"]})
        engine.dispose()
        shown = d.kbctl("fact", "--model", "tiny", data["fact_id"]).stdout
        assert "\u202e" not in shown and "\x07" not in shown
        assert "ri\\u202eng" in shown
        shown = d.kbctl("show", "--model", "tiny", "2").stdout
        assert "\u202e" not in shown and "\x07" not in shown
    finally:
        worker.stop_workers()


def test_printable_escapes_controls_and_bidi_overrides_only():
    assert printable("caf\u00e9 \u202eabc\u2066\x1b[31m\x9b") == "caf\u00e9 \\u202eabc\\u2066\\u001b[31m\\u009b"
    assert printable("two\nlines\tand a tab") == "two\nlines\tand a tab"  # kbctl's own layout


def test_help_examples_keep_their_line_breaks():
    result = CliRunner().invoke(cli, ["submit-fact", "--help"])
    assert "Example:\n      kbctl submit-fact --image cat.png" in result.output
    assert "\\\n          --rephrase" in result.output
