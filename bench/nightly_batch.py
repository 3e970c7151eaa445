"""A nightly batch of N new facts through the real queue on the demo model, with a real worker.

Builds a nightly source of N rows (easy-VQA train images, one image per row, each row a new
question/answer pair so every fact is new), starts `kbctl worker` as its own process, warms it up
with one `kbctl submit-fact --wait` (model, reference pool and hard-negative index loaded) and then
one small batch of `--warm-up-facts` other facts through `kbctl ingest` (the batch path's code,
caches and statements exercised once), runs `kbctl ingest` of the N facts, waits for the batch
job, and reports:

- wall time of the batch (ingest to job done) and facts per minute;
- the worker's resident memory (VmRSS, and the peak VmHWM, from /proc/<pid>/status) after the
  first fact, after the warm-up batch and after the batch, and the growth;
- the size in bytes of the codebook's tensors (keys + values + radii) after the warm-up and at the end.

The target: RSS growth over the batch no more than the codebook's growth over it (its N new
entries). The growth since the first fact, against the whole codebook, is reported too.

With the default KB_WORKER_RESTART_FACTS (1,000) the worker has applied more facts than that by
the end of the batch and restarts itself in place (same PID): "after the batch" is then read once
the restarted process has loaded the model and the new head. One more fact is applied after that
and the memory read again: the first edit of a process builds state (autograd, the hard-negative
index) that a freshly loaded worker does not hold yet. `--restart-facts 0` measures the worker
that keeps running instead.

    python bench/nightly_batch.py                 # 1,000 facts -> bench/results/nightly_batch.json
    python bench/nightly_batch.py --quick         # 20 facts    -> bench/out/nightly_batch-quick.json
    python bench/nightly_batch.py --facts 200 --out /tmp/nb.json
    python bench/nightly_batch.py --restart-facts 0 --out bench/out/nightly_batch-no-restart.json

`bench/results/` holds only the summaries the READMEs quote; other runs go to `bench/out/`, which
git ignores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KBCTL = [sys.executable, "-m", "kb_daemon.cli"]
WARM_UP_QUESTION = "what shape is in the image?"
# Memory is read from the idle worker: a job's status turns "done" at its commit, and the worker
# then returns freed memory to the system (workers.runner.release_free_memory) before it idles.
SETTLE_SECONDS = 2.0


@dataclass
class BatchMeasurement:
    facts: int
    job_status: str
    version: int
    batch_seconds: float
    facts_per_minute: float
    worker_pid: int
    warm_up_facts: int
    batch_job_id: int
    rss_after_first_fact_bytes: int
    rss_after_warm_up_bytes: int
    hwm_after_warm_up_bytes: int
    rss_after_batch_bytes: int
    hwm_after_batch_bytes: int
    rss_growth_bytes: int  # after the batch - after the warm-up batch
    rss_growth_since_first_fact_bytes: int
    codebook_entries: int
    codebook_tensor_bytes: int
    codebook_tensor_bytes_after_warm_up: int
    codebook_growth_bytes: int  # the batch's entries: final - after the warm-up batch
    codebook_keys_bytes: int
    codebook_values_bytes: int
    codebook_radii_bytes: int
    warm_up_seconds: float
    restart_facts: int  # the worker's KB_WORKER_RESTART_FACTS
    worker_restarted: bool  # it restarted in place after the batch; "after the batch" is the new process
    restart_seconds: float | None  # from the batch's commit to the restarted worker's model and head loaded
    rss_after_next_fact_bytes: int  # after one more fact, applied after the batch (version + 1)
    rss_growth_after_next_fact_bytes: int  # after that fact - after the warm-up batch
    codebook_growth_after_next_fact_bytes: int  # the batch's entries and that fact's
    codebook_records_bytes: int  # the Python objects the codebook keeps per entry (Codebook.memory_bytes)
    # The codebook's whole growth to that fact: its tensors and its per-entry records.
    codebook_footprint_growth_after_next_fact_bytes: int
    # Loading the head (the version after the batch and one more fact) in this process, medians of
    # 3: from the worker's cache file, and from the database alone (kb_daemon.snapshot_cache.load_version).
    head_load_warm_seconds: float
    head_load_cold_seconds: float
    head_load_warm_source: str
    rss_samples: list[tuple[int, int]]  # (facts done, VmRSS bytes) every few seconds during the batch
    fact_ids_in_version: list[str]
    fact_ids_submitted: list[str]

    @property
    def growth_within_codebook(self) -> bool:
        return self.rss_growth_bytes <= self.codebook_growth_bytes


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            number, unit = rest.split()
            assert unit == "kB", unit
            values[name] = int(number) * 1024
    return values


def write_source(folder: Path, facts: int, *, skip: int = 0, prefix: str = "nightly") -> list[dict[str, Any]]:
    """A nightly source of `facts` rows, each a new fact; the first `skip` (image, question) pairs
    are left to another source. Keys are `{prefix}-00000`, ...

    Rows take the first question of each easy-VQA train image outside the reference pool (the last
    `EASY_VQA_POOL_SIZE` images), then each image's second question, and so on: up to 3,880 rows
    every image is distinct; beyond that (the 10,000-fact batch) an image returns with another
    question."""
    from easy_vqa import get_train_image_paths, get_train_questions

    from kb_daemon.runtime import EASY_VQA_POOL_SIZE

    questions, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    per_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        per_image.setdefault(image_id, []).append((question, answer))
    images = sorted(per_image)[:-EASY_VQA_POOL_SIZE]
    rounds = max(len(pairs) for pairs in per_image.values())
    pairs = [(image_id, per_image[image_id][r]) for r in range(rounds) for image_id in images
             if r < len(per_image[image_id])]
    chosen = pairs[skip : skip + facts]
    if len(chosen) < facts:
        raise SystemExit(f"easy-VQA has {len(pairs)} (image, question) pairs outside the reference pool; "
                         f"asked for {skip + facts}")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image_id, (question, answer)) in enumerate(chosen):
        name = f"img{image_id:04d}.png"
        if not (folder / name).exists():
            (folder / name).write_bytes(Path(paths[image_id]).read_bytes())
        rows.append({"key": f"{prefix}-{i:05d}", "image": name, "question": question,
                     "answer": f"{answer} {i}"})
    (folder / "nightly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def warm_up_image(folder: Path, index: int = 0) -> Path:
    """An easy-VQA train image outside the batch's images: index 0 for the warm-up fact, 1 for the
    fact after the batch."""
    from easy_vqa import get_train_image_paths

    paths = get_train_image_paths()
    target = folder / f"single-{index}.png"
    target.write_bytes(Path(paths[len(paths) // 2 + index]).read_bytes())
    return target


def kbctl(env: dict[str, str], *args: str) -> Any:
    completed = subprocess.run([*KBCTL, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"kbctl {' '.join(args)} -> {completed.returncode}\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout) if "--json" in args else completed.stdout


def codebook_bytes(env: dict[str, str], model_name: str, version: int) -> dict[str, Any]:
    """Size of the tensors of `version`'s codebook, materialised from the database."""
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.queue import get_model
    from kb_daemon.snapshots import materialise

    db = Database(Settings.from_env(env))
    with db.session() as session:
        codebook = materialise(session, get_model(session, model_name), version)
    keys = codebook.keys.nbytes
    values = sum(codebook.values_of(i).nbytes for i in range(len(codebook)))
    radii = codebook.radii.nbytes
    return {"entries": len(codebook), "keys": keys, "values": values, "radii": radii,
            "tensors": keys + values + radii, "records": codebook.memory_bytes()["records"],
            "fact_ids": codebook.fact_ids}


