"""Metric arithmetic of the evaluation harness (no model)."""

from __future__ import annotations

import pytest
import torch

from editor.eval.metrics import aggregate, harmonic_mean, rank_agreement, same_answer, token_accuracy


def test_harmonic_mean_matches_the_paper():
    assert round(harmonic_mean([99.90, 98.91, 71.74]), 2) == 88.08


def test_harmonic_mean_edges():
    assert harmonic_mean([50.0, 0.0, 100.0]) == 0.0
    assert harmonic_mean([50.0, None, 100.0]) is None
    assert harmonic_mean([40.0, 40.0, 40.0]) == pytest.approx(40.0)


def test_exact_match_normalises_case_and_spaces():
    assert same_answer("  Oval   Disc ", "oval disc")
    assert not same_answer("oval", "oval disc")


def test_token_accuracy_counts_positions():
    assert token_accuracy(torch.tensor([5, 6, 2]), torch.tensor([5, 7, 2])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        token_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


def test_rank_agreement_is_rankwise():
    base = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert rank_agreement(base.clone(), base) == 1.0
    swapped = torch.tensor([[2, 1, 3, 4], [5, 6, 7, 8]])  # same set, two ranks swapped
    assert rank_agreement(swapped, base) == pytest.approx(6 / 8)


def test_aggregate_means_over_cases_then_harmonic_mean():
    cases = [
        {
            "exact": {"acc": 1.0, "t_gen": 1.0, "i_gen": 0.5, "loc": 1.0},
            "token": {"acc": 1.0, "t_gen": 0.9, "i_gen": 0.8, "loc": 0.7},
        },
        {
            "exact": {"acc": 1.0, "t_gen": 0.0, "i_gen": 1.0, "loc": None},
            "token": {"acc": 0.5, "t_gen": 0.7, "i_gen": 0.6, "loc": None},
        },
    ]
    result = aggregate(cases)
    assert result["exact"]["acc"] == 100.0
    assert result["exact"]["t_gen"] == 50.0
    assert result["exact"]["i_gen"] == 75.0
    assert result["exact"]["loc"] == 100.0  # only the case with loc probes counts
    assert result["exact"]["hm"] == pytest.approx(harmonic_mean([50.0, 75.0, 100.0]))
    assert result["token"]["acc"] == pytest.approx(75.0)
    assert set(result["token"]) == {"acc", "t_gen", "i_gen", "loc", "hm"}
