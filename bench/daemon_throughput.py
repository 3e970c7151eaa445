"""Daemon throughput: facts per minute through the real queue against the same facts applied in process.

The same N facts (easy-VQA training images, "what shape is in the image?" renamed) go
* in process: one `editor.Editor` on the demo model with the demo registration's settings
  (default hyperparameters, the easy-VQA reference pool), applied one after another;
* through the daemon, submitted with `kbctl submit-fact` (one job and one version per fact) and,
  separately, with `kbctl ingest` (one batch job), to a real `kbctl up` worker process on a fresh
  SQLite installation, like tests/daemon_harness.py does.

Both sides are warmed up first with one extra fact (model load, reference-pool index), so the
figures compare steady states. The daemon's time runs from the first submission to the moment the
last job finished (from the job table). Overhead = daemon seconds / in-process seconds - 1.
Both sides also report the median optimisation steps and the sum of `EditReport.seconds` (the
editor's own time per fact, from the job results on the daemon side): equal steps show both sides
did the same work. On a shared machine the editor's own time varies by 10-20% between runs with
the load of other work, which swamps the daemon's cost when runs are compared across; so each run
also gives `beyond_editor_percent` = its seconds / its apply seconds - 1, the time the queue,
storage and commits add within that same run (about 0 in process).

    python bench/daemon_throughput.py --out bench/results/daemon_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from machine import machine_facts  # bench/ is sys.path[0] when a script runs

NAMES = ["oblong box", "ring", "wedge", "aqua marine", "kitty"]


def facts(count: int) -> list[tuple[Path, str, str]]:
    """(image, question, answer) for `count` facts plus one warm-up fact (last)."""
    from easy_vqa import get_train_image_paths

    from kb_daemon.demo import QUESTION

    paths = get_train_image_paths()
    images = [Path(paths[i]) for i in sorted(paths)[: count + 1]]
    return [(image, QUESTION, NAMES[i % len(NAMES)]) for i, image in enumerate(images)]


def in_process(chosen: list[tuple[Path, str, str]], pool: str, threads: int) -> dict[str, Any]:
    import torch

    import editor
    from kb_daemon.runtime import load_reference_pool

    torch.set_num_threads(threads)
    backbone = editor.load_backbone("demo")
    *measured, warm = chosen
    with editor.Editor(backbone, reference_pool=load_reference_pool(pool)) as ed:
        ed.apply(editor.Fact(warm[0], warm[1], warm[2]))
        tick = time.perf_counter()
        reports = [ed.apply(editor.Fact(image, question, answer)) for image, question, answer in measured]
        seconds = time.perf_counter() - tick
    return {"seconds": seconds, "steps_median": statistics.median(r.steps for r in reports),
            "apply_seconds_sum": sum(r.seconds for r in reports)}


class Daemon:
    """A throwaway kb-daemon installation (SQLite) with one `kbctl up` worker process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {"KB_HOME": str(home), "KB_DATABASE_URL": f"sqlite:///{home / 'kb.sqlite3'}",
                    "KB_BROKER_URL": f"sqla+sqlite:///{home / 'broker.sqlite3'}", "KB_MODEL": "bench",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.worker: subprocess.Popen[bytes] | None = None
        self.engine: Any = None

    def kbctl(self, *args: str) -> Any:
        from click.testing import CliRunner

        from kb_daemon.cli import cli

        result = CliRunner().invoke(cli, [*args, "--json"], env=self.env, catch_exceptions=False)
        if result.exit_code != 0:
            raise RuntimeError(f"kbctl {' '.join(args)} -> {result.exit_code}: {result.output}\n{self.log()}")
        return json.loads(result.stdout)

    def start(self, threads: int) -> None:
        log = open(self.home / "worker.log", "wb")
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(threads)}
        self.worker = subprocess.Popen([sys.executable, "-m", "kb_daemon.cli", "up"], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()

    def log(self) -> str:
        path = self.home / "worker.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def jobs(self) -> list[dict[str, Any]]:
        from sqlalchemy import create_engine, text

        if self.engine is None:  # one engine for all polls: the poller should cost the worker little CPU
            self.engine = create_engine(self.env["KB_DATABASE_URL"])
        with self.engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT id, kind, status, created_at, started_at, finished_at, result FROM jobs ORDER BY id"
            )).mappings().all()
        return [dict(r) for r in rows]

    def wait_done(self, job_ids: list[int], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in self.jobs() if j["id"] in job_ids]
            failed = [j for j in jobs if j["status"] == "failed"]
            if failed:
                raise RuntimeError(f"jobs failed: {failed}\n{self.log()}")
            if len(jobs) == len(job_ids) and all(j["status"] == "done" for j in jobs):
                return jobs
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for jobs {job_ids}\n{self.log()}")


