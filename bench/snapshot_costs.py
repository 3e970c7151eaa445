"""Snapshot costs: materialise a version, roll back and export, against history length and codebook size.

Two series of synthetic databases, built through the real snapshot code (facts, content-addressed
entry blobs, spans, versions; see bench/storage.py), entries shaped like the demo model's edited
layer (Din 512, Dout 128, 3-12 answer steps):

* history: a codebook of fixed size (100 entries) after 100, 1,000 and 10,000 versions: the first
  100 versions add one entry each, every later one replaces the oldest entry by a new one.
* size: 100 versions that grow the codebook evenly to 100, 1,000 and 10,000 entries.

Target: flat along the history series, linear along the size series. Measured per database:
`materialise` of the head and of the first full version (deep in the history), with the share spent
finding the rows (`entries_and_radii_at`) and reading the blobs (`get_blobs` + decode); the rest is
building the `editor.Codebook` from the radii stored on the spans (GRACE's overlap rule is applied
incrementally while the history is built, as a worker does, and not replayed when loading).
`spans` is the number of span rows of the model. `rollback`
does what the worker does (materialise the target, then record a new version holding its
entries), alternating between the previous head and the head. `export` runs `kbctl export` in process.

    python bench/snapshot_costs.py --out bench/results/snapshot_costs.json
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine_facts  # bench/ is sys.path[0] when a script runs

INPUT_SIZE, OUTPUT_SIZE = 512, 128  # the demo model's edited layer


def build(home: Path, entries: int, versions: int, growth: int, seed: int) -> dict[str, Any]:
    """A database of `versions` versions whose codebook grows evenly to `entries` entries over the
    first `growth` versions and then has its oldest entry replaced by a new one at every version."""
    import torch

    from editor.codebook import Codebook, CodebookSpec
    from editor.codebook import Entry as EditorEntry
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.queue import FactInput, get_model, lock_model, record_fact, register_model
    from kb_daemon.snapshots import commit_version, entry_rows_for, store_entry

    url = f"sqlite:///{home / 'kb.sqlite3'}"
    db = Database(Settings(home=home, database_url=url, broker_url="memory://"))
    db.upgrade()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    with db.session() as session:
        model = register_model(session, "bench", "demo", actor="bench")
        model.spec = {
            "model_id": "bench",
            "layer": "layer",
            "input_size": INPUT_SIZE,
            "output_size": OUTPUT_SIZE,
            "distance": "euclidean",
        }
    # The worker's in-memory codebook: it gives each version's effective radii.
    book = Codebook(CodebookSpec("bench", "layer", INPUT_SIZE, OUTPUT_SIZE, "euclidean"), {})
    live: list[str] = []
    made = 0
    started = time.perf_counter()
    per_session = 50  # versions per transaction while building (each version is still its own row set)
    for first in range(1, versions + 1, per_session):
        with db.session() as session:
            model = lock_model(session, get_model(session, "bench").id)
            for number in range(first, min(first + per_session, versions + 1)):
                if number <= growth:
                    adds = entries * number // growth - entries * (number - 1) // growth
                else:
                    book.remove(live.pop(0))
                    adds = 1
                for _ in range(adds):
                    fact = record_fact(
                        session,
                        model,
                        FactInput(None, f"question {made}?", f"answer {made}"),
                        actor="bench",
                        source="bench",
                    )
                    steps = rng.randint(3, 12)
                    entry = EditorEntry(
                        fact.id,
                        f"answer {made}",
                        f"input-{made}",
                        torch.randn(INPUT_SIZE, generator=generator),
                        torch.randn(steps, OUTPUT_SIZE, generator=generator),
                        rng.uniform(1, 5),
                    )
                    store_entry(session, model, entry)
                    book.add(entry)
                    live.append(fact.id)
                    made += 1
                assert book.fact_ids == live
                commit_version(
                    session,
                    model,
                    parent=model.head_version,
                    kind="edit",
                    entries=entry_rows_for(session, model, live),
                    radii=book.radii.tolist(),
                    actor="bench",
                    source="bench",
                    job_id=None,
                    summary={},
                )
    return {
        "db": db,
        "url": url,
        "home": home,
        "entries": entries,
        "versions": versions,
        "entries_stored": made,
        "build_seconds": round(time.perf_counter() - started, 2),
        "first_full_version": growth,
        "head": versions,
    }


def materialise_parts(db: Any, number: int) -> dict[str, float]:
    """Time `materialise` of a version, then (separately) its first two steps: rows and blobs."""
    from editor.codebook import entry_from_bytes
    from kb_daemon.queue import get_model
    from kb_daemon.snapshots import collector_paused, entries_at, get_blobs, materialise

    with db.session() as session:
        model = get_model(session, "bench")
        tick = time.perf_counter()
        codebook = materialise(session, model, number)
        total = time.perf_counter() - tick
    with db.session() as session, collector_paused():  # as materialise does
        model = get_model(session, "bench")
        tick = time.perf_counter()
        rows = entries_at(session, model, number)
        rows_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        blobs = get_blobs(session, [row.blob_sha256 for row in rows], "bench")
        for row in rows:
            entry_from_bytes(blobs[row.blob_sha256], row.fact_id, row.answer, row.input_id, row.base_radius)
        blobs_seconds = time.perf_counter() - tick
    return {
        "seconds": total,
        "rows_seconds": rows_seconds,
        "blobs_seconds": blobs_seconds,
        "codebook_seconds": max(0.0, total - rows_seconds - blobs_seconds),
        "entries": len(codebook),
    }


def span_count(db: Any) -> int:
    from sqlalchemy import func, select

    from kb_daemon.models import EntrySpan

    with db.session() as session:
        return int(session.execute(select(func.count()).select_from(EntrySpan)).scalar_one())


def rollback(db: Any, target: int) -> dict[str, float]:
    """What the worker does for `kbctl rollback`: materialise the target, record a new head version."""
    from kb_daemon.queue import get_model, lock_model
    from kb_daemon.snapshots import commit_version, entry_rows_for, materialise

    tick = time.perf_counter()
    with db.session() as session:
        codebook = materialise(session, get_model(session, "bench"), target)
    loaded = time.perf_counter() - tick
    with db.session() as session:
        model = lock_model(session, get_model(session, "bench").id)
        rows = entry_rows_for(session, model, codebook.fact_ids)
        commit_version(
            session,
            model,
            parent=model.head_version,
            kind="rollback",
            entries=rows,
            radii=codebook.radii.tolist(),
            actor="bench",
            source="bench",
            job_id=None,
            summary={"rolled_back_to": target},
        )
    total = time.perf_counter() - tick
    return {
        "seconds": total,
        "materialise_seconds": loaded,
        "commit_seconds": total - loaded,
        "entries": len(codebook),
    }


def export(database: dict[str, Any], number: int) -> dict[str, float]:
    """`kbctl export NUMBER DIR` in process."""
    from click.testing import CliRunner

    from kb_daemon.cli import cli

    target = database["home"] / "export"
    env = {
        "KB_HOME": str(database["home"]),
        "KB_DATABASE_URL": database["url"],
        "KB_MODEL": "bench",
        "KB_BROKER_URL": "memory://",
    }
    tick = time.perf_counter()
    result = CliRunner().invoke(
        cli, ["export", str(number), str(target), "--json"], env=env, catch_exceptions=False
    )
    seconds = time.perf_counter() - tick
    if result.exit_code != 0:
        raise RuntimeError(f"kbctl export failed: {result.output}")
    data = json.loads(result.stdout)
    return {"seconds": seconds, "entries": data["entries"], "bytes": data["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", default="100,1000,10000", help="versions in the history series")
    parser.add_argument(
        "--history-entries", type=int, default=100, help="codebook size in the history series"
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="codebook sizes in the size series")
    parser.add_argument("--size-versions", type=int, default=100, help="versions in the size series")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=60.0,
        help="stop repeating one operation on one database after this long (at least one run)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/snapshot_costs.json"))
    args = parser.parse_args()
    if args.quick:
        args.history, args.history_entries, args.sizes, args.size_versions, args.repeats = (
            "10,30",
            10,
            "10,30",
            10,
            2,
        )

    import torch

    torch.set_num_threads(args.threads)
    history = [int(h) for h in args.history.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    growth = min([args.history_entries, args.size_versions, *history])
    root = Path(tempfile.mkdtemp(prefix="kb-snapshot-costs-"))
    databases = []
    for versions in history:
        databases.append(
            (
                "history",
                build(
                    root / f"history-{versions}",
                    args.history_entries,
                    versions,
                    min(growth, versions),
                    args.seed,
                ),
            )
        )
    for entries in sizes:
        if entries == args.history_entries and args.size_versions in history:
            databases.append(("size", next(d for s, d in databases if d["versions"] == args.size_versions)))
            continue
        databases.append(
            (
                "size",
                build(
                    root / f"size-{entries}",
                    entries,
                    args.size_versions,
                    min(growth, args.size_versions),
                    args.seed,
                ),
            )
        )

    samples: dict[tuple[int, str], list[dict[str, float]]] = {}
    spent: dict[tuple[int, str], float] = {}
    for repeat in range(args.repeats):
        for index, (_series, database) in enumerate(databases):
            operations = {
                "materialise_head": lambda d=database: materialise_parts(d["db"], d["head"]),
                "materialise_first_full": lambda d=database: materialise_parts(
                    d["db"], d["first_full_version"]
                ),
                # Alternate between the previous head and the head: every rollback changes the content.
                "rollback": lambda d=database, r=repeat: rollback(
                    d["db"], d["head"] - 1 if r % 2 == 0 else d["head"]
                ),
                "export": lambda d=database: export(d, d["head"]),
            }
            if database["first_full_version"] == database["head"]:
                del operations["materialise_first_full"]  # the same version as the head
            for name, operation in operations.items():
                if spent.get((index, name), 0.0) > args.budget_seconds:
                    continue
                tick = time.perf_counter()
                samples.setdefault((index, name), []).append(operation())
                spent[(index, name)] = spent.get((index, name), 0.0) + time.perf_counter() - tick

    rows = []
    for index, (series, database) in enumerate(databases):
        row: dict[str, Any] = {
            "series": series,
            "versions": database["versions"],
            "entries": database["entries"],
            "entries_stored": database["entries_stored"],
            "spans": span_count(database["db"]),
            "build_seconds": database["build_seconds"],
        }
        for name in ("materialise_head", "materialise_first_full", "rollback", "export"):
            runs = samples.get((index, name)) or samples[(index, "materialise_head")]
            row[name] = {key: round(statistics.median(run[key] for run in runs), 5) for key in runs[0]}
            row[name]["samples"] = len(runs)
        rows.append(row)
        database["db"].engine.dispose()

    report = {
        "benchmark": "snapshot_costs",
        "quick": args.quick,
        "repeats": args.repeats,
        "budget_seconds": args.budget_seconds,
        "input_size": INPUT_SIZE,
        "output_size": OUTPUT_SIZE,
        "database": "sqlite",
        "rows": rows,
        "ratios": ratios(rows),
        "target": "flat in the history length, linear in the codebook size",
        "machine": machine_facts(sqlite=sqlite3.sqlite_version),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest over smallest database of each series, per operation.

    Ideal: 1 along the history series, the size ratio along the size series.
    """
    result: dict[str, Any] = {}
    for series in ("history", "size"):
        chosen = [r for r in rows if r["series"] == series]
        if len(chosen) < 2:
            continue
        small, large = chosen[0], chosen[-1]
        result[series] = {
            "from": {"versions": small["versions"], "entries": small["entries"]},
            "to": {"versions": large["versions"], "entries": large["entries"]},
            **{
                name: round(large[name]["seconds"] / small[name]["seconds"], 2)
                for name in ("materialise_head", "materialise_first_full", "rollback", "export")
            },
            "materialise_rows_part": round(
                large["materialise_head"]["rows_seconds"] / small["materialise_head"]["rows_seconds"], 2
            ),
            "materialise_blobs_part": round(
                large["materialise_head"]["blobs_seconds"] / small["materialise_head"]["blobs_seconds"], 2
            ),
        }
    return result


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Snapshot costs (SQLite, medians of up to {report['repeats']} runs, seconds)",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s), "
        f"{machine['platform']}, "
        f"SQLite {machine['sqlite']}, load average at the end {machine['load_average'][0]:.1f}.",
        "",
        "| series | versions | entries | spans | materialise head | of which rows / blobs / codebook | "
        "materialise first full version | rollback (materialise + commit) | export | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        head, first, back, out = (
            row[k] for k in ("materialise_head", "materialise_first_full", "rollback", "export")
        )
        lines.append(
            f"| {row['series']} | {row['versions']} | {row['entries']} | {row['spans']} "
            f"| {head['seconds']:.4f} | "
            f"{head['rows_seconds']:.4f} / {head['blobs_seconds']:.4f} / {head['codebook_seconds']:.4f} | "
            f"{first['seconds']:.4f} | {back['seconds']:.4f} ({back['materialise_seconds']:.4f} + "
            f"{back['commit_seconds']:.4f}) | {out['seconds']:.4f} "
            f"| {head['samples']}/{back['samples']}/{out['samples']} |"
        )
    lines += ["", "Ratios largest / smallest database of each series:", ""]
    for series, ratio in report["ratios"].items():
        lines.append(f"- {series}: {json.dumps(ratio)}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
