"""Plain-text tables of evaluation reports (for the CLI and the bench scripts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (("acc", "Acc"), ("t_gen", "T-Gen"), ("i_gen", "I-Gen"), ("loc", "Loc"), ("hm", "HM"))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(reports: Sequence[dict[str, Any]]) -> str:
    """One row per report and flavour: method, mode, flavour, the five metrics, seconds per edit."""
    header = ["method", "mode", "flavour", *(label for _, label in COLUMNS), "s/edit", "setup s"]
    rows = [header]
    for report in reports:
        setup = report.get("setup", {})
        setup_seconds = setup.get("training_seconds", setup.get("seconds"))
        for flavour in ("exact", "token"):
            rows.append(
                [
                    report["method"],
                    report["mode"],
                    flavour,
                    *(_cell(report[flavour].get(key)) for key, _ in COLUMNS),
                    f"{report['seconds_per_edit']:.2f}",
                    "-" if setup_seconds is None else f"{setup_seconds:.1f}",
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
