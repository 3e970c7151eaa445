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
    plt = _pyplot()
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


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; EvalError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EvalError("--plot needs matplotlib: pip install matplotlib") from exc
    return plt


STREAM_SERIES = (*SERIES, ("superseded", "superseded"), ("retracted", "retracted"))


def plot_stream(report: dict[str, Any], path: str | Path) -> Path:
    """Two panels of an operation stream's checkpoints: the metrics (exact match) and seconds per
    operation, against the number of operations (log scale); returns the written path."""
    plt = _pyplot()
    points = report.get("checkpoints") or []
    if not points:
        raise EvalError("the report has no checkpoints to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    operations = [point["after"] for point in points]
    figure, (metrics, seconds) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for key, label in STREAM_SERIES:
        values = [point["exact"].get(key) for point in points]
        if any(v is not None for v in values):
            metrics.plot(operations, [float("nan") if v is None else v for v in values], marker="o", label=label)
    metrics.set_title("exact match at each checkpoint")
    metrics.set_ylim(-2, 102)
    metrics.set_ylabel("percent")
    metrics.legend(loc="lower left", fontsize="small")
    seconds.plot(operations, [point["seconds_per_op"] for point in points], marker="o")
    seconds.set_title("seconds per operation (mean so far)")
    for axis in (metrics, seconds):
        axis.set_xscale("log")
        axis.set_xlabel("operations applied")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{report.get('method')} on {Path(str(report.get('stream_file'))).name}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
