"""Hard negatives decided on the first answer token are the ones a plain check chooses.

The editor decides most hard-negative candidates on their first greedy answer token (one
prompt-only pass) and teacher-forces only the ones that agree on it and could be chosen. Here, on
the demo model with an easy-VQA reference pool, the reference generates every pool input's and
every candidate's unedited answer in full and compares them: the chosen keys, and an edit's
negative distances and radius, must be the same numbers.
"""

from __future__ import annotations

import pytest
import torch
from easy_vqa import get_train_image_paths, get_train_questions
from tiny_models import FAMILIES, build, image, needs_image

import editor
from editor.backbones import Query
from editor.fact import normalise_answer
from editor.radius import choose_radius, pairwise_distances
from editor.samples import ReferenceItem
from kb_daemon.runtime import load_reference_pool

SHAPE = "what shape is in the image?"
# The demo model answers "red" here, and "rectangle" to the pool's shape questions about the same
# image: candidates that agree on the first tokens ("r", "e") and differ after them.
COLOUR = "what color is the rectangle?"


@pytest.fixture(scope="module")
def demo():
    return editor.load_backbone("demo")


@pytest.fixture(scope="module")
def pool():
    return load_reference_pool("easy-vqa:40")


def red_rectangle_and_circle():
    questions, answers, image_ids = get_train_questions()
    facts: dict[int, dict[str, str]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        facts.setdefault(image_id, {})[question] = answer
    paths = get_train_image_paths()
    red = next(i for i in sorted(facts) if facts[i].get(COLOUR) == "red")
    circle = next(i for i in sorted(facts) if facts[i].get(SHAPE) == "circle")
    return paths[red], paths[circle]


RED_RECTANGLE, CIRCLE = red_rectangle_and_circle()
CASES = [(RED_RECTANGLE, COLOUR), (RED_RECTANGLE, SHAPE), (CIRCLE, SHAPE)]


def generated_tokens(ed: editor.Editor, query: Query) -> list[int]:
    """The unedited model's greedy generation for one input, alone in its batch (with the end of
    sequence when it ended by itself)."""
    batch = ed.backbone.encode([query])
    with torch.no_grad(), ed.adapter.scope(batch.key_positions, mode="off"):
        tokens = ed.backbone.generate_ids(batch, ed.config.max_new_tokens)[0]
    return tokens + ([ed.backbone.eos_token_id] if len(tokens) < ed.config.max_new_tokens else [])


def reference_hard_negatives(ed: editor.Editor, query: Query,
                             key: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """Every pool input and every candidate answered by generation, then the nearest to `key`
    (Din,) that differ.
    -> (keys (H, Din), counts of candidates by how they compare with the fact's answer)"""
    original = generated_tokens(ed, query)
    original_text = normalise_answer(ed.backbone.decode(original[: ed.config.max_new_tokens]))
    pool_queries = [Query(item.image, item.question) for item in ed.reference_pool]
    pool_answers = [normalise_answer(a.text) for a in ed.answers(
        [(q.image, q.question) for q in pool_queries], edited=False)]
    candidates = ed._same_image_candidates(query)
    candidate_tokens = [generated_tokens(ed, c) for c in candidates]
    keys = torch.cat([ed.keys(pool_queries), ed.keys(candidates)])  # (P + S, Din)
    differs = [a != original_text for a in pool_answers] + [t != original for t in candidate_tokens]
    order = torch.argsort(pairwise_distances(key[None], keys, ed.config.distance)[0], stable=True).tolist()
    chosen = [i for i in order if differs[i]][: ed.config.num_hard_negatives]
    counts = {
        "first_differs": sum(t[0] != original[0] for t in candidate_tokens),
        "agree": sum(t == original for t in candidate_tokens),
        "differ_later": sum(t[0] == original[0] and t != original for t in candidate_tokens),
    }
    return keys[chosen], counts


@pytest.mark.parametrize("count", [2, 8, 100])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_chosen_hard_negatives_equal_generating_every_answer(demo, pool, case, count):
    image, question = CASES[case]
    with editor.Editor(demo, reference_pool=pool, num_hard_negatives=count) as ed:
        query = demo.query(image, question)
        original, tokens = ed._unedited_answer(query)
        key = ed.keys([query])[0]
        mined = ed._hard_negative_keys(key, query, original, tokens)
        expected, counts = reference_hard_negatives(ed, query, key)
    assert torch.equal(mined, expected)
    if case == 0:  # the case that needs the check after the first token
        assert counts["differ_later"] >= 1 and counts["first_differs"] >= 1
    if case == 1:
        assert counts["agree"] >= 1


@pytest.mark.parametrize("case", range(len(CASES)))
def test_edit_reports_the_reference_negative_distances_and_radius(demo, pool, case):
    image, question = CASES[case]
    fact = editor.Fact(image, question, "oblong box")
    with editor.Editor(demo, reference_pool=pool) as ed:
        report = ed.apply(fact)
        query = demo.query(image, question)
        key = ed.codebook.keys[ed.codebook.index_of(report.fact_id)]  # the capture pass's key
        hard, _ = reference_hard_negatives(ed, query, key)
        given = ed.keys(ed._negative_queries(fact, query))
        expected = pairwise_distances(key[None], torch.cat([given, hard]), ed.config.distance)[0]
        radius = choose_radius(torch.tensor(report.positive_distances), expected, ed.config.alpha,
                               ed.config.initial_radius).radius
        generated = ed.answers([(image, question)], edited=False)[0].text
    assert report.num_hard_negatives == hard.shape[0] > 0
    assert report.negative_distances == tuple(expected.tolist())
    assert report.radius == float(torch.tensor(radius, dtype=torch.float32))  # the codebook keeps float32
    assert report.original_answer == generated


def test_a_check_that_stops_at_the_first_token_would_choose_otherwise(demo, pool, monkeypatch):
    """The comparison above can fail: treating every candidate that agrees on the first token as
    agreeing (no check after it) changes the choice in the red-rectangle case."""
    image, question = CASES[0]
    with editor.Editor(demo, reference_pool=pool, num_hard_negatives=8) as ed:
        monkeypatch.setattr(ed, "_agreement_after_first_token",
                            lambda queries, prompts, rows, tokens: {row: True for row in rows})
        query = demo.query(image, question)
        original, tokens = ed._unedited_answer(query)
        key = ed.keys([query])[0]
        mined = ed._hard_negative_keys(key, query, original, tokens)
        expected, _ = reference_hard_negatives(ed, query, key)
    assert mined.shape != expected.shape or not torch.equal(mined, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_chooses_what_generating_every_answer_chooses(family):
    """The cached continuation on every family (BLIP-2, whose forward takes no cache, checks the
    rows that agree on the first token from their prompts)."""
    backbone = build(family)
    red = image((230, 20, 20)) if needs_image(family) else None
    others = [image((20, 200, 20), "circle"), image((20, 20, 230))] if needs_image(family) else [None]
    questions = ("what shape is in the image?", "what colour is the shape?", "is there a circle?",
                 "what is it?", "what shape is it?")
    pool = [ReferenceItem(img, q) for img in others for q in questions]
    for count in (2, 100):
        with editor.Editor(backbone, reference_pool=pool, num_hard_negatives=count, max_new_tokens=12,
                           max_answer_tokens=12) as ed:
            query = backbone.query(red, questions[0])
            original, tokens = ed._unedited_answer(query)
            key = ed.keys([query])[0]
            mined = ed._hard_negative_keys(key, query, original, tokens)
            expected, _ = reference_hard_negatives(ed, query, key)
        assert torch.equal(mined, expected), (family, count)
