"""Version loads: the head cold (database only) and warm (cache file), and rollbacks, at 10k-100k entries.

Per size N, one SQLite database of synthetic entries shaped like the demo model's edited layer
(Din 512, Dout 128, 3-12 answer steps: 5.9 KB of float32 tensors per entry on average) and three
versions, recorded by `commit_changes` as a worker's commit records a job's new entries: version 1
holds N - 100 entries, version 2 adds 99, version 3 (the head) one more. The entries are written
in bulk (facts, entry blobs and entry rows inserted 5,000 rows per statement as they are made),
which is what makes 1M entries affordable to build. The keys are random normal vectors (pairwise
distances about 32) and the base radii 1-5, so no two balls overlap and the base radii are the
effective radii stored on the spans.

Measured, each a median of `--repeats` runs (the order of the operations is the same in every run):

* cold: `snapshot_cache.load_version` with no cache, i.e. `materialise_from` reading every blob:
  what `load_model` pays at a worker start, `kbctl ask` or a server start without a cache file;
* cache write: what follows a load from the database (or a worker's commit): `capture` (on the
  caller's thread) and `CodebookCache.write` (in a background thread in the runtime);
* warm: `load_version` with the cache file present (read in one go from the page cache: the file
  was just written, so this is not a cold disk read), i.e. the manifest rows from the database,
  the file's layout and payload digest checked, the codebook built over the file's buffer;
* rollback k: what a worker's rollback job does when it holds the head: `load_version` from the
  held codebook and its entry row ids to version 2 (k = 1) or 1 (k = 100) by their span changes
  (`materialise_changes`: the spans and blobs read are counted), then the commit of the changes
  against the version it held (`workers.runner._commit_changes`), alternating back to the head.
  For comparison, in the same run: the same move reading every span row (`load_version` with
  only the held codebook, "reuse") and the commit of the whole codebook (`entry_rows_for` +
  `commit_version`, flushed and then rolled back, so without the final COMMIT).

    OMP_NUM_THREADS=1 .venv/bin/python bench/version_loads.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from machine import machine_facts  # bench/ is sys.path[0] when a script runs

INPUT_SIZE, OUTPUT_SIZE = 512, 128  # the demo model's edited layer
TAIL = 100  # entries added after the first version (99 by version 2, 1 by version 3)


def build(home: Path, entries: int, seed: int) -> dict[str, Any]:
    """The database described in the module docstring; returns what the measurements need."""
    import torch
    from sqlalchemy import insert

    from editor.codebook import Entry as EditorEntry
    from editor.codebook import entry_tensors_to_bytes
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.models import Blob, Entry, Fact
    from kb_daemon.queue import get_model, lock_model, register_model
    from kb_daemon.snapshots import commit_changes, sha256

    url = f"sqlite:///{home / 'kb.sqlite3'}"
    db = Database(Settings(home=home, database_url=url, broker_url="memory://"))
    db.upgrade()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    with db.session() as session:
        model = register_model(session, "bench", "demo", actor="bench")
        model.spec = {"model_id": "bench", "layer": "layer", "input_size": INPUT_SIZE,
                      "output_size": OUTPUT_SIZE, "distance": "euclidean"}
        model.hparams = {}
    started = time.perf_counter()
    fact_ids: list[str] = []
    tensor_bytes = 0

    def add_entries(session: Any, model_id: int, count: int) -> dict[int, float]:
        """Insert `count` new entries, 5,000 rows per statement as they are made (a million entries'
        blobs are never held at once); return {entry row id: radius}."""
        nonlocal tensor_bytes
        added: dict[int, float] = {}
        for chunk_start in range(0, count, 5000):
            facts, blobs, rows = [], [], []
            for _ in range(min(5000, count - chunk_start)):
                i = len(fact_ids)
                fact_id = f"f-{i:08d}"
                steps = rng.randint(3, 12)
                entry = EditorEntry(fact_id, f"answer {i}", f"input-{i}",
                                    torch.randn(INPUT_SIZE, generator=generator),
                                    torch.randn(steps, OUTPUT_SIZE, generator=generator), rng.uniform(1, 5))
                data = entry_tensors_to_bytes(entry)
                digest = sha256(data)
                tensor_bytes += (INPUT_SIZE + steps * OUTPUT_SIZE) * 4
                facts.append({"id": fact_id, "model_id": model_id, "question": f"question {i}?",
                              "answer": f"answer {i}", "source": "bench", "actor": "bench", "status": "applied"})
                blobs.append({"sha256": digest, "kind": "entry", "size": len(data), "data": data})
                # Explicit row ids: entry i is row i + 1 (the table starts empty).
                rows.append({"id": i + 1, "model_id": model_id, "fact_id": fact_id, "blob_sha256": digest,
                             "answer": entry.answer, "input_id": entry.input_id, "base_radius": entry.base_radius})
                fact_ids.append(fact_id)
                added[i + 1] = entry.base_radius
            session.execute(insert(Fact), facts)
            session.execute(insert(Blob), blobs)
            session.execute(insert(Entry), rows)
        return added

    for count in (entries - TAIL, TAIL - 1, 1):
        with db.session() as session:  # recorded as a worker's commit records a job's new entries
            model = lock_model(session, get_model(session, "bench").id)
            added = add_entries(session, model.id, count)
            version = commit_changes(session, model, parent=model.head_version, kind="batch" if count > 1 else "edit",
                                     arriving=added, leaving=[], actor="bench", source="bench", job_id=None,
                                     summary={})
            assert version is not None
    return {"db": db, "home": home, "entries": entries, "head": 3, "tensor_bytes": tensor_bytes,
            "build_seconds": round(time.perf_counter() - started, 1)}


def timed(operation: Any, *args: Any) -> tuple[float, Any]:
    """(seconds, result) of operation(*args)."""
    tick = time.perf_counter()
    result = operation(*args)
    return time.perf_counter() - tick, result


def same(a: Any, b: Any) -> bool:
    """Equal codebooks, checked without serialising them (at 1M entries `to_bytes` would hold two
    more copies of 6 GB): entries, keys, radii, and every value row through one checksum."""
    import torch

    if a.fact_ids != b.fact_ids or not torch.equal(a.keys, b.keys) or not torch.equal(a.radii, b.radii):
        return False
    return all(torch.equal(a.values_of(i), b.values_of(i)) for i in range(0, len(a), max(1, len(a) // 1000)))


def measure(database: dict[str, Any], repeats: int, lean: bool = False) -> dict[str, Any]:
    from kb_daemon.queue import get_model, lock_model
    from kb_daemon.snapshot_cache import CodebookCache, capture, load_version
    from kb_daemon.snapshots import Materialised, commit_version, entry_rows_for, get_version, manifest_at
    from workers.runner import Change, Parent, _commit_changes

    db, head = database["db"], database["head"]
    cache = CodebookCache(database["home"] / "cache" / "codebooks", keep_versions=2)
    samples: dict[str, list[float]] = {}
    blobs: dict[str, list[int]] = {}
    sources: dict[str, set[str]] = {}

    def sample(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    for _ in range(repeats):
        cache.clear()
        with db.session() as session:
            model = get_model(session, "bench")
            number = model.head_version
            seconds, (cold, source) = timed(load_version, session, model, number, cache)
            assert source == "database" and len(cold.codebook) == database["entries"]
            sample("cold", seconds)
            seconds, snapshot = timed(capture, model, number, cold.codebook)
            sample("cache_capture", seconds)
            version, rows = get_version(session, model, number), manifest_at(session, model, number)
        seconds, path = timed(cache.write, snapshot, version, rows, model)
        sample("cache_write", seconds)
        file_bytes = path.stat().st_size
        with db.session() as session:
            model = get_model(session, "bench")
            seconds, (warm, source) = timed(load_version, session, model, number, cache)
            assert source == "cache" and same(warm.codebook, cold.codebook)
            sample("warm", seconds)
        del cold, snapshot  # at 1M entries each holds 6 GB
        held, held_number = Materialised(warm.codebook, warm.entry_ids, 0), number
        del warm
        for k, target in ((1, 2), (TAIL, 1)):
            for number in (target, head):  # away from the head's content by k entries, and back
                with db.session() as session:
                    model = get_model(session, "bench")
                    seconds, (moved, source) = timed(functools.partial(load_version, base=(held_number, held)),
                                                     session, model, number, None)
                    # A move across more span changes than the version holds reads it whole (tiny sizes).
                    assert len(moved.codebook) == database["entries"] - (number == target) * k
                    sources.setdefault(f"rollback_{k}_source", set()).add(source)
                    sample(f"rollback_{k}_load", seconds)
                    blobs.setdefault(f"rollback_{k}_blobs", []).append(moved.blobs_read)
                    blobs.setdefault(f"rollback_{k}_spans", []).append(moved.spans_read)
                if not lean:  # for comparison, the same move and its commit the earlier ways
                    with db.session() as session:  # reading every span row (and only the missing blobs)
                        model = get_model(session, "bench")
                        seconds, (reused, source) = timed(load_version, session, model, number, None, held.codebook)
                        assert source == "reuse" and same(reused.codebook, moved.codebook)
                        sample(f"rollback_{k}_load_reuse", seconds)
                        del reused
                    with db.session() as session:  # the commit of the whole codebook, then rolled back
                        tick = time.perf_counter()
                        model = lock_model(session, get_model(session, "bench").id)
                        commit_version(session, model, parent=model.head_version, kind="rollback",
                                       entries=entry_rows_for(session, model, moved.codebook.fact_ids),
                                       radii=moved.codebook.radii.tolist(), actor="bench", source="bench",
                                       job_id=None, summary={"rolled_back_to": number})
                        sample(f"rollback_{k}_commit_whole", time.perf_counter() - tick)
                        session.rollback()
                with db.session() as session:  # the worker's commit: the changes to the version it held
                    tick = time.perf_counter()
                    model = lock_model(session, get_model(session, "bench").id)
                    parent = Parent(held_number, held.codebook.fact_ids, held.entry_ids, held.codebook.radii.clone())
                    job = SimpleNamespace(id=None, actor="bench", source="bench")
                    recorded = _commit_changes(session, model, moved.codebook, parent, Change("rollback"), job,
                                               {"rolled_back_to": number})
                    assert recorded is not None
                    version, entry_ids = recorded
                    held_number = version.number
                sample(f"rollback_{k}_commit", time.perf_counter() - tick)
                held = Materialised(moved.codebook, entry_ids, 0)
    result: dict[str, Any] = {name: round(statistics.median(values), 4) for name, values in samples.items()}
    result.update({name: max(values) for name, values in blobs.items()})  # the way back reads the k blobs
    result.update({name: "/".join(sorted(values)) for name, values in sources.items()})
    result["runs"] = repeats
    result["cache_file_bytes"] = file_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="codebook sizes (entries at the head)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--lean", action="store_true",
                        help="skip the comparison paths (reading every span row, committing the whole codebook): "
                             "for 1M entries")
    parser.add_argument("--out", type=Path, default=Path("bench/results/version_loads.json"))
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "300,600", 2

    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="kb-version-loads-"))
    rows = []
    for entries in [int(s) for s in args.sizes.split(",")]:
        database = build(root / f"size-{entries}", entries, args.seed)
        measured = measure(database, args.repeats, args.lean)
        rows.append({"entries": entries, "tensor_bytes": database["tensor_bytes"],
                     "build_seconds": database["build_seconds"], **measured})
        database["db"].dispose()
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "benchmark": "version_loads",
        "quick": args.quick,
        "repeats": args.repeats,
        "input_size": INPUT_SIZE,
        "output_size": OUTPUT_SIZE,
        "database": "sqlite",
        "rows": rows,
        "per_entry_us": per_entry(rows),
        "machine": machine_facts(sqlite=sqlite3.sqlite_version),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def per_entry(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds per entry at the largest size, for each O(N) operation."""
    largest = rows[-1]
    return {name: round(largest[name] / largest["entries"] * 1e6, 2)
            for name in ("cold", "warm", "cache_capture", "cache_write", "rollback_1_load", "rollback_1_commit",
                         "rollback_100_load", "rollback_100_commit", "rollback_1_load_reuse",
                         "rollback_1_commit_whole") if name in largest}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Version loads (SQLite, medians of {report['repeats']} runs, seconds)",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s), {machine['platform']}, "
        f"SQLite {machine['sqlite']}, load average at the end {machine['load_average'][0]:.1f}.",
        "",
        "| entries | tensors MB | head cold (database) | head warm (cache) | cache capture + write | cache file MB "
        "| rollback 1: load (spans, blobs) + commit | rollback 100: load (spans, blobs) + commit "
        "| rollback 1 reading every row: load + whole commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['entries']:,} | {row['tensor_bytes'] / 1e6:.0f} | {row['cold']:.3f} | {row['warm']:.3f} "
            f"| {row['cache_capture']:.3f} + {row['cache_write']:.3f} | {row['cache_file_bytes'] / 1e6:.0f} "
            f"| {row['rollback_1_load']:.3f} ({row['rollback_1_spans']:.0f}, {row['rollback_1_blobs']:.0f}) "
            f"+ {row['rollback_1_commit']:.3f} "
            f"| {row['rollback_100_load']:.3f} ({row['rollback_100_spans']:.0f}, {row['rollback_100_blobs']:.0f}) "
            f"+ {row['rollback_100_commit']:.3f} "
            + (f"| {row['rollback_1_load_reuse']:.3f} + {row['rollback_1_commit_whole']:.3f} |"
               if "rollback_1_load_reuse" in row else "| not run (--lean) |")
        )
    lines += ["", "Microseconds per entry at the largest size: " + json.dumps(report["per_entry_us"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
