"""A registered model's hyperparameters are pinned when it is registered."""

from __future__ import annotations

import dataclasses

from daemon_harness import Daemon

from editor.config import EditConfig


def test_model_add_pins_every_hyperparameter_defaults_included(tmp_path):
    d = Daemon(tmp_path / "home")
    d.kbctl("init")
    d.kbctl("model", "add", "pinned", "demo", "--hparam", "alpha=0.35", "--hparam", "distance=euclidean")
    models = {m["name"]: m for m in d.kbctl("model", "list", "--json")}
    every_knob = {f.name for f in dataclasses.fields(EditConfig)}
    assert set(models["pinned"]["hparams"]) == every_knob
    assert models["pinned"]["hparams"]["alpha"] == 0.35
    assert models["pinned"]["hparams"]["distance"] == "euclidean"
    assert models["pinned"]["hparams"]["stop_margin"] == EditConfig().stop_margin
    assert models["demo"]["hparams"] == EditConfig().to_dict()  # `kbctl init` pins the defaults too


def test_model_add_refuses_an_unknown_hyperparameter_and_registers_nothing(tmp_path):
    d = Daemon(tmp_path / "home")
    d.kbctl("init")
    result = d.kbctl("model", "add", "bad", "demo", "--hparam", "alhpa=0.3", expect=1)
    assert result.stderr.startswith("Error: unknown hyperparameter(s) alhpa; valid: ")
    assert [m["name"] for m in d.kbctl("model", "list", "--json")] == ["demo"]
