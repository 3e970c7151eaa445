"""Metrics against the number of edits, as a PNG (matplotlib with the Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editor.eval.errors import EvalError

SERIES = (("acc", "Acc"), ("t_gen", "T-Gen"), ("i_gen", "I-Gen"), ("loc", "Loc"), ("hm", "HM"))


def plot_curve(report: dict[str, Any], path: str | Path) -> Path:
    """Two panels (exact match, token level) of the report's curve; returns the written path.

    Sequential mode: metrics over the cases applied so far, after every `curve_every` edits.
    Independent mode: the running mean over the cases evaluated so far.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EvalError("--plot needs matplotlib: pip install matplotlib") from exc
    curve = report.get("curve") or []
    if not curve:
        raise EvalError("the report has no curve to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    edits = [point["edits"] for point in curve]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, flavour, title in zip(
        axes, ("exact", "token"), ("exact match of the greedy answer", "token level"), strict=True
    ):
        for key, label in SERIES:
            values = [point[flavour].get(key) for point in curve]
            if any(v is not None for v in values):
                axis.plot(edits, [float("nan") if v is None else v for v in values], marker="o", label=label)
        axis.set_title(title)
        axis.set_xlabel("edits applied" if report.get("mode") == "sequential" else "cases evaluated")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("percent")
    axes[1].legend(loc="lower left")
    figure.suptitle(
        f"{report.get('method')} ({report.get('mode')}) on {Path(str(report.get('cases_file'))).name}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
