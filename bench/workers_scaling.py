"""Facts per minute on PostgreSQL with one worker serving one model and two workers serving two models.

One PostgreSQL server (initdb + pg_ctl from the Debian packages, as the tests start it, fsync off)
holds a fresh database per configuration; the broker is the same database (`sqla+postgresql`).
Two models are registered on the shipped demo model, `demo` and `demo-b`, both with the easy-VQA
reference pool. A worker serves one model (`kbctl worker --model NAME`), so:

* `1 worker`: one worker process for `demo`; N facts for `demo`;
* `2 workers`: one worker process per model; N facts for each model, both sources ingested at
  once, so the two workers edit side by side (each with `--threads` torch threads).

Each worker is warmed up first with one `kbctl submit-fact --wait` (model load, reference-pool
index). Then every served model gets one `kbctl ingest` of its N facts (one batch job each, the
nightly path) or, with `--mode submit-fact`, N `kbctl submit-fact` jobs. The time runs from the
first submission to the last job's `finished_at`; facts per minute = all facts / that time.
Scaling = the two-worker rate / the one-worker rate (2.0 would be perfect; this machine has
`cpus` cores, shared with the bench process and PostgreSQL).

    python bench/workers_scaling.py                      # 40 facts per model -> bench/results/workers_scaling.json
    python bench/workers_scaling.py --facts 2 --quick    # smoke run -> bench/out/workers_scaling-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon_throughput import Daemon, facts, parse_time  # bench/ is sys.path[0] when a script runs
from machine import machine_facts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MODELS = ("demo", "demo-b")


class PostgresDaemon(Daemon):
    """A throwaway installation on a PostgreSQL database with one `kbctl worker` per served model."""

    def __init__(self, home: Path, database_url: str) -> None:
        super().__init__(home)
        self.env.update({"KB_DATABASE_URL": database_url, "KB_BROKER_URL": "sqla+" + database_url,
                         "KB_MODEL": MODELS[0], "KB_POLLING_SECONDS": "0.2"})
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_workers(self, models: list[str], threads: int) -> None:
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(threads)}
        for name in models:
            log = open(self.home / f"worker-{name}.log", "wb")
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "kb_daemon.cli", "worker", "--model", name], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-2000:] for path in sorted(self.home.glob("worker-*.log")))


def write_source(folder: Path, chosen: list[tuple[Path, str, str]]) -> Path:
    """A JSON Lines source beside its images (ingestion refuses paths outside the source's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image, question, answer in chosen:
        shutil.copyfile(image, folder / image.name)
        lines.append(json.dumps({"image": image.name, "question": question, "answer": answer}) + "\n")
    source = folder / "facts.jsonl"
    source.write_text("".join(lines))
    return source


def run_configuration(server_url: str, served: list[str], per_model: int, mode: str, pool: str,
                      threads: int, timeout: float) -> dict[str, Any]:
    from daemon_harness import fresh_postgres_database

    pool_of_facts = facts(len(MODELS) * (per_model + 1))
    daemon = PostgresDaemon(Path(tempfile.mkdtemp(prefix="kb-scaling-")), fresh_postgres_database(server_url))
    daemon.kbctl("init")
    if pool != "easy-vqa":  # `kbctl init` registers the demo model with the easy-VQA pool
        daemon.kbctl("model", "set", MODELS[0], "--reference-pool", pool)
    daemon.kbctl("model", "add", MODELS[1], "demo", "--reference-pool", pool)
    daemon.start_workers(served, threads)
    try:
        chunks = {name: pool_of_facts[i * (per_model + 1):(i + 1) * (per_model + 1)] for i, name in enumerate(MODELS)}
        for name in served:  # one warm-up fact per worker, in parallel
            image, question, answer = chunks[name][-1]
            daemon.kbctl("submit-fact", "--model", name, "--image", str(image), "--question", question,
                         "--answer", answer)
        warm_jobs = [j["id"] for j in daemon.jobs()]
        daemon.wait_done(warm_jobs, timeout)
        sources = {name: write_source(daemon.home / f"source-{name}", chunks[name][:-1]) for name in served}
        started = datetime.now(timezone.utc)
        job_ids: dict[str, list[int]] = {name: [] for name in served}
        if mode == "ingest":
            for name in served:
                job_ids[name].append(daemon.kbctl("ingest", str(sources[name]), "--model", name)["job_id"])
        else:
            for i in range(per_model):
                for name in served:
                    image, question, answer = chunks[name][i]
                    job_ids[name].append(daemon.kbctl("submit-fact", "--model", name, "--image", str(image),
                                                      "--question", question, "--answer", answer)["job_id"])
        jobs = daemon.wait_done([j for ids in job_ids.values() for j in ids], timeout)
    finally:
        daemon.stop()
    by_id = {j["id"]: j for j in jobs}
    seconds = (max(parse_time(j["finished_at"]) for j in jobs) - started).total_seconds()
    per = {}
    for name, ids in job_ids.items():
        own = [by_id[i] for i in ids]
        own_seconds = (max(parse_time(j["finished_at"]) for j in own) - started).total_seconds()
        per[name] = {"facts": per_model, "seconds": round(own_seconds, 2),
                     "facts_per_minute": round(60.0 * per_model / own_seconds, 1)}
    total = per_model * len(served)
    return {"workers": len(served), "models_served": served, "facts": total, "seconds": round(seconds, 2),
            "facts_per_minute": round(60.0 * total / seconds, 1), "per_model": per}


def main() -> None:
    from pg_server import PostgresServer, require_bin_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=40, help="facts per served model")
    parser.add_argument("--mode", choices=["ingest", "submit-fact"], default="ingest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--reference-pool", default="easy-vqa")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true", help="a smaller reference pool (easy-vqa:8); for smoke runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.reference_pool = "easy-vqa:8"
    default = "out/workers_scaling-quick.json" if args.quick else "results/workers_scaling.json"
    out = args.out or ROOT / "bench" / default

    postgres = PostgresServer(require_bin_dir())
    server_url = postgres.start()
    try:
        runs = [run_configuration(server_url, list(MODELS[:count]), args.facts, args.mode, args.reference_pool,
                                  args.threads, args.timeout) for count in (1, 2)]
    finally:
        postgres.stop()
    one, two = runs
    report = {"benchmark": "workers_scaling", "database": "postgresql (fsync off)", "model": "demo",
              "mode": args.mode, "facts_per_model": args.facts, "threads_per_worker": args.threads,
              "reference_pool": args.reference_pool, "runs": runs,
              "scaling": round(two["facts_per_minute"] / one["facts_per_minute"], 2),
              "machine": machine_facts(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
