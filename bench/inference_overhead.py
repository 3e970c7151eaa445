"""Inference overhead of the codebook: forward and generate() latency against the number of entries.

For the demo model and the ~100M random LLaVA (bench/models.py), batch 1 and batch 16, with 0, 100,
1k, 10k and 100k entries. The codebooks are synthetic (random keys far from every query, so the
lookup scans all N entries and nothing fires; the "fires" variant also puts one entry on row 0's
own key so the replacement path runs too). They are built in bulk: the `Codebook(entries=...)`
constructor replays GRACE's overlap rule, which costs seconds at 10k entries and far more at 100k,
so the bench fills the derived fields directly and checks on 2,000 entries that this gives exactly
what the constructor gives (no entries overlap, so the effective radii are the base radii).

Every configuration is timed in round-robin order, `--repeats` times, so a busy machine slows all
of them alike; the report gives medians and the overhead in % against 0 entries. A shape probe
wraps `Codebook.lookup` during one forward and one generate() at the largest size and records the
query tensor's shape and the number of entries of every call: one call per forward and per
generate(), each on (B, Din) queries (the key positions only), so the largest thing a lookup can
build is the (B, N) distance matrix, never (B*T, N). `lookup_seconds` times `Codebook.lookup`
alone on the same queries.

    python bench/inference_overhead.py --out bench/results/inference_overhead.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import machine_facts  # bench/ is sys.path[0] when a script runs

NEW_TOKENS = 8  # generate() is forced to exactly this many tokens so runs are comparable
MIN_SAMPLE_SECONDS = 0.2  # cheap calls are repeated within one timed sample up to about this long


def synthetic_codebook(spec: Any, hparams: dict[str, Any], keys: Any, radii: Any, values: Any) -> Any:
    """A codebook of len(keys) entries with the given keys (N, Din) and radii (N,), built in O(N).

    Valid only when no two entries overlap (distance >= sum of radii): then GRACE's overlap rule
    leaves every base radius as it is, which `check_bulk_equals_constructor` verifies on a small N.
    All entries share one `values` tensor (L, Dout): only a firing entry's values are ever read.
    Built with `Codebook.from_stores`, which uses the tensors as they are; `Codebook.with_radii`
    would copy every entry's values into its own store, N x L x Dout floats, which at 100k entries
    would not fit in memory.
    """
    from editor.codebook import Codebook

    n = keys.shape[0]
    return Codebook.from_stores(
        spec, dict(hparams), [(f"f{i}", f"answer {i}", f"input {i}") for i in range(n)], keys, values,
        [(0, values.shape[0])] * n, radii.tolist(), radii)


def check_bulk_equals_constructor(spec: Any, keys: Any, radii: Any, values: Any) -> None:
    import torch

    from editor.codebook import Codebook

    bulk = synthetic_codebook(spec, {}, keys, radii, values)
    reference = Codebook(spec, {}, list(bulk.entries))
    if not (torch.equal(bulk.keys, reference.keys) and torch.equal(bulk.radii, reference.radii)):
        raise AssertionError("bulk codebook differs from the one the constructor builds")


def far_keys(queries: Any, count: int, generator: Any, distance: str) -> tuple[Any, Any]:
    """`count` random keys, each far from every query, and a radius that none of them reaches.

    queries (B, Din) -> keys (count, Din), radii (count,). The radius is a quarter of the smallest
    query-to-key and key-to-key distance (under `distance`, over the first 2,000 keys), so no ball
    holds a query and no two balls overlap; `check_bulk_equals_constructor` confirms the latter.
    """
    import torch

    from editor.radius import pairwise_distances

    scale = float(queries.norm(dim=1).mean())
    centre = queries.mean(dim=0)  # (Din,)
    directions = torch.randn(count, queries.shape[1], generator=generator)  # (count, Din)
    directions = directions / directions.norm(dim=1, keepdim=True)
    keys = centre + 4.0 * scale * directions  # every key about 4 query norms from the queries
    sample = keys[:2000]  # (S, Din)
    between = pairwise_distances(sample, sample, distance)  # type: ignore[arg-type]  # (S, S)
    between.fill_diagonal_(float("inf"))
    nearest = min(float(pairwise_distances(queries, keys, distance).min()), float(between.min()))  # type: ignore[arg-type]
    radii = torch.full((count,), 0.25 * nearest)
    return keys.contiguous(), radii


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,llava100m", help="comma list of demo, llava100m")
    parser.add_argument("--sizes", default="0,100,1000,10000,100000", help="codebook sizes")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip",
        default="",
        help="cells left out, comma list of model:batch:entries "
        "(e.g. llava100m:16:100000 when it does not fit the time budget)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: demo model, 0/100/1000, 2 repeats")
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference_overhead.json"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.batches, args.repeats = "demo", "0,100,1000", "1,2", 2

    import torch

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    skip: dict[str, set[tuple[int, int]]] = {}
    for cell in filter(None, args.skip.split(",")):
        model_name, batch, size = cell.split(":")
        skip.setdefault(model_name, set()).add((int(batch), int(size)))
    results: dict[str, Any] = {}
    for model_name in args.models.split(","):
        results[model_name] = measure_model(
            model_name, sizes, batches, args.repeats, args.seed, skip.get(model_name, set())
        )

    report = {
        "benchmark": "inference_overhead",
        "new_tokens": NEW_TOKENS,
        "sizes": sizes,
        "batches": batches,
        "repeats": args.repeats,
        "quick": args.quick,
        "models": results,
        "target": "llava100m at 10k entries at most 5% slower than with none",
        "at_10k": summary_at(results, 10000),
        "beyond_100k": (
            "The exact lookup reads all N keys once per sequence (B x N distances at the key position "
            "only), so its cost is linear in N: about N * Din * 4 bytes of memory traffic per call "
            "(100k x 2048 fp32 = 800 MB). Beyond ~100k entries use an approximate nearest-neighbour "
            "index over the keys (FAISS IVF-Flat or HNSW, or IVF-PQ to cut memory), query its k "
            "nearest (k ~ 8) and apply the radius test to those only; entries whose radius is larger "
            "than the index's recall distance must be checked exactly. Storing keys in fp16/bf16 "
            "halves the traffic for the exact scan. Not measured here (no index is installed)."
        ),
        "machine": machine_facts(),
    }
    write_report(args.out, report)
    print(markdown(report))


def summary_at(results: dict[str, Any], size: int) -> dict[str, Any]:
    """Overhead in % at `size` entries (nothing fires), per model and batch."""
    summary: dict[str, Any] = {}
    for name, model in results.items():
        for row in model["rows"]:
            if row["entries"] == size and row["variant"] == "none":
                summary.setdefault(name, {})[f"batch {row['batch']}"] = {
                    "forward_percent": row["forward_overhead_percent"],
                    "generate_percent": row["generate_overhead_percent"],
                }
    return summary


def load_model(name: str) -> Any:
    import editor

    if name == "demo":
        return editor.load_backbone("demo")
    if name == "llava100m":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from models import build_random_llava

        return build_random_llava()
    raise SystemExit(f"unknown model {name!r}; choose demo or llava100m")


def measure_model(
    name: str, sizes: list[int], batches: list[int], repeats: int, seed: int, skip: set[tuple[int, int]]
) -> dict[str, Any]:
    import torch
    from easy_vqa import get_train_image_paths

    import editor
    from editor.codebook import Codebook
    from editor.radius import pairwise_distances
    from kb_daemon.demo import QUESTION

    backbone = load_model(name)
    paths = get_train_image_paths()
    images = [paths[i] for i in sorted(paths)[: max(batches)]]
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in backbone.model.parameters())}
    with editor.Editor(backbone) as ed:
        spec = ed.spec
        result["layer"] = ed.layer
        result["input_size"], result["output_size"] = spec.input_size, spec.output_size
        encoded = {
            b: backbone.encode([backbone.query(images[i], QUESTION) for i in range(b)]) for b in batches
        }
        result["prompt_tokens"] = int(encoded[batches[0]].input_ids.shape[1])
        query_keys = {b: ed.keys([backbone.query(images[i], QUESTION) for i in range(b)]) for b in batches}
        all_queries = torch.cat(list(query_keys.values()))
        largest = max(sizes)
        keys, radii = far_keys(all_queries, largest, generator, spec.distance)
        values = torch.randn(NEW_TOKENS, spec.output_size, generator=generator) * 0.1  # (L, Dout)
        check_bulk_equals_constructor(spec, keys[:2000], radii[:2000], values)

        def codebook_for(batch: int, variant: str, size: int) -> Any:
            k, r = keys[:size], radii[:size]
            if variant == "fires":
                # Entry size // 2 sits on row 0's own key, with a radius that reaches no other row.
                k, r = k.clone(), r.clone()
                own = query_keys[batch]  # (B, Din)
                others = pairwise_distances(own[:1], own[1:], spec.distance)  # (1, B-1)
                k[size // 2] = own[0]
                r[size // 2] = 0.5 * float(others.min()) if others.numel() else float(r[0])
            return synthetic_codebook(spec, {}, k, r, values)

        # "none" at every size but the skipped ones; "fires" at the first size that matters (10k).
        fires_at = min([s for s in sizes if s >= 10000] or [max(sizes)])
        cases: list[tuple[int, str, int]] = []  # (batch, variant, size)
        for b in batches:
            cases += [(b, "none", s) for s in sizes if (b, s) not in skip]
            if (b, fires_at) not in skip:
                cases.append((b, "fires", fires_at))
        result["skipped"] = [{"batch": b, "entries": s} for b, s in sorted(skip)]
        codebooks = {case: codebook_for(*case) for case in cases}

        def forward(b: int) -> Callable[[], Any]:
            batch = encoded[b]
            inputs = backbone.model_inputs(batch)

            def run() -> Any:
                with torch.no_grad(), ed.adapter.scope(batch.key_positions) as state:
                    backbone.model(**inputs, use_cache=False)
                return state

            return run

        def generate(b: int) -> Callable[[], Any]:
            batch = encoded[b]
            inputs = backbone.model_inputs(batch)
            inputs.pop("position_ids", None)

            def run() -> Any:
                with torch.no_grad(), ed.adapter.scope(batch.key_positions) as state:
                    out = backbone.model.generate(
                        **inputs,
                        max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        num_beams=1,
                        eos_token_id=backbone.eos_token_id,
                        pad_token_id=backbone.pad_token_id,
                        use_cache=True,
                    )
                assert out.shape[1] == batch.input_ids.shape[1] + NEW_TOKENS
                return state

            return run

        runners = {(b, "forward"): forward(b) for b in batches} | {
            (b, "generate"): generate(b) for b in batches
        }

        # Shape probe: every `Codebook.lookup` call during one forward and one generate() at the largest
        # size kept for the largest batch.
        calls: list[dict[str, Any]] = []
        original = Codebook.lookup

        def probe(self: Any, queries: Any) -> Any:
            found, distance = original(self, queries)
            calls.append(
                {"queries": list(queries.shape), "entries": len(self), "found": list(found.shape)}
            )
            return found, distance

        probe_batch = max(batches)
        probe_size = max(s for b, v, s in cases if b == probe_batch and v == "none")
        Codebook.lookup = probe  # type: ignore[method-assign]
        try:
            for what in ("forward", "generate"):
                ed.load_codebook(codebooks[(probe_batch, "none", probe_size)])
                before = len(calls)
                runners[(probe_batch, what)]()
                seen = calls[before:]
                result[f"probe_{what}"] = {
                    "batch": probe_batch,
                    "entries": probe_size,
                    "lookups": len(seen),
                    "calls": seen,
                    "prompt_tokens": int(encoded[probe_batch].input_ids.shape[1]),
                    "only_key_positions": len(seen) == 1
                    and all(
                        c["queries"] == [probe_batch, spec.input_size] and c["entries"] == probe_size
                        for c in seen
                    ),
                }
        finally:
            Codebook.lookup = original  # type: ignore[method-assign]
        for what in ("forward", "generate"):
            if not result[f"probe_{what}"]["only_key_positions"]:
                raise AssertionError(
                    f"{what}: lookups {result[f'probe_{what}']['calls']}, expected one "
                    f"on ({probe_batch}, {spec.input_size}) queries"
                )

        # Warm up each runner once, and check which rows fire.
        fired: dict[str, list[int]] = {}
        for case in cases:
            ed.load_codebook(codebooks[case])
            state = runners[(case[0], "forward")]()
            fired[f"b{case[0]}-{case[1]}-{case[2]}"] = (state.fired >= 0).nonzero().flatten().tolist()
        for case in cases:
            expected = [0] if case[1] == "fires" else []
            if fired[f"b{case[0]}-{case[1]}-{case[2]}"] != expected:
                raise AssertionError(f"case {case}: rows {fired} fired, expected {expected}")

        # Calls per timed sample, so that every sample of the cheap runners lasts about 0.2 s.
        inner = {}
        for key, runner in runners.items():
            ed.load_codebook(codebooks[(key[0], "none", 0)])
            tick = time.perf_counter()
            runner()
            inner[key] = max(1, math.ceil(MIN_SAMPLE_SECONDS / (time.perf_counter() - tick)))
        result["calls_per_sample"] = {f"batch {b} {what}": n for (b, what), n in inner.items()}

        timings: dict[tuple[int, str, int, str], list[float]] = {}
        lookups: dict[tuple[int, int], list[float]] = {}
        for _ in range(repeats):
            for case in cases:
                ed.load_codebook(codebooks[case])
                for what in ("forward", "generate"):
                    runner, calls = runners[(case[0], what)], inner[(case[0], what)]
                    tick = time.perf_counter()
                    for _ in range(calls):
                        runner()
                    timings.setdefault((*case, what), []).append((time.perf_counter() - tick) / calls)
                if case[1] == "none":
                    codebook = codebooks[case]
                    calls = inner[(case[0], "forward")]
                    tick = time.perf_counter()
                    for _ in range(calls):
                        codebook.lookup(query_keys[case[0]])
                    lookups.setdefault(case, []).append((time.perf_counter() - tick) / calls)

        rows = []
        for b, variant, size in cases:
            row: dict[str, Any] = {"batch": b, "variant": variant, "entries": size}
            for what in ("forward", "generate"):
                seconds = median(timings[(b, variant, size, what)])
                base = median(timings[(b, "none", 0, what)])
                row[f"{what}_seconds"] = round(seconds, 5)
                row[f"{what}_overhead_percent"] = round(100.0 * (seconds / base - 1.0), 1)
            look = median(lookups[(b, variant, size)]) if (b, variant, size) in lookups else None
            if look is not None:
                row["lookup_seconds"] = round(look, 6)
                row["lookup_percent_of_forward"] = round(
                    100.0 * look / median(timings[(b, "none", 0, "forward")]), 2
                )
            rows.append(row)
        result["rows"] = rows
    return result


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Inference overhead of the codebook ({report['repeats']} repeats, medians; "
        f"generate = {report['new_tokens']} forced new tokens)",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s), "
        f"{machine['platform']}, "
        f"load average at the end {machine['load_average'][0]:.1f}.",
        "",
        "| model | batch | entries | variant | forward s | forward +% | generate s | generate +% "
        "| lookup s | lookup % of forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in report["models"].items():
        for row in model["rows"]:
            lines.append(
                f"| {name} | {row['batch']} | {row['entries']} | {row['variant']} "
                f"| {row['forward_seconds']:.4f} | "
                f"{row['forward_overhead_percent']:+.1f} | {row['generate_seconds']:.4f} | "
                f"{row['generate_overhead_percent']:+.1f} | {row.get('lookup_seconds', '')} | "
                f"{row.get('lookup_percent_of_forward', '')} |"
            )
    skipped = [
        f"{name} batch {cell['batch']} at {cell['entries']} entries"
        for name, model in report["models"].items()
        for cell in model["skipped"]
    ]
    if skipped:
        lines += ["", f"Not measured (time budget): {'; '.join(skipped)}."]
    lines += [
        "",
        "Shape probe (every `Codebook.lookup` call at the largest size measured, largest batch):",
        "",
    ]
    for name, model in report["models"].items():
        for what in ("forward", "generate"):
            probe = model[f"probe_{what}"]
            shapes = [f"{tuple(c['queries'])} queries x {c['entries']} entries" for c in probe["calls"]]
            lines.append(
                f"- {name} {what}: {probe['lookups']} lookup(s): {', '.join(shapes)}; "
                f"prompt of {probe['prompt_tokens']} tokens; "
                f"only key positions: {probe['only_key_positions']}"
            )
    lines += ["", f"Above 100k entries: {report['beyond_100k']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
