"""One edit on the shipped demo model (a real LLaVA trained on easy-VQA): the quick start's promise."""

from __future__ import annotations

import pytest

import editor
from kb_daemon.demo import QUESTION, REPHRASE, easy_vqa_examples


@pytest.fixture(scope="module")
def demo():
    return editor.load_backbone("demo")


def test_edit_carries_to_rephrasings_and_leaves_unrelated_inputs_alone(demo):
    shapes = easy_vqa_examples()
    rectangle = shapes["rectangle"][0]
    unrelated = [(shapes["circle"][0], QUESTION), (shapes["triangle"][0], QUESTION),
                 (rectangle, "what color is the shape?")]
    with editor.Editor(demo) as ed:
        before = ed.answers(unrelated, edited=False)
        assert ed.answer(rectangle, QUESTION) == "rectangle"
        report = ed.apply(editor.Fact(rectangle, QUESTION, "oblong box", rephrases=[REPHRASE]))
        assert report.converged and report.steps < ed.config.max_steps
        assert ed.answer(rectangle, QUESTION) == "oblong box"
        assert ed.answer(rectangle, REPHRASE) == "oblong box"
        # A rephrasing the editor never saw, from the default paraphraser's vocabulary.
        assert ed.answer(rectangle, "what shape is in the picture?") == "oblong box"
        after = ed.answers(unrelated)
        assert [a.text for a in after] == [b.text for b in before]
        assert all(a.fact_id is None for a in after)


def test_kbctl_demo_runs_in_process(capsys):
    from kb_daemon.demo import run_demo

    result = run_demo(print, "aqua marine")
    assert result["after"][0] == "aqua marine"
    assert result["before"][3] == result["after"][3]  # the circle keeps its answer
    assert "edit fired" in capsys.readouterr().out
