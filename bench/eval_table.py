"""The full evaluation table: every method in both modes on one case file, the model loaded once.

    python bench/eval_table.py --cases bench/dev/cases.jsonl --out bench/results/eval \
        [--raw-out bench/out/eval] [--methods balancedit,grace,ft,mend,ike] \
        [--modes independent,sequential] [--hparam balancedit:alpha=0.1 ...] [--limit N] [--model demo]

Writes the summary, `table.md` and `table.txt`, into --out, and one JSON report with every case's
probes and one PNG curve per run (`<method>-<mode>.json|png`) into --raw-out (default
`bench/out/<name of --out>`, ignored by git: the scripts regenerate it), and prints the table.
Each method leaves the backbone as it found it (tests check this), so the runs share one loaded
model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from editor.backbones import load_backbone
from editor.eval.hparams import METHODS, parse_hparams
from editor.eval.runner import run_eval
from editor.eval.table import COLUMNS, format_table

RAW_ROOT = Path(__file__).resolve().parent / "out"  # per-run reports: regenerated, never committed


def markdown(reports: list[dict]) -> str:
    header = (
        "| method | mode | flavour | " + " | ".join(label for _, label in COLUMNS) + " | s/edit | setup s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for report in reports:
        setup = report["setup"].get("training_seconds", report["setup"].get("seconds", 0.0))
        for flavour in ("exact", "token"):
            cells = ["-" if report[flavour][k] is None else f"{report[flavour][k]:.2f}" for k, _ in COLUMNS]
            lines.append(
                f"| {report['method']} | {report['mode']} | {flavour} | "
                + " | ".join(cells)
                + f" | {report['seconds_per_edit']:.2f} | {setup:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for table.md and table.txt")
    parser.add_argument("--raw-out", type=Path,
                        help="folder for the per-run reports and curves (default: bench/out/<name of --out>)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default="independent,sequential")
    parser.add_argument("--hparam", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    per_method: dict[str, list[str]] = {}
    for item in args.hparam:
        method, _, pair = item.partition(":")
        per_method.setdefault(method, []).append(pair)
    raw_out = args.raw_out or RAW_ROOT / args.out.name
    args.out.mkdir(parents=True, exist_ok=True)
    raw_out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.model)
    reports = []
    started = time.perf_counter()
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            print(f"== {method} {mode}", file=sys.stderr, flush=True)
            report = run_eval(
                args.cases,
                method,
                mode == "sequential",
                backbone,
                hparams=parse_hparams(per_method.get(method, [])),
                limit=args.limit,
                json_path=raw_out / f"{method}-{mode}.json",
                plot_path=raw_out / f"{method}-{mode}.png",
                progress=lambda message: print(message, file=sys.stderr, flush=True),
            )
            report["model"] = args.model
            (raw_out / f"{method}-{mode}.json").write_text(json.dumps(report, indent=1) + "\n")
            reports.append(report)
            (args.out / "table.txt").write_text(format_table(reports) + "\n")
            (args.out / "table.md").write_text(markdown(reports) + "\n")
    print(format_table(reports))
    print(f"total {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
