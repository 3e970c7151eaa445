"""Spliced answers (issue 21, point 4): probes whose answer is neither the fired entry's whole
answer nor the unedited model's, over every probe of edit-case files, BalancEdit in both modes.

`--without-hold` runs the same with the answer hold of `editor.commit` switched off (the values
alone decide every answer step), to show what the hold removes.

    .venv/bin/python bench/splices.py --cases bench/dev/cases.jsonl bench/dev-seed1/cases.jsonl \
        --out bench/results/splices.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_facts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", required=True, type=Path, help="edit-case files")
    parser.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    parser.add_argument("--without-hold", action="store_true",
                        help="switch the answer hold off (the values alone decide each step)")
    parser.add_argument("--limit", type=int, help="only the first N cases of each file")
    args = parser.parse_args(argv)

    from editor import commit
    from editor.backbones import load_backbone
    from editor.eval.runner import run_eval

    if args.without_hold:
        commit.HoldFiredAnswers.__call__ = lambda self, input_ids, scores: scores  # type: ignore[method-assign]
    backbone = load_backbone("demo")
    rows: list[dict[str, Any]] = []
    for cases in args.cases:
        for sequential in (False, True):
            started = time.perf_counter()
            report = run_eval(cases, "balancedit", sequential=sequential, model=backbone, limit=args.limit)
            probes = [row for case in report["cases"] for row in case["probes"]]
            spliced = [
                {"case": case["id"], "question": row["question"], "image": row["image"],
                 "prediction": row["prediction"], "target": row["target"]}
                for case in report["cases"] for row in case["probes"] if row.get("spliced")
            ]
            rows.append({
                "cases": str(cases), "mode": report["mode"], "probes": len(probes),
                "fired": sum(bool(row.get("fired")) for row in probes), "spliced": report["spliced"],
                "hm": report["exact"]["hm"], "seconds_per_edit": report["seconds_per_edit"],
                "examples": spliced[:10], "seconds": time.perf_counter() - started,
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "examples"}), flush=True)
    summary = {"hold": not args.without_hold, "runs": rows,
               "spliced_total": sum(r["spliced"] or 0 for r in rows),
               "probes_total": sum(r["probes"] for r in rows), "machine": machine_facts()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"spliced {summary['spliced_total']} of {summary['probes_total']} probes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