def head_loads(env: dict[str, str], model_name: str, version: int, repeats: int = 3) -> dict[str, Any]:
    """Seconds to load `version`'s codebook warm (the cache file the worker wrote) and cold (the
    database alone), medians of `repeats`."""
    import statistics

    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.queue import get_model
    from kb_daemon.snapshot_cache import CodebookCache, load_version

    settings = Settings.from_env(env)
    db = Database(settings)
    cache = CodebookCache.for_settings(settings)
    times: dict[str, list[float]] = {"warm": [], "cold": []}
    sources = set()
    try:
        for _ in range(repeats):
            for kind, used in (("warm", cache), ("cold", None)):
                with db.session() as session:
                    started = time.perf_counter()
                    _, source = load_version(session, get_model(session, model_name), version, used)
                    times[kind].append(time.perf_counter() - started)
                if kind == "warm":
                    sources.add(source)
    finally:
        db.engine.dispose()
    return {"warm": round(statistics.median(times["warm"]), 3), "cold": round(statistics.median(times["cold"]), 3),
            "warm_source": "/".join(sorted(sources))}


def run(home: Path, facts: int, *, warm_up_facts: int = 50, timeout_seconds: float = 3600.0,
        restart_facts: int | None = None, log=print) -> BatchMeasurement:
    """Build the sources, start a worker, warm it up, ingest, wait; measure. Stops the worker."""
    from kb_daemon.config import DEFAULT_MODEL, Settings
    from kb_daemon.db import Database

    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KB_HOME": str(home), "KB_DATABASE_URL": f"sqlite:///{home / 'kb.sqlite3'}",
           "KB_BROKER_URL": f"sqla+sqlite:///{home / 'broker.sqlite3'}", "KB_MODEL": DEFAULT_MODEL,
           "KB_POLLING_SECONDS": "0.2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    if restart_facts is not None:
        env["KB_WORKER_RESTART_FACTS"] = str(restart_facts)
    restart_setting = Settings.from_env(env).worker_restart_facts
    source, warm_up_source = home / "nightly", home / "warm-up-batch"
    write_source(source, facts)
    write_source(warm_up_source, warm_up_facts, skip=facts, prefix="warm-up")
    kbctl(env, "init")
    log_file = open(home / "worker.log", "wb")
    worker = subprocess.Popen([*KBCTL, "worker", "--loglevel", "INFO"], env=env, cwd=ROOT, stdout=log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    db = Database(Settings.from_env(env))
    try:
        started = time.perf_counter()
        kbctl(env, "submit-fact", "--image", str(warm_up_image(home)), "--question", WARM_UP_QUESTION,
              "--answer", "warm-up shape", "--wait", "--timeout", "900", "--actor", "bench", "--json")
        time.sleep(SETTLE_SECONDS)
        first_fact = memory_of(worker.pid)
        warm_up_version = 1
        if warm_up_facts:
            ingested = kbctl(env, "ingest", str(warm_up_source), "--actor", "bench", "--json")
            status, result, _ = wait_for_job(db, worker, ingested["job_id"], warm_up_facts, home,
                                             timeout_seconds, log=lambda _: None)
            if status != "done":
                raise RuntimeError(f"warm-up batch ended {status}; see {home / 'worker.log'}")
            warm_up_version = int(result["version"])
        warm_up_seconds = time.perf_counter() - started
        time.sleep(SETTLE_SECONDS)
        before = memory_of(worker.pid)
        log(f"worker {worker.pid} warmed up with 1 + {warm_up_facts} facts in {warm_up_seconds:.1f} s: "
            f"RSS {first_fact['VmRSS'] / 2**20:.1f} MiB after the first, {before['VmRSS'] / 2**20:.1f} MiB now")

        started = time.perf_counter()
        ingested = kbctl(env, "ingest", str(source), "--actor", "bench", "--json")
        assert ingested["new"] == facts and ingested["job_id"] is not None, ingested
        def progress(line: str) -> None:
            log(f"{line} after {time.perf_counter() - started:.0f} s")

        status, result, samples = wait_for_job(db, worker, ingested["job_id"], facts, home, timeout_seconds,
                                               log=progress, progress_file=home / "batch-progress.json")
        batch_seconds = time.perf_counter() - started
        restarted = status == "done" and 0 < restart_setting <= 1 + warm_up_facts + facts
        restart_seconds = None
        if restarted:
            restart_seconds = wait_for_restart(home / "worker.log", worker, int(result["version"]))
            log(f"the worker restarted in place and loaded version {result['version']} in {restart_seconds:.1f} s")
        time.sleep(SETTLE_SECONDS)
        after = memory_of(worker.pid)
        next_fact = kbctl(env, "submit-fact", "--image", str(warm_up_image(home, 1)), "--question",
                          WARM_UP_QUESTION, "--answer", "next shape", "--wait", "--timeout", "900",
                          "--actor", "bench", "--json")
        time.sleep(SETTLE_SECONDS)
        after_next = memory_of(worker.pid)
    finally:
        db.engine.dispose()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        log_file.close()
    if status != "done":
        raise RuntimeError(f"batch job ended {status}; see {home / 'worker.log'}")
    version = int(result["version"])
    sizes = codebook_bytes(env, DEFAULT_MODEL, version)
    warm = codebook_bytes(env, DEFAULT_MODEL, warm_up_version)
    with_next = codebook_bytes(env, DEFAULT_MODEL, int(next_fact["version"]))
    submitted = ingested_fact_ids(env, ingested["job_id"])
    loads = head_loads(env, DEFAULT_MODEL, int(next_fact["version"]))
    log(f"head version {next_fact['version']}: warm load {loads['warm']:.2f} s ({loads['warm_source']}), "
        f"cold {loads['cold']:.2f} s")
    return BatchMeasurement(
        facts=facts, job_status=status, version=version, batch_seconds=round(batch_seconds, 1),
        facts_per_minute=round(facts / batch_seconds * 60, 1), worker_pid=worker.pid,
        warm_up_facts=warm_up_facts, batch_job_id=int(ingested["job_id"]),
        rss_after_first_fact_bytes=first_fact["VmRSS"],
        rss_after_warm_up_bytes=before["VmRSS"], hwm_after_warm_up_bytes=before["VmHWM"],
        rss_after_batch_bytes=after["VmRSS"], hwm_after_batch_bytes=after["VmHWM"],
        rss_growth_bytes=after["VmRSS"] - before["VmRSS"],
        rss_growth_since_first_fact_bytes=after["VmRSS"] - first_fact["VmRSS"],
        codebook_entries=sizes["entries"], codebook_tensor_bytes=sizes["tensors"],
        codebook_tensor_bytes_after_warm_up=warm["tensors"], codebook_growth_bytes=sizes["tensors"] - warm["tensors"],
        codebook_keys_bytes=sizes["keys"], codebook_values_bytes=sizes["values"],
        codebook_radii_bytes=sizes["radii"], warm_up_seconds=round(warm_up_seconds, 1),
        restart_facts=restart_setting, worker_restarted=restarted,
        restart_seconds=None if restart_seconds is None else round(restart_seconds, 1),
        rss_after_next_fact_bytes=after_next["VmRSS"],
        rss_growth_after_next_fact_bytes=after_next["VmRSS"] - before["VmRSS"],
        codebook_growth_after_next_fact_bytes=with_next["tensors"] - warm["tensors"],
        codebook_records_bytes=sizes["records"],
        codebook_footprint_growth_after_next_fact_bytes=(with_next["tensors"] + with_next["records"]
                                                         - warm["tensors"] - warm["records"]),
        head_load_warm_seconds=loads["warm"], head_load_cold_seconds=loads["cold"],
        head_load_warm_source=loads["warm_source"], rss_samples=samples,
        fact_ids_in_version=sizes["fact_ids"], fact_ids_submitted=submitted,
    )


def wait_for_restart(log_file: Path, worker: subprocess.Popen, version: int, timeout_seconds: float = 300.0) -> float:
    """Wait until the worker has restarted in place and loaded `version`; return the seconds waited."""
    started, ready = time.perf_counter(), f"ready at version {version} ("
    while True:
        text = log_file.read_text(errors="replace")
        restart = text.find("restarting in place")
        if restart >= 0 and text.find(ready, restart) >= 0:
            return time.perf_counter() - started
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}) instead of restarting; see {log_file}")
        if time.perf_counter() - started > timeout_seconds:
            raise RuntimeError(f"the worker did not restart within {timeout_seconds:.0f} s; see {log_file}")
        time.sleep(0.5)


