"""A job result keeps a bounded number of each fact's conflicts (workers.runner.bounded_report):
a 10,000-fact batch on the demo model named 300 per fact, 808 MB of conflicts in one job row."""

from __future__ import annotations

from kb_daemon.service import JobOutcome, report_warnings
from workers.runner import REPORT_CONFLICTS, bounded_report


def conflict(i: int, kind: str = "overlaps", *, cut: bool = False, answers_other: bool = False) -> dict:
    return {"fact_id": f"f-{i}", "answer": f"a{i}", "kind": kind, "radius_before": 0.5,
            "radius_after": 0.25 if cut else 0.5, "now_answers": "other" if answers_other else f"a{i}"}


def report(conflicts: list[dict], split: list[str]) -> dict:
    return {"fact_id": "f-new", "answer": "new", "radius": 0.1, "steps": 3, "converged": True,
            "positive_distances": [], "negative_distances": [], "conflicts": conflicts, "split_with": split}


def test_the_conflicts_that_matter_are_kept_first_and_the_totals_say_how_many_there_were() -> None:
    plain = [conflict(i) for i in range(300)]
    cut = [conflict(1000 + i, cut=True) for i in range(5)]
    moved = [conflict(2000 + i, answers_other=True) for i in range(5)]
    fired = conflict(3000, "fires_on_new_input")
    details = bounded_report(report([*plain[:150], *cut, *plain[150:], *moved, fired],
                                    [f"f-{i}" for i in range(311)]))
    kept = [c["fact_id"] for c in details["conflicts"]]
    assert len(kept) == REPORT_CONFLICTS and details["conflicts_total"] == 311
    assert kept[:11] == ["f-3000", *(f"f-{2000 + i}" for i in range(5)), *(f"f-{1000 + i}" for i in range(5))]
    assert kept[11:] == [f"f-{i}" for i in range(REPORT_CONFLICTS - 11)]  # the rest in report order
    assert details["split_with"] == [f"f-{i}" for i in range(REPORT_CONFLICTS)]
    assert details["split_with_total"] == 311

    warnings = report_warnings(details)
    assert warnings[-1].startswith(f"{311 - REPORT_CONFLICTS} more conflicts not listed")
    assert sum(w.startswith("conflicts with ") for w in warnings) == REPORT_CONFLICTS
    outcome = JobOutcome.of("done", {"version": 3, "reports": [details]})
    assert outcome.conflicts[0]["total"] == 311 and len(outcome.conflicts[0]["conflicts"]) == REPORT_CONFLICTS


def test_a_report_within_the_bound_is_kept_whole() -> None:
    conflicts = [conflict(i) for i in range(REPORT_CONFLICTS)]
    details = bounded_report(report(list(conflicts), ["f-1"]))
    assert details["conflicts"] == conflicts and details["split_with"] == ["f-1"]
    assert "conflicts_total" not in details and "split_with_total" not in details
    assert not any("more conflicts" in w for w in report_warnings(details))
