"""Sequential editing on a tiny LLaVA: overlap, supersede, retract, hard negatives, cosine."""

from __future__ import annotations

import pytest
from tiny_models import build, image

from editor import Editor, Fact
from editor.errors import EditorError
from editor.samples import ReferenceItem, TemplateParaphraser

Q = "what shape is in the image?"
RED, GREEN, BLUE = image((230, 20, 20)), image((20, 200, 20), "circle"), image((20, 20, 230))


@pytest.fixture
def backbone():
    return build("llava-llama")


def test_overlapping_facts_with_different_answers_split_and_both_still_work(backbone):
    with Editor(backbone, method="grace", initial_radius=100.0, max_steps=50, early_stop=True) as ed:
        first = ed.apply(Fact(RED, Q, "oblong box"))
        second = ed.apply(Fact(GREEN, Q, "ring"))
        assert second.split_with == (first.fact_id,)
        distance = ed.codebook.radii.tolist()
        assert distance[0] == distance[1] < 100.0
        assert ed.answer(RED, Q) == "oblong box"
        assert ed.answer(GREEN, Q) == "ring"


def test_same_answer_overlap_keeps_both_radii(backbone):
    with Editor(backbone, method="grace", initial_radius=100.0, max_steps=50, early_stop=True) as ed:
        ed.apply(Fact(RED, Q, "ring"))
        report = ed.apply(Fact(GREEN, Q, "Ring"))  # same answer once normalised
        assert report.split_with == ()
        assert ed.codebook.radii.tolist() == [100.0, 100.0]


def test_new_fact_on_the_same_input_supersedes(backbone):
    with Editor(backbone) as ed:
        old = ed.apply(Fact(RED, Q, "oblong box"))
        new = ed.apply(Fact(RED, "What shape is in the  image?", "ring"))  # same input, normalised
        assert new.superseded == (old.fact_id,)
        assert ed.codebook.fact_ids == [new.fact_id]
        assert ed.answer(RED, Q) == "ring"


def test_retract_gives_the_codebook_built_without_the_fact(backbone):
    facts = [Fact(RED, Q, "oblong box"), Fact(GREEN, Q, "ring"), Fact(BLUE, Q, "cube"),
             Fact(RED, "is it red?", "very red")]
    options = dict(method="grace", initial_radius=50.0, max_steps=40, early_stop=True)
    with Editor(backbone, **options) as ed:
        reports = [ed.apply(f) for f in facts]
        assert reports[1].split_with, "the test needs the retracted fact to have cut a neighbour"
        before = ed.codebook.radii.tolist()
        ed.retract(reports[1].fact_id)
        after_retract = ed.codebook.to_bytes()
        assert ed.codebook.radii.tolist() != [r for i, r in enumerate(before) if i != 1]
        assert ed.answer(GREEN, Q) != "ring"
        with pytest.raises(EditorError, match="no entry for fact"):
            ed.retract(reports[1].fact_id)
    with Editor(build("llava-llama"), **options) as ed:
        for index, fact in enumerate(facts):
            if index != 1:
                ed.apply(fact)
        assert ed.codebook.to_bytes() == after_retract


def test_hard_negatives_from_the_reference_pool_stay_outside(backbone):
    pool = [ReferenceItem(img, q) for img in (GREEN, BLUE, image((200, 200, 20)), image((0, 0, 0), "circle"))
            for q in (Q, "what colour is the shape?", "is there a circle?")]
    with Editor(backbone, reference_pool=pool, num_hard_negatives=4) as ed:
        report = ed.apply(Fact(RED, Q, "oblong box", rephrases=("What shape is in the image?",)))
        assert report.num_hard_negatives == 4
        mined = report.negative_distances[-4:]
        assert report.radius_fallback is None
        assert report.radius < min(mined)
        # Every pool input the unedited model answers differently and that lies at least as close as
        # the mined ones keeps its answer.
        unedited = ed.answers([(p.image, p.question) for p in pool], edited=False)
        edited = ed.answers([(p.image, p.question) for p in pool])
        original = report.original_answer
        for before, after in zip(unedited, edited, strict=True):
            if before.text != original:
                assert after.fact_id is None and after.text == before.text


@pytest.mark.parametrize("count", [1, 3, 100])
def test_hard_negatives_equal_checking_every_candidate_while_checking_fewer(backbone, count, monkeypatch):
    import torch

    from editor.fact import normalise_answer
    from editor.radius import pairwise_distances

    pool = [ReferenceItem(img, q) for img in (GREEN, BLUE, image((200, 200, 20)), image((0, 0, 0), "circle"))
            for q in (Q, "what colour is the shape?", "is there a circle?", "is the shape red?", "what is it?")]
    with Editor(backbone, reference_pool=pool, num_hard_negatives=count) as ed:
        query = backbone.query(RED, Q)
        original, tokens = ed._unedited_answer(query)
        key = ed.keys([query])[0]
        check = ed._keys_and_agreement
        after_first = ed._agreement_after_first_token
        checked: list[int] = []

        def counting(queries, prompts, rows, answer_tokens):
            checked.append(len(rows))
            return after_first(queries, prompts, rows, answer_tokens)

        monkeypatch.setattr(ed, "_agreement_after_first_token", counting)
        mined = ed._hard_negative_keys(key, query, original, tokens)
        # The reference: every candidate checked, then the `count` nearest that differ.
        candidates = ed._same_image_candidates(query)
        candidate_keys, agrees = check(candidates, tokens)
        index = ed._pool_index()
        keys = torch.cat([index.keys, candidate_keys])
        differs = [a != normalise_answer(original) for a in index.answers] + [not a for a in agrees]
        order = torch.argsort(pairwise_distances(key[None], keys, ed.config.distance)[0], stable=True).tolist()
        expected = keys[[i for i in order if differs[i]][:count]]
        first_agrees = sum(ed._unedited_answer(c)[1][0] == tokens[0] for c in candidates)
    assert len(candidates) == 4
    assert mined.shape == expected.shape and torch.allclose(mined, expected, atol=1e-5)
    # Beyond the first answer token only candidates that agree on it are checked.
    assert sum(checked) <= first_agrees
    if count == 100:  # more than there are: every candidate that agrees on the first token had to be checked
        assert sum(checked) == first_agrees and mined.shape[0] == sum(differs)


def test_cosine_distance_edits(backbone):
    with Editor(backbone, distance="cosine") as ed:
        report = ed.apply(Fact(RED, Q, "aqua marine", rephrases=("What shape is in the image?",)))
        assert 0 < report.radius < 2
        assert ed.answer(RED, Q) == "aqua marine"
        assert ed.answer(RED, "What shape is in the image?") == "aqua marine"


def test_paraphraser_supplies_positives_when_none_are_given(backbone):
    rephrases = TemplateParaphraser()(Q, 4)
    assert rephrases == ["what shape is in the picture?", "which shape is in the image?"]
    assert TemplateParaphraser()(Q, 1) == rephrases[:1]
    with Editor(backbone) as ed:
        report = ed.apply(Fact(RED, Q, "ring"))
        assert len(report.positive_distances) == 2


def test_editor_refuses_a_second_adapter_on_the_same_layer(backbone):
    with Editor(backbone):
        with pytest.raises(EditorError, match="already carries a codebook adapter"):
            Editor(backbone)


def test_stop_margin_must_not_be_negative():
    from editor.config import EditConfig
    from editor.errors import ConfigError

    with pytest.raises(ConfigError, match="stop_margin must be 0 or more, got -0.5"):
        EditConfig(stop_margin=-0.5)
