"""Seconds per edit against the compute floor: BalancEdit, GRACE and FT on the same facts, same run.

For each model (the demo model and a ~100M-parameter random LLaVA built in code) and each method,
applies N facts that rename the shape of easy-VQA training images, each on a fresh codebook (FT:
from the original weight), and reports per edit the seconds, the optimisation steps, the phase
breakdown the editor reports, and the floor measured right after it on the same inputs:

    floor = (forward passes that produce the keys the method needs, stopping at the edited layer)
          + steps x (one forward+backward pass through only the edited decoder layer, the layers
            after it and the output head)

BalancEdit needs keys for the fact, its rephrasings, its negatives and the hard-negative
candidates asked about the fact's image; GRACE and FT only for the fact. Medians over the facts.

    python bench/edit_timing.py                       # demo + 100M LLaVA, 12 facts each
    python bench/edit_timing.py --quick               # demo only, 2 facts (CI regression check)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_facts  # noqa: E402

NAMES = ["oblong box", "ring", "wedge", "aqua marine", "kitty"]
QUESTION = "what shape is in the image?"
FLOOR_REPEATS = 3


def seconds(function, repeats: int = FLOOR_REPEATS) -> float:
    """Median wall time of `function()` over `repeats` calls (after one warm-up call)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    function()
    times = []
    for _ in range(repeats):
        sync()
        tick = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def suffix_step_seconds(ed, fact) -> float:
    """One forward+backward through the edited decoder layer, the later ones and the head."""
    import torch

    from editor.training import capture, run_suffix

    backbone, config = ed.backbone, ed.config
    query = backbone.query(fact.image, fact.question)
    rows = [query]
    if config.method == "balancedit" and config.train_on_rephrases:
        rows += [type(query)(query.image, q) for q in ed.paraphraser(fact.question, config.num_paraphrases)]
    batch = backbone.encode(rows, [fact.answer] * len(rows))
    length = batch.targets.shape[1]
    suffix, _ = capture(backbone, ed.adapter, batch, ed._first_decoder, record_steps=length)
    positions = batch.key_positions.unsqueeze(1) + torch.arange(length)
    values = torch.nn.Parameter(torch.zeros(length, ed.spec.output_size))
    targets = batch.targets

    def step() -> None:
        with torch.enable_grad(), ed.adapter.scope(batch.key_positions, mode="forced", forced_values=values):
            logits = run_suffix(backbone, suffix, positions)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()

    return seconds(step)


def key_queries(ed, fact) -> list:
    """The inputs whose keys the method needs (BalancEdit: fact, rephrasings, negatives, candidates)."""
    backbone, config = ed.backbone, ed.config
    query = backbone.query(fact.image, fact.question)
    if config.method != "balancedit":
        return [query]
    rows = [query] + [type(query)(query.image, q) for q in ed.paraphraser(fact.question, config.num_paraphrases)]
    rows += ed._negative_queries(fact, query)
    if ed.reference_pool and config.num_hard_negatives:
        rows += ed._same_image_candidates(query)
    return rows


