"""The evaluation runner and every method behind it, on tiny random models (and on the demo model
when it has been trained)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build

import editor.eval.runner as runner
from editor.adapter import CodebookAdapter
from editor.demo import DEMO_MODEL_DIR
from editor.eval.cases import load_cases, write_cases
from editor.eval.easyvqa import BuildConfig, build_case_files
from editor.eval.readout import Readout
from editor.eval.runner import run_eval
from editor.fact import normalise_answer
from kb_daemon.eval_command import eval_command

SMALL = BuildConfig(
    seed=1,
    class_shapes=1,
    class_colours=0,
    instance_shapes=1,
    instance_colours=1,
    variants=1,
    num_i_gen=2,
    num_loc=3,
    num_negatives=1,
    pool_size=6,
)
SHORT = {"max_new_tokens": 16, "max_answer_tokens": 16}  # random models never stop on their own
TINY_HPARAMS = {
    "balancedit": {**SHORT, "max_steps": 40, "num_hard_negatives": 2},
    "grace": {**SHORT, "max_steps": 40, "early_stop": True},
    "ft": {"max_new_tokens": 16, "max_steps": 5},
    "ike": {"max_new_tokens": 16, "num_demo_edits": 6},
    "mend": {"max_new_tokens": 16, "train_steps": 6, "num_train_edits": 4, "rank": 8},
}


@pytest.fixture(scope="module")
def case_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cases")
    build_case_files(out, SMALL)
    return out / "cases.jsonl"


@pytest.fixture
def backbone():
    return build("llava-llama")


def weights(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def same_weights(before, backbone):
    after = backbone.model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_independent_vs_sequential(case_file, backbone, tmp_path):
    # A radius far larger than the distances between keys: every pair of facts overlaps, so only
    # sequential mode (one codebook) ever splits radii.
    hparams = {**TINY_HPARAMS["grace"], "initial_radius": 1e6}
    independent = run_eval(
        case_file, "grace", False, backbone, hparams=hparams, json_path=tmp_path / "i.json"
    )
    assert independent["mode"] == "independent" and independent["num_cases"] == 3
    assert all(case["apply"]["split_with"] == [] for case in independent["cases"])
    assert independent["exact"]["acc"] == 100.0
    for flavour in ("exact", "token"):
        assert set(independent[flavour]) == {"acc", "t_gen", "i_gen", "loc", "hm"}
    assert json.loads((tmp_path / "i.json").read_text())["exact"] == independent["exact"]

    sequential = run_eval(
        case_file, "grace", True, backbone, hparams=hparams, curve_every=2, plot_path=tmp_path / "curve.png"
    )
    assert sequential["mode"] == "sequential"
    assert [point["edits"] for point in sequential["curve"]] == [2, 3]
    assert any(case["apply"]["split_with"] for case in sequential["cases"])
    assert {c["id"] for c in sequential["cases"]} == {c.case_id for c in load_cases(case_file)}
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sequential["hparams"]["initial_radius"] == 1e6 and sequential["seconds_per_edit"] > 0


class Spy:
    """A method that edits nothing and records what it is given."""

    name = "spy"
    setup: dict = {}

    def __init__(self, backbone):
        self.backbone = backbone
        self.readout = Readout(backbone, 16)
        self.facts = []

    def apply(self, fact):
        self.facts.append(fact)
        return {}

    def reset(self):
        pass

    def generate(self, inputs):
        return self.readout.generate([self.backbone.query(i, q) for i, q in inputs])

    def ranked(self, inputs, answers, k):
        return self.readout.ranked([self.backbone.query(i, q) for i, q in inputs], answers, k)

    def close(self):
        pass


def test_only_the_fact_reaches_the_method_and_no_edit_means_full_locality(case_file, backbone, monkeypatch):
    spy = Spy(backbone)
    monkeypatch.setattr(runner, "_build_method", lambda *args, **kwargs: spy)
    report = run_eval(case_file, "ft", False, backbone, hparams={"max_new_tokens": 16})
    cases = load_cases(case_file)
    assert [f.fact_id for f in spy.facts] == [c.case_id for c in cases]
    for fact, case in zip(spy.facts, cases, strict=True):
        assert (fact.question, fact.answer, fact.rephrases) == (
            case.fact.question,
            case.fact.answer,
            case.fact.rephrases,
        )
        assert len(fact.negatives) == len(case.fact.negatives)
        assert not {p.question for p in case.t_gen} & {fact.question, *fact.rephrases}
    # The untouched model reproduces the reference exactly, in both flavours.
    assert report["exact"]["loc"] == 100.0 and report["token"]["loc"] == 100.0


KIND_OF_METRIC = {"acc": "reliability", "t_gen": "t_gen", "i_gen": "i_gen", "loc": "loc"}


def check_scores(report: dict, cases_path: Path) -> None:
    """Every probe's score follows from its prediction, and every metric from the probes' scores."""
    cases = {c.case_id: c for c in load_cases(cases_path)}
    assert [c["id"] for c in report["cases"]] == list(cases)[: report["num_cases"]]
    for case in report["cases"]:
        for probe in case["probes"]:
            assert probe["exact"] == (normalise_answer(probe["prediction"]) == normalise_answer(probe["target"]))
            assert 0.0 <= probe["token"] <= 1.0, probe
            if probe["kind"] != "loc":  # edit probes are scored against the new answer
                assert probe["target"] == cases[case["id"]].fact.answer
    for flavour in ("exact", "token"):
        metrics = report[flavour]
        for metric, kind in KIND_OF_METRIC.items():
            per_case = [statistics.fmean(float(p[flavour]) for p in c["probes"] if p["kind"] == kind)
                        for c in report["cases"]]
            assert metrics[metric] == pytest.approx(100.0 * statistics.fmean(per_case)), (flavour, metric)
            assert 0.0 <= metrics[metric] <= 100.0
        parts = [metrics["t_gen"], metrics["i_gen"], metrics["loc"]]
        expected_hm = 0.0 if min(parts) == 0 else 3 / sum(1 / v for v in parts)
        assert metrics["hm"] == pytest.approx(expected_hm), flavour


def scored_probes(report: dict) -> list[list[tuple]]:
    return [[(p["kind"], p["prediction"], p["exact"], p["token"]) for p in case["probes"]]
            for case in report["cases"]]


@pytest.mark.parametrize("method", ["balancedit", "grace", "ft", "ike", "mend"])
def test_each_method_applies_and_answers(case_file, backbone, method):
    before = weights(backbone)
    hparams = TINY_HPARAMS[method]
    report = run_eval(case_file, method, False, backbone, hparams=hparams, limit=2)
    assert report["method"] == method and report["num_cases"] == 2 and len(report["cases"]) == 2
    for case in report["cases"]:
        assert case["apply"]["seconds"] > 0 or method == "ike"
        kinds = {probe["kind"] for probe in case["probes"]}
        assert kinds == {"reliability", "t_gen", "i_gen", "loc"}
        assert all(isinstance(probe["prediction"], str) for probe in case["probes"])
    check_scores(report, case_file)
    applied = [case["apply"] for case in report["cases"]]
    if method == "balancedit":
        assert report["exact"]["acc"] == 100.0
        assert all("radius" in probe for case in report["cases"] for probe in case["probes"])
    if method == "ft":
        # Adam on the layer's weight for exactly max_steps (no loss threshold): the answer's loss
        # falls and the weight moves.
        for result in applied:
            assert result["steps"] == hparams["max_steps"]
            assert result["last_loss"] < result["first_loss"] and result["weight_change_norm"] > 0
    if method == "ike":
        # Independent mode: the new fact alone in memory, with num_demos demonstrations, no training.
        assert 0 < report["setup"]["demo_sources"] <= hparams["num_demo_edits"]
        assert all(result["facts_in_memory"] == 1 for result in applied)
        assert all(result["demos"] == min(report["hparams"]["num_demos"], report["setup"]["demo_sources"])
                   for result in applied)
    if method == "mend":
        setup = report["setup"]
        assert setup["training_steps"] == 6 and setup["training_seconds"] > 0
        assert setup["training_edits"] == hparams["num_train_edits"]
        assert all(result["update_norm"] > 0 and result["positions"] > 0 for result in applied)
    # Whatever the method did, the backbone is as it was: no adapter left, weights bit-identical.
    assert not any(isinstance(m, CodebookAdapter) for m in backbone.model.modules())
    assert same_weights(before, backbone)


def test_ft_cases_are_independent(case_file, backbone, tmp_path):
    """Independent mode: reset restores the weight, so the second case scores the same alone as it
    does after the first, prediction for prediction."""
    both = run_eval(case_file, "ft", False, backbone, hparams=TINY_HPARAMS["ft"], limit=2)
    second = write_cases(load_cases(case_file)[1:2], case_file.parent / "second-case-only.jsonl")
    alone = run_eval(second, "ft", False, backbone, hparams=TINY_HPARAMS["ft"])
    assert scored_probes(alone) == scored_probes(both)[1:]
    assert [c["apply"]["last_loss"] for c in alone["cases"]] == [both["cases"][1]["apply"]["last_loss"]]


@pytest.mark.parametrize("method", ["ike", "mend"])
def test_seeded_methods_are_deterministic(case_file, method):
    """Same seed, same cases, a fresh copy of the same model: the same demonstrations or the same
    trained hypernetwork, hence the same predictions and scores."""
    first, again = (run_eval(case_file, method, False, build("llava-llama"), hparams=TINY_HPARAMS[method],
                             limit=1) for _ in range(2))
    assert scored_probes(first) == scored_probes(again)
    assert (first["exact"], first["token"]) == (again["exact"], again["token"])
    timeless = ("seconds", "training_seconds")
    assert ({k: v for k, v in first["setup"].items() if k not in timeless}
            == {k: v for k, v in again["setup"].items() if k not in timeless})


def test_cli_runs_on_a_model_directory(case_file, backbone, tmp_path):
    model_dir = tmp_path / "tiny"
    backbone.model.save_pretrained(model_dir)
    backbone.processor.save_pretrained(model_dir)
    (model_dir / "kb_backbone.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "family": "llava",
                "prompt_template": "<image>{question}\n",
                "answer_prefix": "",
            }
        )
    )
    args = [
        str(case_file),
        "--method",
        "ft",
        "--model",
        str(model_dir),
        "--limit",
        "1",
        "--json",
        str(tmp_path / "r.json"),
        "--hparam",
        "max_steps=2",
        "--hparam",
        "max_new_tokens=16",
    ]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["method", "mode", "flavour", "Acc", "T-Gen"]
    assert lines[2].startswith("ft") and "exact" in lines[2] and "token" in lines[3]
    assert "[1/1]" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_cases"] == 1 and report["hparams"]["max_steps"] == 2


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not trained yet")
def test_balancedit_on_the_demo_model(tmp_path):
    build_case_files(tmp_path, BuildConfig(seed=0, pool_size=60))
    cases = load_cases(tmp_path / "cases.jsonl")
    picked = [next(c for c in cases if c.scope == "class"), next(c for c in cases if c.scope == "instance")]
    write_cases(picked, tmp_path / "two.jsonl")
    report = run_eval(tmp_path / "two.jsonl", "balancedit", False, "demo", hparams={"pool_size": 60})
    assert report["exact"]["acc"] == 100.0
    check_scores(report, tmp_path / "two.jsonl")


def test_the_edited_layer_is_a_hyperparameter(case_file, backbone):
    layer = "model.language_model.layers.0.mlp.down_proj"
    for method in ("balancedit", "ft"):
        hparams = {**TINY_HPARAMS[method], "layer": layer}
        report = run_eval(case_file, method, False, backbone, hparams=hparams, limit=1)
        assert report["setup"]["layer"] == layer and report["hparams"]["layer"] == layer
