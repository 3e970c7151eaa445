"""Hyperparameter sweep for one method on one case file, with the diagnosis the codebook exposes.

    python bench/eval_sweep.py --cases bench/dev/cases.jsonl --method balancedit \
        --grid alpha=0.0,0.2,0.5 --grid distance=euclidean,cosine [--fixed pool_size=100] \
        [--sequential] [--limit N] [--out bench/results/sweep.json]

For each combination of the --grid values it runs `run_eval` (model loaded once) and prints the
exact-match metrics plus, for codebook methods, why probes fail: I-Gen/T-Gen probes the edit did
not fire on (radius too narrow), loc probes it fired on (radius too wide), and facts whose
negatives came nearer than their positives (radius fallback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from editor.backbones import load_backbone
from editor.eval.hparams import parse_hparams
from editor.eval.runner import run_eval


def diagnosis(report: dict[str, Any]) -> dict[str, int]:
    counts = {"t_gen_missed": 0, "i_gen_missed": 0, "i_gen_fired_wrong": 0, "loc_fired": 0, "fallbacks": 0}
    for case in report["cases"]:
        counts["fallbacks"] += bool(case["apply"].get("radius_fallback"))
        for probe in case["probes"]:
            fired = probe.get("fired")
            if fired is None:  # not a codebook method: nothing to diagnose
                continue
            if probe["kind"] == "t_gen" and not probe["exact"] and fired is False:
                counts["t_gen_missed"] += 1
            if probe["kind"] == "i_gen" and not probe["exact"]:
                counts["i_gen_missed" if fired is False else "i_gen_fired_wrong"] += 1
            if probe["kind"] == "loc" and not probe["exact"] and fired:
                counts["loc_fired"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, required=True)
    parser.add_argument("--method", default="balancedit")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    axes = []
    for item in args.grid:
        key, _, values = item.partition("=")
        axes.append([f"{key}={value}" for value in values.split(",")])
    backbone = load_backbone(args.model)
    rows = []
    for combination in itertools.product(*axes) if axes else [()]:
        hparams = parse_hparams([*args.fixed, *combination])
        report = run_eval(
            args.cases, args.method, args.sequential, backbone, hparams=hparams, limit=args.limit
        )
        exact, token = report["exact"], report["token"]
        row = {
            "hparams": hparams,
            "exact": exact,
            "token": token,
            "seconds_per_edit": report["seconds_per_edit"],
            **diagnosis(report),
        }
        rows.append(row)
        cells = " ".join(f"{k}={exact[k]:.1f}" for k in ("acc", "t_gen", "i_gen", "loc", "hm"))
        extra = " ".join(f"{k}={row[k]}" for k in diagnosis(report))
        print(
            f"{' '.join(combination) or '(defaults)'}: {cells} | token hm={token['hm']:.1f} | {extra} | "
            f"{report['seconds_per_edit']:.2f}s/edit",
            flush=True,
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
