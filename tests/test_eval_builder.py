"""The easy-VQA case builder: output shape, held-out phrasings, scopes, determinism, TRAIN only."""

from __future__ import annotations

import json
from pathlib import Path

import easy_vqa
import pytest

from editor.eval.cases import load_cases, load_reference_pool
from editor.eval.easyvqa import (
    COLOUR_HELD_OUT,
    SHAPE_HELD_OUT,
    BuildConfig,
    build_case_files,
    development_cases,
    file_digest,
    load_train_images,
)
from editor.fact import normalise_answer

CONFIG = BuildConfig(
    seed=3, class_shapes=1, class_colours=2, instance_shapes=3, instance_colours=3, variants=2, pool_size=50
)


@pytest.fixture(scope="module")
def images():
    return load_train_images()


@pytest.fixture(scope="module")
def built(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("dev")
    summary = build_case_files(out, CONFIG, images=images)
    return out, summary, load_cases(out / "cases.jsonl")


@pytest.fixture(scope="module")
def labels(images):
    return {im.path.name: im for im in images}


def test_output_files_and_counts(built):
    out, summary, cases = built
    assert (out / "cases.jsonl").is_file() and (out / "reference_pool.jsonl").is_file()
    assert json.loads((out / "build.json").read_text())["cases"] == len(cases) == 2 * (1 + 2 + 3 + 3)
    assert {c.scope for c in cases} == {"class", "instance"}
    assert summary["class_cases"] == 2 * 3 and summary["instance_cases"] == 2 * 6
    for line in (out / "cases.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["fact"]["image"].startswith("img/")
        assert set(record) >= {"id", "scope", "fact", "reliability", "t_gen", "i_gen", "loc"}
    for case in cases:
        assert case.image_paths() <= set((out / "img").iterdir())
        assert (
            len(case.t_gen) == 2 and len(case.i_gen) == CONFIG.num_i_gen and len(case.loc) == CONFIG.num_loc
        )
        assert len(case.fact.negatives) == CONFIG.num_negatives and case.fact.rephrases
        assert [(p.question, p.answer) for p in case.reliability] == [(case.fact.question, case.fact.answer)]
        assert {p.answer for p in case.t_gen + case.i_gen} == {case.fact.answer}


def test_t_gen_phrasings_are_held_out_of_rephrases(built, labels):
    _, _, cases = built
    for case in cases:
        edited = labels[case.fact.image.name]
        held_out = SHAPE_HELD_OUT if case.meta["attribute"] == "shape" else COLOUR_HELD_OUT
        expected = {t.format(shape=edited.shape, colour=edited.colour) for t in held_out}
        t_gen = {p.question for p in case.t_gen}
        assert t_gen == expected
        shown = {normalise_answer(q) for q in case.fact.rephrases} | {normalise_answer(case.fact.question)}
        assert not shown & {normalise_answer(q) for q in t_gen}
        assert all(p.image == case.fact.image for p in case.t_gen)


def test_scopes_probes_and_negatives(built, labels):
    _, _, cases = built
    scopes = [
        (c.meta["attribute"], c.meta["scope_shape"], c.meta["scope_colour"], c.fact.answer) for c in cases
    ]

    def inside(attribute, image, shape, colour):
        return (shape is None or image.shape == shape) and (colour is None or image.colour == colour)

    for case in cases:
        attribute, shape, colour = case.meta["attribute"], case.meta["scope_shape"], case.meta["scope_colour"]
        assert inside(attribute, labels[case.fact.image.name], shape, colour)
        for probe in case.i_gen:
            assert probe.image != case.fact.image and inside(
                attribute, labels[probe.image.name], shape, colour
            )
        for negative in case.fact.negatives:
            image = labels[negative.image.name]
            assert not inside(attribute, image, shape, colour)
            if case.scope == "instance" and attribute == "shape":  # other-coloured shapes of the same kind
                assert image.shape == shape and image.colour != colour
        negative_images = {n.image for n in case.fact.negatives}
        probe_images = {p.image for p in case.i_gen + case.loc if p.image != case.fact.image}
        assert not negative_images & probe_images
        # Every loc probe is outside every scope of its question type in the whole file.
        for probe in case.loc:
            image = labels[probe.image.name]
            kind = (
                "shape"
                if probe.question == "what shape is in the image?"
                else ("colour" if probe.question == "what color is the shape?" else None)
            )
            for other_attribute, other_shape, other_colour, _ in scopes:
                if kind == other_attribute:
                    assert not inside(kind, image, other_shape, other_colour), (case.case_id, probe)
        assert any(p.image == case.fact.image for p in case.loc), "other questions about the edited image"


def test_reference_pool_avoids_case_images(built):
    out, _, cases = built
    pool = load_reference_pool(out / "reference_pool.jsonl")
    assert 0 < len(pool) <= CONFIG.pool_size
    used = set().union(*(c.image_paths() for c in cases))
    assert not {p.image for p in pool} & used


def test_deterministic_from_the_seed(tmp_path, images, built):
    out, _, _ = built
    build_case_files(tmp_path / "again", CONFIG, images=images)
    assert (tmp_path / "again" / "cases.jsonl").read_text() == (out / "cases.jsonl").read_text()
    build_case_files(tmp_path / "other", BuildConfig(**{**CONFIG.__dict__, "seed": 4}), images=images)
    assert (tmp_path / "other" / "cases.jsonl").read_text() != (out / "cases.jsonl").read_text()


def test_only_the_train_split_is_read(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the TEST split must not be read")

    monkeypatch.setattr(easy_vqa, "get_test_questions", refuse)
    monkeypatch.setattr(easy_vqa, "get_test_image_paths", refuse)
    build_case_files(tmp_path, BuildConfig(pool_size=10))
    train_digests = {file_digest(Path(p)) for p in easy_vqa.get_train_image_paths().values()}
    for path in (tmp_path / "img").iterdir():
        assert file_digest(path) in train_digests, path


def test_development_cases_avoid_the_evaluation_images(built, images):
    _, _, cases = built
    digests = {file_digest(p) for c in cases for p in c.image_paths()}
    development = development_cases(40, seed=0, exclude_digests=digests, images=images)
    assert len(development) == 40
    assert not {file_digest(p) for c in development for p in c.image_paths()} & digests
    assert not {c.fact.answer for c in development} & {c.fact.answer for c in cases}