def wait_for_job(db: Any, worker: subprocess.Popen, job_id: int, facts: int, home: Path,
                 timeout_seconds: float, *, log,
                 progress_file: Path | None = None) -> tuple[str, dict[str, Any], list[tuple[int, int]]]:
    """Poll a batch job until it ends: (status, result, (facts done, worker VmRSS) every ~10 s).

    With `progress_file`, every sample is also written there with its elapsed seconds, so a run
    that is stopped or times out still leaves its rate and memory curve behind.
    """
    from kb_daemon.queue import get_job

    started = time.monotonic()
    deadline = started + timeout_seconds
    last_report = last_sample = 0.0
    samples: list[tuple[int, int]] = []
    elapsed: list[float] = []
    while True:
        with db.session() as session:
            job = get_job(session, job_id)
            status, done, result = job.status, job.progress_done, job.result or {}
        if status in ("done", "failed", "held"):
            return status, result, samples
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}); see {home / 'worker.log'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch not done after {timeout_seconds:.0f} s ({done}/{facts})")
        if time.monotonic() - last_sample > 10:
            last_sample = time.monotonic()
            samples.append((done, memory_of(worker.pid)["VmRSS"]))
            if progress_file is not None:
                elapsed.append(round(last_sample - started, 1))
                progress_file.write_text(json.dumps({
                    "job_id": job_id, "facts": facts, "status": status,
                    "samples": [{"seconds": t, "done": d, "rss_bytes": r}
                                for t, (d, r) in zip(elapsed, samples, strict=True)],
                }) + "\n")
        if time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            log(f"{done}/{facts} facts")
        time.sleep(0.5)


def ingested_fact_ids(env: dict[str, str], job_id: int) -> list[str]:
    from kb_daemon.config import Settings
    from kb_daemon.db import Database
    from kb_daemon.queue import get_job

    db = Database(Settings.from_env(env))
    with db.session() as session:
        return list(get_job(session, job_id).payload["facts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=1000)
    parser.add_argument("--warm-up-facts", type=int, default=50,
                        help="facts in the warm-up batch before the measured one (0: only one fact)")
    parser.add_argument("--quick", action="store_true", help="20 facts after a 5-fact warm-up (a smoke run)")
    parser.add_argument("--restart-facts", type=int,
                        help="the worker's KB_WORKER_RESTART_FACTS (default: the setting's; 0: never restart)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for each batch job")
    parser.add_argument("--home", type=Path, help="data directory (default: a temporary one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    facts = 20 if args.quick else args.facts
    default = ROOT / "bench" / "out" / "nightly_batch-quick.json" if args.quick else (
        ROOT / "bench" / "results" / "nightly_batch.json")
    out = args.out or default
    with tempfile.TemporaryDirectory(prefix="kb-nightly-") as tmp:
        m = run(args.home or Path(tmp), facts, warm_up_facts=5 if args.quick else args.warm_up_facts,
                restart_facts=args.restart_facts, timeout_seconds=args.timeout)
    report = {k: v for k, v in asdict(m).items() if not k.startswith("fact_ids")}
    report.update({
        "benchmark": "nightly_batch", "model": "demo",
        "applied_in_order": m.fact_ids_in_version[-facts:] == m.fact_ids_submitted,
        "rss_growth_within_codebook": m.growth_within_codebook,
        "mib": {k.replace("_bytes", ""): round(v / 2**20, 2)
                for k, v in asdict(m).items() if k.endswith("_bytes")},
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average": os.getloadavg(), "platform": platform.platform()},
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
