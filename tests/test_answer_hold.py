"""A fired entry gives its whole answer or none of it (issue 21, point 4), and an edit names the
facts it collides with and can supersede one (issue 21, point 3)."""

from __future__ import annotations

import pytest
import torch

import editor
from editor.codebook import Codebook, Entry
from editor.commit import HoldFiredAnswers
from editor.errors import EditorError
from kb_daemon.demo import QUESTION, REPHRASE, easy_vqa_examples

EOS = 9


class _Adapter:
    """Just what `HoldFiredAnswers` reads: a codebook whose entry 0 answers tokens [4, 5, EOS]."""

    def __init__(self) -> None:
        class _Book:
            @staticmethod
            def answer_ids_of(index: int) -> torch.Tensor | None:
                return torch.tensor([4, 5, EOS]) if index == 0 else None

        self.codebook = _Book()


def _step(hold: HoldFiredAnswers, prompt: torch.Tensor, chosen: list[list[int]]) -> torch.Tensor:
    ids = torch.cat([prompt, torch.tensor(chosen, dtype=torch.long)], dim=1) if chosen[0] else prompt
    return hold(ids, torch.zeros(prompt.shape[0], 12))


def test_a_row_whose_entry_won_its_first_token_is_held_to_the_rest_of_the_answer():
    prompt = torch.ones(3, 5, dtype=torch.long)
    fired = torch.tensor([0, 0, -1])  # rows 0 and 1 fired entry 0; row 2 fired nothing
    hold = HoldFiredAnswers(_Adapter(), fired, prompt_width=5, eos_token_id=EOS)
    first = _step(hold, prompt, [[], [], []])
    assert torch.equal(first, torch.zeros(3, 12))  # the first answer token is the model's own
    # Row 0 produced the entry's first token (4), row 1 another one (7), row 2 anything.
    second = _step(hold, prompt, [[4], [7], [3]])
    assert second[0].argmax() == 5 and torch.isinf(second[0]).sum() == 11
    assert second[1].argmax() == EOS and torch.isinf(second[1]).sum() == 11  # lost: ends at once
    assert torch.equal(second[2], torch.zeros(12))
    assert hold.lost == {1}
    third = _step(hold, prompt, [[4, 5], [7, EOS], [3, 3]])
    assert third[0].argmax() == EOS
    assert torch.equal(third[2], torch.zeros(12))


@pytest.fixture(scope="module")
def demo():
    return editor.load_backbone("demo")


@pytest.fixture(scope="module")
def shapes():
    return easy_vqa_examples()


def _widened(book: Codebook, radius: float) -> Codebook:
    """The same entries with every radius set to `radius` (so they fire far beyond their facts)."""
    return Codebook.with_radii(book.spec, book.hparams, book.entries, [radius] * len(book))


def _inputs(shapes):
    return [(image, question) for name in sorted(shapes) for image in shapes[name][:6]
            for question in (QUESTION, "what color is the shape?")]


def test_an_entry_that_wins_its_first_token_gives_its_whole_answer(demo, shapes):
    inputs = _inputs(shapes)
    with editor.Editor(demo) as ed:
        ed.apply(editor.Fact(shapes["rectangle"][0], QUESTION, "block", rephrases=[REPHRASE]))
        ed.load_codebook(_widened(ed.codebook, 2.0))  # cosine distance: fires on every input
        edited = ed.answers(inputs)
    assert all(a.text == "block" and a.fact_id is not None for a in edited)


def test_an_entry_that_loses_its_first_token_gives_the_unedited_answer_not_a_splice(demo, shapes, monkeypatch):
    """An entry whose first value predicts another answer's first token ("d" of "disc") and whose
    later values were trained for "block": without the hold its later steps splice into the
    answer; with it every input gets the unedited answer and no fired fact."""
    inputs = _inputs(shapes)
    with editor.Editor(demo) as ed:
        ed.apply(editor.Fact(shapes["rectangle"][0], QUESTION, "block", rephrases=[REPHRASE], fact_id="block"))
        ed.apply(editor.Fact(shapes["circle"][0], QUESTION, "disc", rephrases=[REPHRASE], fact_id="disc"))
        block, disc = ed.codebook.entry(0), ed.codebook.entry(1)
        mixed = Entry("mixed", block.answer, block.input_id, block.key,
                      torch.cat([disc.values[:1], block.values[1:]]), 2.0, block.answer_ids)
        ed.load_codebook(Codebook(ed.codebook.spec, ed.codebook.hparams, [mixed]))
        unedited = [a.text for a in ed.answers(inputs, edited=False)]
        held = ed.answers(inputs)
        assert [a.text for a in held] == unedited
        assert all(a.fact_id is None and a.distance is None for a in held)
        monkeypatch.setattr(HoldFiredAnswers, "__call__", lambda self, ids, scores: scores)
        loose = [a.text for a in ed.answers(inputs)]
    spliced = [text for text, before in zip(loose, unedited, strict=True) if text not in ("block", before)]
    assert spliced  # what the hold prevents (e.g. "dlock")


def test_the_edit_report_names_a_conflicting_fact_and_supersedes_replaces_it(demo, shapes):
    rectangle, other = shapes["rectangle"][0], shapes["rectangle"][1]
    with editor.Editor(demo) as ed:
        first = ed.apply(editor.Fact(rectangle, QUESTION, "block", rephrases=[REPHRASE], fact_id="old"))
        assert first.conflicts == ()
        ed.load_codebook(_widened(ed.codebook, 2.0))  # its ball now holds every input
        second = ed.apply(editor.Fact(other, QUESTION, "slab", rephrases=[REPHRASE], fact_id="new"))
        kinds = {c.fact_id: c for c in second.conflicts}
        assert set(kinds) == {"old"}
        conflict = kinds["old"]
        assert conflict.kind == "fires_on_new_input" and conflict.answer == "block"
        assert conflict.radius_before == pytest.approx(2.0) and conflict.radius_after < 2.0
        assert conflict.now_answers == "block"  # its own input keeps its answer
        assert second.to_dict()["conflicts"][0]["fact_id"] == "old"

        with pytest.raises(EditorError, match="cannot supersede gone"):
            ed.apply(editor.Fact(other, QUESTION, "slab"), supersedes=["gone"])
        third = ed.apply(editor.Fact(rectangle, "what is the shape?", "brick", fact_id="newer"),
                         supersedes=["old"])
        assert "old" in third.superseded and "old" not in ed.codebook.fact_ids
        assert all(c.fact_id != "old" for c in third.conflicts)
        assert ed.answer(rectangle, "what is the shape?") == "brick"
