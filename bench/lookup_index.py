"""Lookup overhead with and without the nearest-neighbour index, up to 1M entries, and its recall.

On the ~100M random LLaVA (bench/models.py; cosine keys at its last layer, Din 2048), batch 1 and
16: forward and generate() latency with no codebook, and with 10k, 100k and 1M entries looked up by
the exact scan and by the index (`editor.ann`), timed round-robin `--repeats` times (medians);
`Codebook.lookup` alone on the same queries; the index's build time and memory per entry.

The codebooks are built as in bench/inference_overhead.py (keys in random directions far from
every query, radii a quarter of the smallest key-to-key and query-to-key distance, so nothing fires
and no balls overlap; all entries share one run of value rows). One key matrix of the largest size
is made in chunks and every smaller codebook is a view of its first rows.

Recall: queries placed inside random entries' balls (at a cosine distance up to the radius), looked
up by the exact scan and by the index; the share of those inside some ball where both fire the same
entry, and a float64 check of every entry the index fires.

Realistic radii (`--realistic-recall`): radii as the overlap rule leaves them in a real codebook,
each 0.3 to 0.9 times the distance from its key to the nearest key with another answer, so that no
two balls of different answers overlap while one ball may hold many keys of its own answer. Keys in
topics (see `topic_keys`) or uniformly random directions, and the demo model's real keys
(`--demo-recall`, with easy-VQA's own answers).

    OMP_NUM_THREADS=1 .venv/bin/python bench/lookup_index.py --out bench/results/lookup_index.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

from inference_overhead import MIN_SAMPLE_SECONDS, NEW_TOKENS, load_model, median, synthetic_codebook
from machine import machine_facts  # bench/ is sys.path[0] when a script runs

CHUNK = 65_536  # keys made, and distances computed, this many at a time


def make_keys(queries: Any, count: int, generator: Any) -> tuple[Any, Any]:
    """Like inference_overhead.far_keys (cosine), in chunks so that 1M x 2048 keys need no
    temporary of their size. queries (B, Din) -> keys (count, Din), radii (count,)."""
    import torch

    from editor.radius import pairwise_distances

    din = queries.shape[1]
    scale = float(queries.norm(dim=1).mean())
    centre = queries.mean(dim=0)  # (Din,)
    keys = torch.empty(count, din)
    nearest = float("inf")
    for start in range(0, count, CHUNK):
        stop = min(count, start + CHUNK)
        block = torch.randn(stop - start, din, generator=generator)  # (C, Din)
        block.div_(block.norm(dim=1, keepdim=True)).mul_(4.0 * scale).add_(centre)
        keys[start:stop] = block
        nearest = min(nearest, float(pairwise_distances(queries, block, "cosine").min()))
    sample = keys[:2000]
    between = pairwise_distances(sample, sample, "cosine")  # (S, S)
    between.fill_diagonal_(float("inf"))
    nearest = min(nearest, float(between.min()))
    return keys, torch.full((count,), 0.25 * nearest)


def recall(book: Any, count: int, generator: Any) -> dict[str, Any]:
    """Queries inside random entries' balls: the share where the index fires what the exact scan
    fires, and whether every entry it fires passes its radius test in float64."""
    import torch

    rows = torch.randint(0, len(book), (count,), generator=generator)
    keys = book.keys[rows]  # (Q, Din)
    direction = torch.nn.functional.normalize(torch.randn(count, keys.shape[1], generator=generator), dim=-1)
    # A small perpendicular step of angle a moves a key by a cosine distance of about a^2 / 2.
    angle = (2.0 * book.radii[rows] * torch.rand(count, generator=generator)).sqrt()  # (Q,)
    queries = keys + keys.norm(dim=1, keepdim=True) * angle.unsqueeze(1) * direction  # (Q, Din)
    exact_rows, indexed_rows, indexed_distances = [], [], []
    for start in range(0, count, 16):
        exact_rows.append(book.exact_lookup(queries[start : start + 16])[0])
        found, distance = book.indexed_lookup(queries[start : start + 16])
        indexed_rows.append(found)
        indexed_distances.append(distance)
    exact, fired, distance = torch.cat(exact_rows), torch.cat(indexed_rows), torch.cat(indexed_distances)
    inside = exact >= 0
    hit = fired >= 0
    d64 = 1.0 - torch.nn.functional.cosine_similarity(queries[hit].double(), book.keys[fired[hit]].double(), dim=1)
    return {
        "queries": count,
        "inside_some_ball": int(inside.sum()),
        "same_entry": int((fired[inside] == exact[inside]).sum()),
        "recall": round(float((fired[inside] == exact[inside]).double().mean()), 5),
        "index_fired_outside_exact": int((hit & ~inside).sum()),
        "fired_failing_radius_float64": int((d64 > book.radii[fired[hit]].double() + 1e-6).sum()),
    }


TOPIC_SIZE, SUBTOPIC_SIZE = 50, 5


def topic_keys(count: int, din: int, generator: Any) -> tuple[Any, Any, Any]:
    """`count` keys in topics of 50 (one random centre each) made of subtopics of 5 keys (an offset
    each, half the centre's scale, plus per-key noise of 0.4): the clusters within clusters that
    prompts about one subject make. Each subtopic has one answer, 2 or 3 answers per topic.
    -> keys (N, Din), answer codes (N,), distance from each key to the nearest key with another
    answer (N,), exact: it lies inside the key's topic, which a sample checks against every key."""
    import torch

    topics = count // TOPIC_SIZE
    n = topics * TOPIC_SIZE
    keys = torch.randn(topics, din, generator=generator).repeat_interleave(TOPIC_SIZE, 0)  # (N, Din)
    keys += 0.5 * torch.randn(n // SUBTOPIC_SIZE, din, generator=generator).repeat_interleave(SUBTOPIC_SIZE, 0)
    keys += 0.4 * torch.randn(n, din, generator=generator)
    local = torch.randint(0, 3, (topics, TOPIC_SIZE // SUBTOPIC_SIZE), generator=generator)
    local[:, 0], local[:, 1] = 0, 1
    answers = (torch.arange(topics).unsqueeze(1) * 3 + local).repeat_interleave(SUBTOPIC_SIZE, 1).reshape(-1)  # (N,)
    unit = torch.nn.functional.normalize(keys, dim=-1)  # (N, Din)
    nearest = torch.empty(n)
    for start in range(0, topics, 256):
        block = unit[start * TOPIC_SIZE : (start + 256) * TOPIC_SIZE].view(-1, TOPIC_SIZE, din)  # (T, S, Din)
        within = 1.0 - block @ block.transpose(1, 2)  # (T, S, S)
        a = answers[start * TOPIC_SIZE : (start + 256) * TOPIC_SIZE].view(-1, TOPIC_SIZE)  # (T, S)
        within[a.unsqueeze(2) == a.unsqueeze(1)] = float("inf")
        nearest[start * TOPIC_SIZE : (start + 256) * TOPIC_SIZE] = within.min(dim=2).values.reshape(-1)
    sample = torch.randint(0, n, (500,), generator=generator)
    across = 1.0 - unit[sample] @ unit.T  # (500, N)
    across[(sample // TOPIC_SIZE).unsqueeze(1) == (torch.arange(n) // TOPIC_SIZE).unsqueeze(0)] = float("inf")
    if not bool((across.min(dim=1).values > nearest[sample]).all()):
        raise AssertionError("a key of another topic lies nearer than the nearest other answer in its own")
    return keys, answers, nearest


def nearest_other_answer(keys: Any, answers: Any) -> Any:
    """keys (N, Din), answer codes (N,) -> cosine distance from each key to the nearest key with
    another answer (N,), exactly, in blocks."""
    import torch

    unit = torch.nn.functional.normalize(keys, dim=-1)  # (N, Din)
    nearest = torch.empty(keys.shape[0])
    for start in range(0, keys.shape[0], 2048):
        block = 1.0 - unit[start : start + 2048] @ unit.T  # (R, N)
        block[answers[start : start + 2048].unsqueeze(1) == answers.unsqueeze(0)] = float("inf")
        nearest[start : start + 2048] = block.min(dim=1).values
    return nearest


def realistic_book(spec: Any, keys: Any, answers: Any, nearest: Any, generator: Any) -> Any:
    """A codebook whose radii are 0.3 to 0.9 times `nearest` (N,), answers as given."""
    import torch

    from editor.codebook import Codebook

    n = keys.shape[0]
    radii = nearest.clamp_min(1e-6) * (0.3 + 0.6 * torch.rand(n, generator=generator))  # (N,)
    values = torch.zeros(2, spec.output_size)
    return Codebook.from_stores(spec, {}, [(f"f{i}", f"answer {int(answers[i])}", f"input {i}") for i in range(n)],
                                keys.contiguous(), values, [(0, 2)] * n, radii.tolist(), radii)


def realistic_queries(book: Any, count: int, generator: Any) -> Any:
    """Half the queries step from a random entry's key in a random direction, half towards one of
    its 64 nearest keys (a new input between known ones); each by up to the entry's radius."""
    import torch

    rows = torch.randint(0, len(book), (count,), generator=generator)
    keys, radii = book.keys[rows], book.radii[rows]  # (Q, Din), (Q,)
    share = torch.rand(count, generator=generator)  # (Q,) how far into the ball
    half = count // 2
    direction = torch.nn.functional.normalize(torch.randn(half, keys.shape[1], generator=generator), dim=-1)
    # A small perpendicular step of angle a moves a key by a cosine distance of about a^2 / 2.
    angle = (2.0 * radii[:half] * share[:half]).sqrt()  # (Q/2,)
    stepped = keys[:half] + keys[:half].norm(dim=1, keepdim=True) * angle.unsqueeze(1) * direction
    unit = torch.nn.functional.normalize(book.keys, dim=-1)  # (N, Din)
    near = (unit[rows[half:]] @ unit.T).topk(65, dim=1).indices[:, 1:]  # (Q/2, 64)
    other = near[torch.arange(count - half), torch.randint(0, 64, (count - half,), generator=generator)]
    gap = (1.0 - (unit[rows[half:]] * unit[other]).sum(1)).clamp_min(1e-9)  # (Q/2,)
    # Along the segment the cosine distance grows about as (t^2) * gap.
    t = (share[half:] * radii[half:] / gap).sqrt().clamp(max=1.0)  # (Q/2,)
    towards = keys[half:] + t.unsqueeze(1) * (book.keys[other] - keys[half:])
    return torch.cat([stepped, towards])  # (Q, Din)


def agreement(book: Any, queries: Any) -> dict[str, Any]:
    """Exact scan against index (batches of 16) on `queries`; every fired entry checked in float64."""
    import torch

    exact = book.exact_lookup(queries)[0]
    fired = torch.cat([book.indexed_lookup(queries[i : i + 16])[0] for i in range(0, len(queries), 16)])
    inside, hit = exact >= 0, fired >= 0
    d64 = 1.0 - torch.nn.functional.cosine_similarity(queries[hit].double(), book.keys[fired[hit]].double(), dim=1)
    return {"queries": len(queries), "inside_some_ball": int(inside.sum()),
            "same_entry": int((fired[inside] == exact[inside]).sum()),
            "recall": round(float((fired[inside] == exact[inside]).double().mean()), 5),
            "index_fired_outside_exact": int((hit & ~inside).sum()),
            "fired_failing_radius_float64": int((d64 > book.radii[fired[hit]].double() + 1e-6).sum())}


def lookup_latency(book: Any, queries: Any, batch: int, calls: int) -> dict[str, float]:
    """Median ms per `lookup` call at `batch` queries, index and exact scan alternating."""
    timings: dict[str, list[float]] = {"indexed": [], "exact": []}
    for call in range(calls):
        chunk = queries[(call * batch) % (len(queries) - batch) :][:batch]
        for how, run in (("indexed", book.indexed_lookup), ("exact", book.exact_lookup)):
            tick = time.perf_counter()
            run(chunk)
            timings[how].append(time.perf_counter() - tick)
    return {f"{how}_ms": round(1e3 * median(t), 2) for how, t in timings.items()}


def realistic_recall(sizes: list[int], din: int, key_kind: str, settings: Any, queries: int, seed: int) -> list[Any]:
    import torch

    from editor.codebook import CodebookSpec

    spec = CodebookSpec("synthetic", "layer", din, 4, "cosine")
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(seed)
        if key_kind == "topics":
            keys, answers, nearest = topic_keys(size, din, generator)
        else:
            keys = torch.randn(size, din, generator=generator)
            answers = torch.randint(0, 1000, (size,), generator=generator)
            nearest = nearest_other_answer(keys, answers)
        book = realistic_book(spec, keys, answers, nearest, generator)
        book.configure_index(settings)
        tick = time.perf_counter()
        built = book.build_index()
        row = {"keys": key_kind, "entries": len(book), "input_size": din,
               "build_seconds": round(time.perf_counter() - tick, 1),
               "wide_entries": int(len(built.wide_rows(book.radii))), "self_recall": built.self_recall,
               "index_bytes_per_entry": round(built.memory_bytes() / len(book))}
        row.update(agreement(book, realistic_queries(book, queries, generator)))
        for batch in (1, 16):
            row[f"batch_{batch}"] = lookup_latency(book, realistic_queries(book, 400, generator), batch, 41)
        print("realistic recall", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def demo_recall(count: int, test_count: int, settings: Any, seed: int) -> dict[str, Any]:
    """Recall on the demo model's real keys (`Editor.keys`): `count` easy-VQA training prompts as
    entries with their own answers, each radius 0.3 to 0.9 times the distance to the nearest key
    with another answer (as the overlap rule leaves them), queried by `test_count` test-set prompts
    (new images and questions), by perturbed keys and by points towards neighbouring keys."""
    import easy_vqa
    import torch

    import editor

    backbone = editor.load_backbone("demo")

    def keys_of(questions: Any, paths: Any, number: int) -> Any:
        with editor.Editor(backbone) as ed:
            blocks = [ed.keys([backbone.query(paths[questions[2][i]], questions[0][i])
                               for i in range(start, min(number, start + 64))]) for start in range(0, number, 64)]
            return ed.spec, torch.cat(blocks)  # (number, Din)

    questions = easy_vqa.get_train_questions()
    spec, keys = keys_of(questions, easy_vqa.get_train_image_paths(), count)
    _, test_keys = keys_of(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), test_count)
    generator = torch.Generator().manual_seed(seed)
    codes = {answer: i for i, answer in enumerate(sorted(set(questions[1])))}
    answers = torch.tensor([codes[a] for a in questions[1][:count]])  # (N,)
    book = realistic_book(spec, keys, answers, nearest_other_answer(keys, answers), generator)
    book.configure_index(settings)
    tick = time.perf_counter()
    book.build_index()
    build = time.perf_counter() - tick
    exact, _ = book.exact_lookup(test_keys)
    fired, _ = book.indexed_lookup(test_keys)
    inside = exact >= 0
    return {"entries": count, "input_size": spec.input_size, "distance": spec.distance,
            "build_seconds": round(build, 1), "wide_entries": int(len(book.build_index().wide_rows(book.radii))),
            "self_recall": book.build_index().self_recall,
            "test_prompts": {"queries": test_count, "inside_some_ball": int(inside.sum()),
                             "same_entry": int((fired[inside] == exact[inside]).sum()),
                             "index_fired_outside_exact": int(((fired >= 0) & ~inside).sum())},
            "perturbed_keys": recall(book, 2000, generator),
            "stepped_or_towards_neighbours": agreement(book, realistic_queries(book, 2000, generator))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10000,100000,1000000")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--build-threads", type=int, default=0, help="index build threads (0: every core)")
    parser.add_argument("--expansion-add", type=int, default=None,
                        help="HNSW candidate list while inserting (default: IndexSettings' own)")
    parser.add_argument("--expansion-search", type=int, default=None,
                        help="HNSW candidate list while searching (default: IndexSettings' own)")
    parser.add_argument("--connectivity", type=int, default=None,
                        help="HNSW edges per node (default: IndexSettings' own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-recall", type=int, default=0,
                        help="only measure recall on this many of the demo model's real keys (writes --out)")
    parser.add_argument("--realistic-recall", default="",
                        help="only measure recall with realistic radii at these sizes (writes --out)")
    parser.add_argument("--keys", choices=["topics", "uniform"], default="topics",
                        help="synthetic keys for --realistic-recall")
    parser.add_argument("--input-size", type=int, default=2048, help="key width for --realistic-recall")
    parser.add_argument("--quick", action="store_true", help="0/1000/5000 entries, demo model, 2 repeats")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lookup_index.json"))
    parser.add_argument("--raw", type=Path, default=Path("bench/out/lookup_index_raw.json"))
    args = parser.parse_args()
    model_name = "llava100m"
    if args.quick:
        model_name, args.sizes, args.repeats, args.recall_queries = "demo", "0,1000,5000", 2, 200

    import torch
    from easy_vqa import get_train_image_paths

    import editor
    from editor.ann import IndexSettings
    from kb_daemon.demo import QUESTION

    torch.set_num_threads(args.threads)
    settings = IndexSettings(threshold=0, build_threads=args.build_threads)
    for name in ("expansion_add", "expansion_search", "connectivity"):
        if getattr(args, name) is not None:
            settings = dataclasses.replace(settings, **{name: getattr(args, name)})
    if args.realistic_recall:
        rows = realistic_recall([int(s) for s in args.realistic_recall.split(",")], args.input_size, args.keys,
                                settings, args.recall_queries, args.seed)
        report = {"benchmark": "lookup_index_realistic_recall", "index_settings": dataclasses.asdict(settings),
                  "rows": rows, "machine": machine_facts()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        return
    if args.demo_recall:
        demo = demo_recall(args.demo_recall, 3000, settings, args.seed)
        report = {"benchmark": "lookup_index_demo_recall", "index_settings": dataclasses.asdict(settings), **demo,
                  "machine": machine_facts()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    generator = torch.Generator().manual_seed(args.seed)
    backbone = load_model(model_name)
    paths = get_train_image_paths()
    images = [paths[i] for i in sorted(paths)[: max(batches)]]
    report: dict[str, Any] = {"benchmark": "lookup_index", "quick": args.quick, "model": model_name,
                              "new_tokens": NEW_TOKENS, "sizes": sizes, "batches": batches, "repeats": args.repeats}
    raw: dict[str, Any] = {}
    with editor.Editor(backbone) as ed:
        spec = ed.spec
        report["layer"], report["input_size"] = ed.layer, spec.input_size
        encoded = {b: backbone.encode([backbone.query(images[i], QUESTION) for i in range(b)]) for b in batches}
        query_keys = {b: ed.keys([backbone.query(images[i], QUESTION) for i in range(b)]) for b in batches}
        tick = time.perf_counter()
        keys, radii = make_keys(torch.cat(list(query_keys.values())), max(sizes), generator)
        report["key_generation_seconds"] = round(time.perf_counter() - tick, 1)
        values = torch.randn(NEW_TOKENS, spec.output_size, generator=generator) * 0.1  # (L, Dout)
        report["index_settings"] = dataclasses.asdict(settings)

        books: dict[tuple[str, int], Any] = {}
        index_rows = []
        for size in sizes:
            exact = synthetic_codebook(spec, {}, keys[:size], radii[:size], values)
            exact.configure_index(None)
            books[("exact", size)] = exact
            if size == 0:
                continue
            indexed = synthetic_codebook(spec, {}, keys[:size], radii[:size], values)
            indexed.configure_index(settings)
            tick = time.perf_counter()
            built = indexed.build_index()
            seconds = time.perf_counter() - tick
            books[("indexed", size)] = indexed
            index_rows.append({"entries": size, "build_seconds": round(seconds, 1),
                               "index_bytes_per_entry": round(built.memory_bytes() / size),
                               "key_bytes_per_entry": spec.input_size * 4,
                               "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
            print(f"index over {size} entries: {seconds:.1f} s, {built.memory_bytes() / size:.0f} B/entry", flush=True)
        report["index"] = index_rows

        report["recall"] = []
        for size in sizes:
            if size:
                tick = time.perf_counter()
                row = {"entries": size, **recall(books[("indexed", size)], args.recall_queries, generator)}
                row["seconds"] = round(time.perf_counter() - tick, 1)
                report["recall"].append(row)
                print("recall", row, flush=True)

        def forward(b: int) -> Any:
            batch, inputs = encoded[b], backbone.model_inputs(encoded[b])

            def run() -> Any:
                with torch.no_grad(), ed.adapter.scope(batch.key_positions) as state:
                    backbone.model(**inputs, use_cache=False)
                return state

            return run

        def generate(b: int) -> Any:
            batch, inputs = encoded[b], backbone.model_inputs(encoded[b])
            inputs.pop("position_ids", None)

            def run() -> Any:
                with torch.no_grad(), ed.adapter.scope(batch.key_positions) as state:
                    backbone.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                            do_sample=False, num_beams=1, eos_token_id=backbone.eos_token_id,
                                            pad_token_id=backbone.pad_token_id, use_cache=True)
                return state

            return run

        runners = {(b, "forward"): forward(b) for b in batches} | {(b, "generate"): generate(b) for b in batches}
        cases = [(b, how, size) for b in batches for (how, size) in books]
        for b, how, size in cases:  # warm up; nothing may fire
            ed.load_codebook(books[(how, size)])
            state = runners[(b, "forward")]()
            if bool((state.fired >= 0).any()):
                raise AssertionError(f"batch {b} {how} {size}: an entry fired")
        inner = {}
        for key, runner in runners.items():
            ed.load_codebook(books[("exact", 0)])
            tick = time.perf_counter()
            runner()
            inner[key] = max(1, math.ceil(MIN_SAMPLE_SECONDS / (time.perf_counter() - tick)))

        timings: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            for b, how, size in cases:
                book = books[(how, size)]
                ed.load_codebook(book)
                for what in ("forward", "generate"):
                    tick = time.perf_counter()
                    for _ in range(inner[(b, what)]):
                        runners[(b, what)]()
                    timings.setdefault(f"{b}/{how}/{size}/{what}", []).append(
                        (time.perf_counter() - tick) / inner[(b, what)])
                if size:
                    calls = max(1, inner[(b, "forward")])
                    tick = time.perf_counter()
                    for _ in range(calls):
                        book.lookup(query_keys[b])
                    timings.setdefault(f"{b}/{how}/{size}/lookup", []).append((time.perf_counter() - tick) / calls)
            print(f"repeat {repeat + 1} of {args.repeats} done", flush=True)
        raw["timings"] = timings

        rows = []
        for b, how, size in cases:
            row: dict[str, Any] = {"batch": b, "lookup": how if size else "none", "entries": size}
            for what in ("forward", "generate"):
                seconds = median(timings[f"{b}/{how}/{size}/{what}"])
                base = median(timings[f"{b}/exact/0/{what}"])
                row[f"{what}_seconds"] = round(seconds, 4)
                row[f"{what}_overhead_percent"] = round(100.0 * (seconds / base - 1.0), 1)
            if size:
                row["lookup_seconds"] = round(median(timings[f"{b}/{how}/{size}/lookup"]), 6)
                row["lookup_percent_of_forward"] = round(
                    100.0 * row["lookup_seconds"] / median(timings[f"{b}/exact/0/forward"]), 2)
            rows.append(row)
        report["rows"] = rows
    report["machine"] = machine_facts(max_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    for path, data in ((args.out, report), (args.raw, {**report, **raw})):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Lookup overhead, exact scan and index ({report['model']}, {report['repeats']} repeats, medians; "
        f"generate = {report['new_tokens']} forced new tokens)",
        "",
        "| batch | entries | lookup | forward s | forward +% | generate s | generate +% | lookup alone s "
        "| lookup % of forward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['batch']} | {row['entries']} | {row['lookup']} | {row['forward_seconds']:.4f} "
            f"| {row['forward_overhead_percent']:+.1f} | {row['generate_seconds']:.4f} "
            f"| {row['generate_overhead_percent']:+.1f} | {row.get('lookup_seconds', '')} "
            f"| {row.get('lookup_percent_of_forward', '')} |")
    lines += ["", "| entries | index build s | index bytes/entry | float32 key bytes/entry |", "|---|---|---|---|"]
    for row in report["index"]:
        lines.append(f"| {row['entries']} | {row['build_seconds']} | {row['index_bytes_per_entry']} "
                     f"| {row['key_bytes_per_entry']} |")
    lines += ["", "| entries | queries inside a ball | same entry as exact | recall | fired outside exact "
              "| fired failing radius (float64) |", "|---|---|---|---|---|---|"]
    for row in report["recall"]:
        lines.append(f"| {row['entries']} | {row['inside_some_ball']} | {row['same_entry']} | {row['recall']} "
                     f"| {row['index_fired_outside_exact']} | {row['fired_failing_radius_float64']} |")
    machine = report["machine"]
    lines += ["", f"Machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s), "
              f"load average at the end {machine['load_average'][0]:.1f}, peak RSS {machine['max_rss_gib']} GiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
