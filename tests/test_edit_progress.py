"""Progress inside one edit: `Editor.apply(fact, progress)` follows the value optimisation."""

from __future__ import annotations

import pytest
from tiny_models import build, image, needs_image

from editor import Editor, Fact
from editor.training import PROGRESS_EVERY_STEPS

FAMILIES = ("llava-llama", "gpt2")


def _apply(family: str, progress=None, **hparams) -> tuple[bytes, int]:
    picture = image((200, 10, 10)) if needs_image(family) else None
    with Editor(build(family), value_init="cold", seed=7, **hparams) as ed:
        report = ed.apply(Fact(picture, "what shape is it?", "an oblong box"), progress)
        return ed.codebook.to_bytes(), report.steps


@pytest.mark.parametrize("family", FAMILIES)
def test_progress_is_called_monotonic_and_ends_at_the_last_step(family):
    calls: list[tuple[int, int]] = []
    # No early stop: a random tiny model runs every step, so the calls between are all seen.
    blob, steps = _apply(family, lambda done, total: calls.append((done, total)), max_steps=35,
                         early_stop=False)
    assert steps == 35
    assert calls == [(0, 35), (10, 35), (20, 35), (30, 35), (35, 35)]
    assert PROGRESS_EVERY_STEPS == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_progress_does_not_change_the_codebook(family):
    calls: list[tuple[int, int]] = []
    with_progress, steps_with = _apply(family, lambda done, total: calls.append((done, total)), max_steps=25)
    without, steps_without = _apply(family, max_steps=25)
    assert with_progress == without and steps_with == steps_without
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] == 0 and calls[-1] == (25, 25)
    assert {t for _, t in calls} == {25}


def test_an_early_stop_still_ends_the_progress():
    calls: list[tuple[int, int]] = []
    # With a small stop margin the tiny model's answer leads its runner-up within a few steps.
    _, steps = _apply("gpt2", lambda done, total: calls.append((done, total)), max_steps=200, stop_margin=0.3)
    assert steps < 200
    assert calls[0] == (0, 200) and calls[-1] == (200, 200)
    assert all(d % PROGRESS_EVERY_STEPS == 0 and d <= steps for d, _ in calls[1:-1])
