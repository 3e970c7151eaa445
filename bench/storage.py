"""Storage benchmark: bytes in the database after N sequential changes, and materialise time.

Runs the real snapshot code (content-addressed entry blobs, spans, versions) against a real
database with entries shaped like the demo model's edited layer (Din = MLP width, Dout = hidden,
3-12 answer steps). The values are random: storage does not depend on how they were trained.
By default every change is an edit (1,000 sequential edits); `--churn` makes 5% of
the changes retracts and 5% rollbacks to one of the last five versions.

    python bench/storage.py --edits 1000 --out bench/results/storage.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--input-size", type=int, default=512, help="Din of the edited layer (demo: 512)")
    parser.add_argument("--output-size", type=int, default=128, help="Dout of the edited layer (demo: 128)")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--churn", action="store_true", help="mix in retracts and rollbacks")
    parser.add_argument("--quick", action="store_true", help="30 changes (seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/storage.json"))
    args = parser.parse_args()
    if args.quick:
        args.edits = 30

    from sqlalchemy import func, select

    from editor.codebook import Entry as EditorEntry
    from editor.codebook import entry_tensors_to_bytes
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.models import Blob, Entry, EntrySpan, Fact, Version
    from kb_daemon.queue import FactInput, get_model, lock_model, record_fact, register_model
    from kb_daemon.snapshots import commit_version, entries_at, entry_rows_for, materialise, store_entry

    home = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    url = args.database_url or f"sqlite:///{home / 'kb.sqlite3'}"
    db = Database(Settings(home=home, database_url=url, broker_url="memory://"))
    db.upgrade()
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    spec = {"model_id": "bench", "layer": "layer", "input_size": args.input_size,
            "output_size": args.output_size, "distance": "euclidean"}
    with db.session() as session:
        model = register_model(session, "bench", "demo", actor="bench")
        model.spec = spec

    live: list[str] = []  # fact ids of the head version, in codebook order
    started = time.perf_counter()
    counts = {"edit": 0, "retract": 0, "rollback": 0}
    for step in range(args.edits):
        with db.session() as session:
            model = lock_model(session, get_model(session, "bench").id)
            head = model.head_version
            roll = rng.random()
            if args.churn and roll < 0.05 and live:
                kind = "retract"
                live.remove(rng.choice(live))
            elif args.churn and roll < 0.10 and head > 5:
                kind = "rollback"
                live = [e.fact_id for e in entries_at(session, model, rng.randrange(head - 5, head))]
            else:
                kind = "edit"
                fact = record_fact(session, model, FactInput(None, f"question {step}?", f"answer {step}"),
                                   actor="bench", source="bench")
                steps = rng.randint(3, 12)
                entry = EditorEntry(fact.id, f"answer {step}", f"input-{step}",
                                    torch.randn(args.input_size, generator=generator),
                                    torch.randn(steps, args.output_size, generator=generator), rng.uniform(1, 5))
                store_entry(session, model, entry)
                live.append(fact.id)
            counts[kind] += 1
            rows = entry_rows_for(session, model, live)
            commit_version(session, model, parent=head, kind=kind, entries=rows, actor="bench", source="bench",
                           job_id=None, summary={})
    build_seconds = time.perf_counter() - started

    with db.session() as session:
        model = get_model(session, "bench")
        head = model.head_version
        final = materialise(session, model, head)
        tensor_bytes = sum(len(entry_tensors_to_bytes(e)) for e in final.entries)
        raw_tensor_bytes = sum(e.key.numel() * 4 + e.values.numel() * 4 for e in final.entries)
        blob_bytes = session.execute(select(func.sum(Blob.size))).scalar() or 0
        table_rows = {name: session.execute(select(func.count()).select_from(table)).scalar()
                      for name, table in (("versions", Version), ("entries", Entry), ("entry_spans", EntrySpan),
                                          ("facts", Fact), ("blobs", Blob))}
        timings = []
        for number in sorted({0, 1, head // 4, head // 2, head - 1, head} | set(rng.sample(range(head + 1), 5))):
            tick = time.perf_counter()
            codebook = materialise(session, model, number)
            timings.append({"version": number, "entries": len(codebook), "seconds": time.perf_counter() - tick})
    database_bytes = None
    if url.startswith("sqlite"):
        db.engine.dispose()
        import sqlite3

        connection = sqlite3.connect(home / "kb.sqlite3")
        connection.execute("VACUUM")
        connection.close()
        database_bytes = os.path.getsize(home / "kb.sqlite3")
    metadata_bytes = (database_bytes - blob_bytes) if database_bytes else None
    report = {
        "benchmark": "storage", "quick": args.quick, "changes": args.edits, "churn": args.churn, "counts": counts,
        "database": url.split(":", 1)[0],
        "head_version": head, "final_entries": len(final),
        "final_tensor_bytes": tensor_bytes, "final_raw_tensor_bytes": raw_tensor_bytes,
        "blob_bytes": blob_bytes, "database_bytes": database_bytes,
        "blob_to_final_tensor_ratio": round(blob_bytes / tensor_bytes, 3),
        "metadata_bytes": metadata_bytes,
        "metadata_bytes_per_version": round(metadata_bytes / (head + 1)) if metadata_bytes else None,
        "rows": table_rows, "build_seconds": round(build_seconds, 2),
        "materialise_seconds": timings,
        "materialise_max_seconds": round(max(t["seconds"] for t in timings), 4),
        "materialise_median_seconds": round(statistics.median(t["seconds"] for t in timings), 4),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("final_entries", "final_tensor_bytes", "blob_bytes", "database_bytes",
                                             "blob_to_final_tensor_ratio", "metadata_bytes_per_version",
                                             "materialise_max_seconds", "build_seconds")}, indent=2))


if __name__ == "__main__":
    main()
