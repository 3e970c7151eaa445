"""The edit benchmark for BalancEdit variants (issue 21): per case file, mode and variant, exact-match
Acc / T-Gen / I-Gen / Loc / HM over all cases and over the instance-scope cases alone, the count of
spliced answers (neither the fired entry's whole answer nor the unedited model's) over every probe,
and seconds per edit.

A variant is a name and --hparam style settings, e.g. `halve:overlap_rule=halve`. `--without-hold`
switches the answer hold of `editor.commit` off (the values alone decide every answer step), to count
the splices the hold removes.

    .venv/bin/python bench/edit_variants.py --cases bench/dev/cases.jsonl bench/dev-seed1/cases.jsonl \\
        bench/dev-seed2/cases.jsonl --variant halve:overlap_rule=halve \\
        --variant keep:overlap_rule=keep_positives --out bench/results/overlap_rule.json
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


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    from editor.eval.hparams import parse_hparams

    name, _, settings = text.partition(":")
    return name, parse_hparams([s for s in settings.split(",") if s]) if settings else {}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    from editor.eval.metrics import aggregate

    instance = [c for c in report["cases"] if c["scope"] == "instance"]
    probes = [row for case in report["cases"] for row in case["probes"]]
    return {
        "exact": report["exact"],
        "instance_exact": aggregate([{"exact": c["exact"], "token": c["token"]} for c in instance])["exact"],
        "probes": len(probes),
        "fired": sum(bool(row.get("fired")) for row in probes),
        "spliced": report["spliced"],
        "spliced_examples": [
            {"case": case["id"], "question": row["question"], "image": row["image"],
             "prediction": row["prediction"], "target": row["target"]}
            for case in report["cases"] for row in case["probes"] if row.get("spliced")][:10],
        "seconds_per_edit": report["seconds_per_edit"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", type=Path, help="edit-case files")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a BalancEdit variant (repeatable; default: the editor's defaults)")
    parser.add_argument("--modes", default="independent,sequential", help="comma-separated modes")
    parser.add_argument("--out", type=Path, required=True, help="JSON summary to write")
    parser.add_argument("--without-hold", action="store_true",
                        help="switch the answer hold off (the values alone decide each step)")
    parser.add_argument("--limit", type=int, help="only the first N cases of each file")
    parser.add_argument("--quick", action="store_true",
                        help="two cases of a freshly built seed-0 file, independent mode (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        from editor.eval.easyvqa import build_case_files

        folder = args.out.parent / "edit_variants_cases"
        build_case_files(folder)
        args.cases, args.limit, args.modes = [folder / "cases.jsonl"], 2, "independent"
    if not args.cases:
        parser.error("--cases is required (or --quick)")

    from editor import commit
    from editor.backbones import load_backbone
    from editor.eval.runner import run_eval

    if args.without_hold:
        commit.HoldFiredAnswers.__call__ = lambda self, input_ids, scores: scores  # type: ignore[method-assign]
    variants = [parse_variant(v) for v in args.variant] or [("defaults", {})]
    backbone = load_backbone("demo")
    rows: list[dict[str, Any]] = []
    for cases in args.cases:
        for mode in args.modes.split(","):
            for name, hparams in variants:
                started = time.perf_counter()
                report = run_eval(cases, "balancedit", sequential=mode == "sequential", model=backbone,
                                  hparams=hparams, limit=args.limit)
                rows.append({"cases": str(cases), "mode": mode, "variant": name, "hparams": hparams,
                             **summarise(report), "seconds": time.perf_counter() - started})
                shown = {k: rows[-1][k] for k in ("cases", "mode", "variant", "spliced", "seconds_per_edit")}
                print(json.dumps({**shown, "hm": rows[-1]["exact"]["hm"],
                                  "instance": rows[-1]["instance_exact"]}), flush=True)
    summary = {"benchmark": "edit_variants", "quick": args.quick, "hold": not args.without_hold, "runs": rows,
               "spliced_total": sum(r["spliced"] or 0 for r in rows),
               "probes_total": sum(r["probes"] for r in rows), "machine": machine_facts()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"spliced {summary['spliced_total']} of {summary['probes_total']} probes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
