"""`kbctl model set`: a model's settings change in its ordered queue; jobs queued before the change
run with the old settings, jobs queued after it with the new ones."""

from __future__ import annotations

import pytest
from daemon_harness import job_rows, registered_daemon

Q = "what shape is it?"


@pytest.fixture
def daemon(tmp_path, tiny_assets, database_url):
    d = registered_daemon(tmp_path / "home", database_url, tiny_assets / "tiny", "--hparam", "max_steps=40",
                          "--hparam", "early_stop=false")
    yield d
    d.stop_workers()


@pytest.mark.slow
def test_settings_take_effect_for_jobs_queued_after_the_change(daemon, tiny_assets):
    assets = tiny_assets
    d = daemon
    before = d.kbctl("submit-fact", "--image", str(assets / "red.png"), "--question", Q, "--answer", "brick",
                     "--json")
    changed = d.kbctl("model", "set", "tiny", "--hparam", "max_steps=7", "--actor", "carol", "--json")
    assert changed["changed"] == ["hparams.max_steps"] and changed["hparams"]["max_steps"] == 7
    after = d.kbctl("submit-fact", "--image", str(assets / "green.png"), "--question", Q, "--answer", "ring",
                    "--json")
    d.start_worker()
    d.wait_for(lambda: d.kbctl("status", "--json")["head_version"] == 2, what="both edits")
    assert d.kbctl("fact", before["fact_id"], "--json")["report"]["steps"] == 40
    assert d.kbctl("fact", after["fact_id"], "--json")["report"]["steps"] == 7
    jobs = d.kbctl("jobs", "--json")
    assert [(j["kind"], j["status"], j["actor"]) for j in reversed(jobs)][1] == ("settings", "done", "carol")
    assert [r["status"] for r in job_rows(d)] == ["done", "done", "done"]
    assert d.kbctl("model", "list", "--json")[-1]["hparams"]["max_steps"] == 7


@pytest.mark.parametrize(("args", "message"), [
    (("--hparam", "distance=euclidean"), "Error: distance of model 'tiny' cannot change from 'cosine' to "
                                          "'euclidean': its codebooks were built under it; register the weights "
                                          "again as another model\n"),
    (("--hparam", "max_steps=40"), "Error: model 'tiny' already has these settings; nothing changed\n"),
    (("--canary-max-changed", "2"), "Error: canary share must lie in [0, 1], got 2.0\n"),
])
def test_refused_settings_change_nothing(tmp_path, tiny_assets, args, message):
    d = registered_daemon(tmp_path / "home", None, tiny_assets / "tiny", "--hparam", "max_steps=40")
    listed = d.kbctl("model", "list", "--json")
    result = d.kbctl("model", "set", "tiny", *args, expect=1)
    assert result.stderr == message
    assert d.kbctl("model", "list", "--json") == listed and d.kbctl("jobs", "--json") == []