def parse_time(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def through_daemon(chosen: list[tuple[Path, str, str]], mode: str, pool: str, threads: int,
                   timeout: float) -> dict[str, Any]:
    *measured, warm = chosen
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="kb-throughput-")))
    daemon.kbctl("init")
    daemon.kbctl("model", "add", "bench", "demo", "--reference-pool", pool)
    daemon.start(threads)
    try:
        first = daemon.kbctl("submit-fact", "--image", str(warm[0]), "--question", warm[1], "--answer", warm[2],
                             "--wait", "--timeout", str(timeout))
        assert first["version"] == 1, first
        started = datetime.now(timezone.utc)
        tick = time.perf_counter()
        if mode == "submit-fact":
            job_ids = [daemon.kbctl("submit-fact", "--image", str(image), "--question", question,
                                    "--answer", answer)["job_id"] for image, question, answer in measured]
        else:
            # Ingestion reads images relative to the source file and refuses paths outside its folder.
            source = daemon.home / "facts.jsonl"
            lines = []
            for image, question, answer in measured:
                shutil.copyfile(image, daemon.home / image.name)
                lines.append(json.dumps({"image": image.name, "question": question, "answer": answer}) + "\n")
            source.write_text("".join(lines))
            job_ids = [daemon.kbctl("ingest", str(source))["job_id"]]
        submit_seconds = time.perf_counter() - tick
        jobs = daemon.wait_done(job_ids, timeout)
    finally:
        daemon.stop()
    finished = max(parse_time(j["finished_at"]) for j in jobs)
    working = sum((parse_time(j["finished_at"]) - parse_time(j["started_at"])).total_seconds() for j in jobs)
    seconds = (finished - started).total_seconds()
    reports = [r for j in jobs for r in json.loads(j["result"])["reports"]]
    return {"seconds": seconds, "submit_seconds": submit_seconds, "jobs": len(jobs),
            "job_seconds_sum": working, "waiting_seconds": seconds - working,
            "steps_median": statistics.median(r["steps"] for r in reports),
            "apply_seconds_sum": sum(r["seconds"] for r in reports)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=40)
    parser.add_argument("--modes", default="submit-fact,ingest", help="daemon paths: submit-fact, ingest")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-pool", default="easy-vqa", help="as the demo registration (quick: easy-vqa:8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (here and in the worker)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--quick", action="store_true", help="2 facts, 1 repeat, submit-fact only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/daemon_throughput.json"))
    args = parser.parse_args()
    if args.quick:
        args.facts, args.repeats, args.modes, args.reference_pool = 2, 1, "submit-fact", "easy-vqa:8"

    import torch

    torch.set_num_threads(args.threads)
    chosen = facts(args.facts)
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {"in_process": [], **{m: [] for m in modes}}
    for repeat in range(args.repeats):
        order = ["in_process", *modes] if repeat % 2 == 0 else [*modes, "in_process"]  # load drift hits both
        for what in order:
            if what == "in_process":
                runs[what].append(in_process(chosen, args.reference_pool, args.threads))
            else:
                runs[what].append(through_daemon(chosen, what, args.reference_pool, args.threads, args.timeout))

    base = statistics.median(r["seconds"] for r in runs["in_process"])
    summary = {}
    for what, samples in runs.items():
        seconds = statistics.median(r["seconds"] for r in samples)
        summary[what] = {
            "seconds_median": round(seconds, 3), "facts_per_minute": round(60.0 * args.facts / seconds, 2),
            "overhead_percent": round(100.0 * (seconds / base - 1.0), 1),
            "beyond_editor_percent": round(statistics.median(
                100.0 * (r["seconds"] / r["apply_seconds_sum"] - 1.0) for r in samples), 1),
            "apply_seconds_median": round(statistics.median(r["apply_seconds_sum"] for r in samples), 3),
            "samples": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in samples],
        }
    report = {
        "benchmark": "daemon_throughput", "quick": args.quick, "model": "demo", "facts": args.facts,
        "repeats": args.repeats, "database": "sqlite", "reference_pool": args.reference_pool, "summary": summary,
        "target": "daemon at most 15% slower than in process",
        "machine": machine_facts(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Daemon throughput (demo model, {report['facts']} facts, SQLite, medians of {report['repeats']})",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s), {machine['platform']}, "
        f"load average at the end {machine['load_average'][0]:.1f}.",
        "",
        "| path | seconds | facts per minute | overhead vs in process | editor's own seconds "
        "| beyond the editor, same run |",
        "|---|---|---|---|---|---|",
    ]
    for what, row in report["summary"].items():
        lines.append(f"| {what} | {row['seconds_median']:.2f} | {row['facts_per_minute']:.1f} | "
                     f"{row['overhead_percent']:+.1f}% | {row['apply_seconds_median']:.2f} | "
                     f"{row['beyond_editor_percent']:+.1f}% |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
