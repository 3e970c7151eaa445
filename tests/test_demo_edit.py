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


def _answer_margins(ed: editor.Editor, img, question: str, answer: str):
    """Teacher-forced lead of each answer token's logit (incl. end of sequence) over the runner-up,
    edits on, through the whole model (not the optimiser's cached suffix)."""
    import torch

    from editor.training import target_margins

    batch = ed.backbone.encode([ed.backbone.query(img, question)], [answer])
    with torch.no_grad(), ed.adapter.scope(batch.key_positions, mode="lookup"):
        logits = ed.backbone.model(**ed.backbone.model_inputs(batch), use_cache=False).logits.float().cpu()
    steps = batch.key_positions.unsqueeze(1) + torch.arange(batch.targets.shape[1])  # (1, L)
    answer_logits = logits.gather(1, steps.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (1, L, V)
    return target_margins(answer_logits, batch.targets)[0]  # (L,)


def test_stop_margin_trains_until_every_answer_token_leads_by_that_margin(demo):
    # A tiny random model's logits are nearly flat, so the margin needs the trained demo model.
    rectangle = easy_vqa_examples()["rectangle"][0]
    fact = editor.Fact(rectangle, QUESTION, "oblong box")
    with editor.Editor(demo, stop_margin=0.0) as ed:
        plain = ed.apply(fact)
        plain_margin = _answer_margins(ed, rectangle, QUESTION, "oblong box")
    with editor.Editor(demo, stop_margin=1.0) as ed:
        sure = ed.apply(fact)
        sure_margin = _answer_margins(ed, rectangle, QUESTION, "oblong box")
        assert ed.answer(rectangle, QUESTION) == "oblong box"
    assert plain.converged and sure.converged and sure.steps < ed.config.max_steps
    assert float(plain_margin.min()) < 1.0, "the plain stop should end below the margin (else this proves nothing)"
    assert sure.steps > plain.steps
    assert float(sure_margin.min()) > 1.0 - 1e-4
