"""Seconds per edit on the demo model, with the breakdown the editor reports.

Applies N independent facts (each on a fresh codebook) that rename the shape of easy-VQA training
images, and reports the median seconds per edit, optimisation steps, and the share of each phase:
prefix forward (the capture pass over the whole model), the original answer, negative keys, hard
negatives, and the optimisation loop (which reruns only the edited decoder layer, the layers after
it and the output head).

    python bench/edit_timing.py --facts 30 --out bench/results/edit_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=30)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--pool", default="easy-vqa", help="reference pool ('' for none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/edit_timing.json"))
    args = parser.parse_args()

    import torch

    import editor
    from kb_daemon.demo import QUESTION
    from kb_daemon.runtime import load_reference_pool

    started = time.perf_counter()
    backbone = editor.load_backbone(args.model)
    load_seconds = time.perf_counter() - started
    from easy_vqa import get_train_image_paths

    paths = get_train_image_paths()
    images = [paths[i] for i in sorted(paths)[: args.facts]]
    names = ["oblong box", "ring", "wedge", "aqua marine", "kitty"]
    pool = load_reference_pool(args.pool) if args.pool else []
    reports = []
    with editor.Editor(backbone, reference_pool=pool) as ed:
        tick = time.perf_counter()
        if pool:
            ed._pool_index()
        pool_seconds = time.perf_counter() - tick
        empty = editor.Codebook(ed.spec, ed.config.to_dict())
        for i, image in enumerate(images):
            ed.load_codebook(empty.copy())
            reports.append(ed.apply(editor.Fact(image, QUESTION, names[i % len(names)])))
    phases = sorted({k for r in reports for k in r.timings})
    total = sum(r.seconds for r in reports)
    result = {
        "benchmark": "edit_timing", "model": args.model, "facts": len(reports),
        "reference_pool": len(pool), "model_load_seconds": round(load_seconds, 3),
        "pool_index_seconds_once": round(pool_seconds, 3),
        "seconds_per_edit_median": round(statistics.median(r.seconds for r in reports), 4),
        "seconds_per_edit_mean": round(total / len(reports), 4),
        "steps_median": statistics.median(r.steps for r in reports),
        "steps_max": max(r.steps for r in reports), "max_steps": ed.config.max_steps,
        "converged": sum(r.converged for r in reports),
        "phase_share": {p: round(sum(r.timings.get(p, 0.0) for r in reports) / total, 3) for p in phases},
        "phase_seconds_median": {p: round(statistics.median(r.timings.get(p, 0.0) for r in reports), 4)
                                 for p in phases},
        "radius_fallbacks": sum(r.radius_fallback is not None for r in reports),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