def method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"balancedit" or "balancedit:image_key_weight=0,alpha=0.1" -> (method, hyperparameters)."""
    from editor.eval.hparams import parse_hparams

    method, _, settings = spec.partition(":")
    return method, parse_hparams([s for s in settings.split(",") if s]) if settings else {}


def run_codebook_method(backbone, spec: str, facts, pool) -> list[dict[str, Any]]:
    import editor

    rows = []
    method, hparams = method_spec(spec)
    with editor.Editor(backbone, method, reference_pool=pool if method == "balancedit" else None, **hparams) as ed:
        if pool and method == "balancedit":
            ed._pool_index()  # one-off per editor; reported separately
        empty = editor.Codebook(ed.spec, ed.config.to_dict())
        ed.load_codebook(empty.copy())
        ed.apply(facts[0])  # warm-up, not counted
        for fact in facts:
            ed.load_codebook(empty.copy())
            report = ed.apply(fact)
            ed.load_codebook(empty.copy())
            queries = key_queries(ed, fact)
            keys = seconds(lambda q=queries: ed.keys(q))
            step = suffix_step_seconds(ed, fact)
            floor = keys + report.steps * step
            rows.append({
                "seconds": report.seconds, "steps": report.steps, "converged": report.converged,
                "timings": dict(report.timings), "floor": floor, "floor_keys": keys,
                "floor_step": step, "key_rows": len(queries),
                "optimisation_per_step": report.timings["optimisation"] / max(report.steps, 1),
            })
    return rows


def run_ft(backbone, facts, grace_floors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from editor.eval.finetune import FineTune
    from editor.eval.hparams import FineTuneConfig

    method = FineTune(backbone, FineTuneConfig())
    rows = []
    try:
        method.apply(facts[0])
        method.reset()
        for fact, grace in zip(facts, grace_floors, strict=True):
            tick = time.perf_counter()
            result = method.apply(fact)
            elapsed = time.perf_counter() - tick
            method.reset()
            # Same floor definition: the fact's key pass plus `steps` suffix passes.
            floor = grace["floor_keys"] + result["steps"] * grace["floor_step"]
            rows.append({"seconds": elapsed, "steps": result["steps"], "floor": floor,
                         "optimisation_per_step": elapsed / result["steps"]})
    finally:
        method.close()
    return rows


def summarise(rows: list[dict[str, Any]], max_steps: int | None) -> dict[str, Any]:
    median = statistics.median
    out: dict[str, Any] = {
        "edits": len(rows),
        "seconds_per_edit_median": round(median(r["seconds"] for r in rows), 4),
        "floor_median": round(median(r["floor"] for r in rows), 4),
        "ratio_to_floor_median": round(median(r["seconds"] / r["floor"] for r in rows), 3),
        "steps_median": median(r["steps"] for r in rows),
        "steps_max": max(r["steps"] for r in rows),
        "optimisation_seconds_per_step_median": round(median(r["optimisation_per_step"] for r in rows), 5),
    }
    if max_steps is not None:
        out["max_steps"] = max_steps
    if "timings" in rows[0]:
        phases = sorted({k for r in rows for k in r["timings"]})
        total = sum(r["seconds"] for r in rows)
        out["phase_seconds_median"] = {p: round(median(r["timings"].get(p, 0.0) for r in rows), 4) for p in phases}
        out["phase_share"] = {p: round(sum(r["timings"].get(p, 0.0) for r in rows) / total, 3) for p in phases}
        out["floor_keys_median"] = round(median(r["floor_keys"] for r in rows), 4)
        out["floor_step_median"] = round(median(r["floor_step"] for r in rows), 5)
        out["key_rows"] = rows[0]["key_rows"]
        out["converged"] = sum(r["converged"] for r in rows)
    return out


def load_model(name: str, device: str, dtype: str):
    from models import build_random_llava, parameter_count

    import editor
    from editor.backbones import resolve_device, resolve_dtype

    if name == "demo":
        backbone = editor.load_backbone("demo", device=device, dtype=dtype)
    else:
        target = resolve_device(device)
        backbone = build_random_llava(dtype=resolve_dtype(dtype, target))
        backbone.model.to(target)
    return backbone, parameter_count(backbone)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Seconds per edit against the floor ({result['machine']['cpus']} CPUs, "
             f"{result['machine']['torch_threads']} torch thread(s); medians over each model's facts)", "",
             "| model | method | facts | s/edit | floor s | ratio | steps (median/max) | optimisation s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for model, methods in result["models"].items():
        for method, row in methods["methods"].items():
            lines.append(f"| {model} | {method} | {methods['facts']} | {row['seconds_per_edit_median']} | "
                         f"{row['floor_median']} | "
                         f"{row['ratio_to_floor_median']} | {row['steps_median']}/{row['steps_max']} | "
                         f"{row['optimisation_seconds_per_step_median']} |")
    lines += ["", "BalancEdit phase medians (s):", ""]
    for model, methods in result["models"].items():
        phases = methods["methods"]["balancedit"]["phase_seconds_median"]
        lines.append(f"- {model}: " + ", ".join(f"{k} {v}" for k, v in phases.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,llava-100m", help="comma-separated: demo, llava-100m")
    parser.add_argument("--methods", default="balancedit,grace,ft",
                        help="comma-separated; a codebook method may carry settings after a colon, joined by "
                             "';' (balancedit:image_key_weight=0)")
    parser.add_argument("--facts", type=int, default=12, help="facts on the demo model")
    parser.add_argument("--facts-large", type=int, default=4, help="facts on the 100M LLaVA (FT takes ~40 s each)")
    parser.add_argument("--pool", default="easy-vqa", help="reference pool for BalancEdit ('' for none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU when present), cpu, cuda:N")
    parser.add_argument("--dtype", default="auto", help="base weights: auto, float32, bfloat16, float16")
    parser.add_argument("--quick", action="store_true", help="demo model, 2 facts, 20-item pool")
    parser.add_argument("--out", type=Path, default=Path("bench/results/edit_timing.json"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.facts, args.pool = "demo", 2, "easy-vqa:20"

    import torch

    torch.set_num_threads(args.threads)
    from easy_vqa import get_train_image_paths

    import editor
    from kb_daemon.runtime import load_reference_pool

    paths = get_train_image_paths()
    all_facts = [editor.Fact(paths[i], QUESTION, NAMES[k % len(NAMES)])
                 for k, i in enumerate(sorted(paths)[: max(args.facts, args.facts_large)])]
    pool = load_reference_pool(args.pool) if args.pool else []
    methods = [m.replace(";", ",") for m in args.methods.split(",") if m]
    result: dict[str, Any] = {"benchmark": "edit_timing", "reference_pool": len(pool),
                              "quick": args.quick, "models": {}}
    for name in args.models.split(","):
        facts = all_facts[: args.facts if name == "demo" else args.facts_large]
        tick = time.perf_counter()
        backbone, parameters = load_model(name, args.device, args.dtype)
        entry: dict[str, Any] = {"parameters": parameters, "load_seconds": round(time.perf_counter() - tick, 2),
                                 "facts": len(facts), "methods": {}}
        if pool and "balancedit" in methods:
            with editor.Editor(backbone, reference_pool=pool) as ed:
                entry["pool_index_seconds_once"] = round(seconds(lambda: (setattr(ed, "_pool", None),
                                                                          ed._pool_index()), 1), 2)
        rows_by_method: dict[str, list[dict[str, Any]]] = {}
        for method in methods:
            print(f"{name}: {method} ...", file=sys.stderr, flush=True)
            if method == "ft":
                grace = rows_by_method.get("grace") or run_codebook_method(backbone, "grace", facts, pool)
                rows = run_ft(backbone, facts, grace)
                max_steps = None
            else:
                rows = run_codebook_method(backbone, method, facts, pool)
                name_, settings_ = method_spec(method)
                max_steps = editor.EditConfig.from_dict({"method": name_, **settings_}).max_steps
            rows_by_method[method] = rows
            entry["methods"][method] = summarise(rows, max_steps)
        result["models"][name] = entry
    result["machine"] = machine_facts(
        device=str(next(backbone.model.parameters()).device), dtype=str(next(backbone.model.parameters()).dtype),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
