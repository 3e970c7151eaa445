"""Acc, T-Gen, I-Gen, Loc and HM, in two flavours.

Exact flavour (what a user sees): the greedy answer, compared after `normalise_answer`
(NFC, case-folded, single-spaced).
  * Acc / T-Gen / I-Gen probe: 1 if the edited model's greedy answer equals the target, else 0.
  * Loc probe: 1 if the edited model's greedy answer equals the unedited model's, else 0.

Token flavour (the paper's reference harness):
  * Acc / T-Gen / I-Gen probe: teacher-forced token accuracy. The target's tokens y_1..y_L are the
    answer's tokens followed by end-of-sequence (what the editor trains and what stops greedy
    generation); the input is prompt + y_1..y_{L-1}; the score is (1/L) sum_j [argmax_j == y_j],
    argmax_j taken over the logits at the position that predicts y_j.
  * Loc probe: top-10 rank agreement. Both the unedited and the edited model are teacher-forced on
    the unedited model's own greedy answer (+ end-of-sequence), L tokens; at each answer position
    j, R_j is the list of the 10 highest-scoring token ids in rank order. The score is
    (1/(10 L)) sum_j sum_r [R_j^edited[r] == R_j^unedited[r]], i.e. rank-wise agreement, as in the
    reference harness (EasyEdit compares `topk(10).indices` elementwise).

Aggregation: a case's score for a kind is the mean over its probes of that kind; a metric is the
mean over cases that have such probes, in percent. HM is the harmonic mean of T-Gen, I-Gen and
Loc (Acc is not included), 0 when any of them is 0, None when any is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from editor.fact import normalise_answer

METRICS = ("acc", "t_gen", "i_gen", "loc")
KIND_TO_METRIC = {"reliability": "acc", "t_gen": "t_gen", "i_gen": "i_gen", "loc": "loc"}
FLAVOURS = ("exact", "token")
TOP_K = 10


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean; None if any value is None, 0 if any is 0 (or below)."""
    if not values or any(v is None for v in values):
        return None
    numbers = [float(v) for v in values if v is not None]
    if any(v <= 0 for v in numbers):
        return 0.0
    return len(numbers) / sum(1.0 / v for v in numbers)


def same_answer(prediction: str, target: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(target)


def token_accuracy(predicted: Any, target: Any) -> float:
    """Share of positions where the argmax token equals the target. Both (L,) integer tensors."""
    if tuple(predicted.shape) != tuple(target.shape):
        raise ValueError(f"shapes differ: {tuple(predicted.shape)} vs {tuple(target.shape)}")
    return float((predicted == target).float().mean())


def rank_agreement(edited: Any, unedited: Any) -> float:
    """Rank-wise agreement of top-k token ids. Both (L, k) integer tensors, rank order per row."""
    if tuple(edited.shape) != tuple(unedited.shape):
        raise ValueError(f"shapes differ: {tuple(edited.shape)} vs {tuple(unedited.shape)}")
    return float((edited == unedited).float().mean())


def mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def aggregate(
    case_scores: Sequence[Mapping[str, Mapping[str, float | None]]],
) -> dict[str, dict[str, float | None]]:
    """Percent metrics per flavour from per-case fractions.

    case_scores: one mapping per case, {flavour: {metric: fraction in [0, 1] or None}}.
    Returns {flavour: {"acc", "t_gen", "i_gen", "loc", "hm"}} in percent (None where no case had
    probes of that kind).
    """
    result: dict[str, dict[str, float | None]] = {}
    for flavour in FLAVOURS:
        row: dict[str, float | None] = {}
        for metric in METRICS:
            value = mean(s[flavour][metric] for s in case_scores if s[flavour][metric] is not None)  # type: ignore[misc]
            row[metric] = None if value is None else 100.0 * value
        row["hm"] = harmonic_mean([row["t_gen"], row["i_gen"], row["loc"]])
        result[flavour] = row
    return result
