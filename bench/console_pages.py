"""Server time of each console page with 10,000 versions and 10,000 facts in the database.

Seeds a throwaway SQLite database (or --database-url) with one model whose history is N edits (each
adds one fact, so version i holds i entries), 200 finished jobs, and a fact image; then requests each
page through the ASGI app in process, logged in with an admin token, and reports the median and
maximum over --repeat requests. Writes bench/results/console_pages.json.

    .venv/bin/python bench/console_pages.py            # 10,000 versions and facts, ~1 min
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from machine import machine_facts  # noqa: E402  (bench/ is sys.path[0] when a script runs)


def seed(db, count: int) -> tuple[str, str]:
    """Model 'bench' with `count` edit versions; returns (an admin token, a fact id in the middle)."""
    from PIL import Image

    from kb_daemon.models import Blob, Entry, EntrySpan, Fact, Job, Version, utcnow
    from kb_daemon.queue import register_model
    from kb_daemon.snapshots import sha256
    from kb_daemon.tokens import create_token

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, "PNG")
    image = buffer.getvalue()
    start = utcnow() - timedelta(days=30)
    with db.session() as session:
        model = register_model(session, "bench", "demo", actor="bench", source="bench")
        model.spec = {"model_id": "bench", "layer": "x", "input_size": 4, "output_size": 4, "distance": "cosine"}
        session.add(Blob(sha256=sha256(image), kind="image", size=len(image), data=image))
        session.add(Blob(sha256=sha256(b"entry"), kind="entry", size=5, data=b"entry"))
        session.flush()
        facts, entries, spans, versions = [], [], [], []
        for i in range(1, count + 1):
            fact_id = f"f-{i:016x}"
            when = start + timedelta(minutes=4 * i)
            facts.append(Fact(id=fact_id, model_id=model.id, image_sha256=sha256(image), question=f"question {i}?",
                              answer=f"answer {i}", rephrases=[f"rephrased {i}?"], negatives=[], source="bench",
                              actor="bench", submitted_at=when, status="applied", entered_version=i))
            entries.append(Entry(id=i, model_id=model.id, fact_id=fact_id, blob_sha256=sha256(b"entry"),
                                 answer=f"answer {i}", input_id=f"in-{i}", base_radius=0.05))
            spans.append(EntrySpan(model_id=model.id, entry_id=i, from_version=i, to_version=None, radius=0.05))
            versions.append(Version(model_id=model.id, number=i, parent=i - 1, kind="edit",
                                    summary={"added": [fact_id], "removed": [], "job": i}, content_sha256="0" * 64,
                                    num_entries=i, held=False, actor="bench", source="bench", job_id=i,
                                    created_at=when))
        session.add_all(facts)
        session.flush()
        session.add_all(entries)
        session.flush()
        session.add_all(spans + versions)
        for seq in range(count - 199, count + 1):
            when = start + timedelta(minutes=4 * seq)
            session.add(Job(model_id=model.id, seq=seq, kind="edit", status="done",
                            payload={"fact_id": f"f-{seq:016x}"}, result={"version": seq}, actor="bench",
                            source="bench", created_at=when,
                            started_at=when + timedelta(seconds=1), finished_at=when + timedelta(seconds=2),
                            progress_done=10, progress_total=10))
        model.head_version = count
        model.next_job_seq = count
    return create_token(db, "bench-admin", "admin", actor="bench").token, f"f-{count // 2:016x}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="versions and facts")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "console_pages.json"))
    parser.add_argument("--quick", action="store_true", help="300 versions, 2 repeats (seconds; for tests)")
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat = 300, 2

    from fastapi.testclient import TestClient

    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.server.app import ServerConfig, create_app

    home = Path(tempfile.mkdtemp(prefix="kb-console-bench-"))
    environ = {"KB_HOME": str(home)}
    if args.database_url:
        environ["KB_DATABASE_URL"] = args.database_url
    settings = Settings.from_env(environ)
    db = Database(settings)
    db.upgrade()
    tick = time.perf_counter()
    token, middle = seed(db, args.count)
    seeded = time.perf_counter() - tick
    n = args.count
    pages = {
        "models": "/ui/",
        "timeline (newest)": "/ui/models/bench/versions",
        "timeline (page at v5000)": f"/ui/models/bench/versions?before={n // 2}",
        "timeline live-at query": "/ui/models/bench/versions?at=" + "2026-01-01T00:00:00",
        "version (diff vs parent)": f"/ui/models/bench/versions/{n // 2}",
        "version (diff vs v0: 5,000 facts)": f"/ui/models/bench/versions/{n // 2}?against=0",
        "fact": f"/ui/models/bench/facts/{middle}",
        "jobs": "/ui/models/bench/jobs",
        "job": "/ui/models/bench/jobs/200",
        "submit form": "/ui/models/bench/submit",
        "rollback confirmation (to v5000)": f"/ui/models/bench/rollback?version={n // 2}",
        "thumbnail": None,
    }
    results = {}
    with TestClient(create_app(settings, ServerConfig(models=()))) as client:
        form = client.get("/ui/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
        assert client.post("/ui/login", data={"token": token, "csrf": csrf}, follow_redirects=False).status_code == 303
        fact_page = client.get(f"/ui/models/bench/facts/{middle}").text
        pages["thumbnail"] = "/ui/models/bench/images/" + re.search(r"images/([0-9a-f]{64})", fact_page).group(1)
        for label, path in pages.items():
            times = []
            for _ in range(args.repeat):
                tick = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - tick) * 1000)
                assert response.status_code == 200, (path, response.status_code, response.text[:300])
            results[label] = {"path": path, "median_ms": round(statistics.median(times), 1),
                              "max_ms": round(max(times), 1)}
            print(f"{label:40s} median {results[label]['median_ms']:7.1f} ms  max {results[label]['max_ms']:7.1f} ms")
    report = {"benchmark": "console_pages", "quick": args.quick, "machine": machine_facts(),
              "versions": n, "facts": n, "repeat": args.repeat, "database": "sqlite" if not args.database_url
              else "postgresql", "seed_seconds": round(seeded, 1), "pages": results,
              "target_ms": 100, "all_within_target": all(r["median_ms"] <= 100 for r in results.values())}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
