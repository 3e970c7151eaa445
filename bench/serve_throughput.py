"""Serving throughput: `kbctl serve` under N concurrent HTTP clients against `Editor.answers` in process.

The inputs are easy-VQA test images, each with its first question (shape, colour and yes/no
questions mixed), sent as PNG data URLs to `POST /v1/chat/completions`, as the `openai` client
sends them. The same (image, question) pairs, in the same order, feed both sides:

* in process: the demo model loaded as the server loads it (`editor.load_backbone` and
  `editor.Editor` with the registration's layer and hyperparameters, no reference pool), timing
  `Editor.answers` on consecutive batches of 1, 4, 16 and 64 pairs. It runs once before the server
  starts and once after it stops, so that the two never compete for the cores; the targets use the
  faster of the two runs (the stricter comparison), and both are in the JSON to show the drift.
* over HTTP: a throwaway installation (KB_HOME in a temporary folder, SQLite), `kbctl init` (which
  registers the demo model), a reader token, and `kbctl serve --model demo` on a free loopback
  port at version 0 (no worker: nothing is edited). For each client count, one thread per client,
  each with its own keep-alive `httpx.Client`, asks without pause: a warm-up, then a measured window
  of at least `--seconds` and `--min-requests` completed requests. Requests per second count the
  completions inside the window; latencies are those of the requests that completed inside it.

The server runs through `kbctl`'s own entry point in a child process with one addition: a wrapper
around `ModelHost._answer` appends each batch's size and seconds to a file (one short line per
`generate()`), so the report gives the batch sizes the server formed at each client count and the
share of the window its inference thread was busy. `--plain-server` runs `python -m kb_daemon.cli
serve` unchanged instead (no batch figures). The CPU seconds of the server process and of this
process (the clients) are read per window, to show what HTTP costs on a machine whose cores the
clients and the server share.

Every answer from the server is compared with the in-process batch-1 answer for the same pair
(same version, an empty codebook), and the mismatches are counted, not asserted.

Targets (reported, not asserted): at 16 clients, server requests/s at least 85% of the in-process
batch-16 answers/s; at 1 client, server p50 latency at most 1.15x the in-process batch-1 latency.
Torch threads are left at their default in both processes (recorded in the JSON).

    python bench/serve_throughput.py --out bench/results/serve_throughput.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import machine_facts  # bench/ is sys.path[0] when a script runs

ROOT = Path(__file__).resolve().parents[1]
SERVE_WITH_BATCH_LOG = "--serve-with-batch-log"  # internal: this script as the server's entry point
TARGET_THROUGHPUT_SHARE = 0.85  # of in-process batch-16 answers/s, at 16 clients
TARGET_LATENCY_RATIO = 1.15  # of the in-process batch-1 latency, at 1 client
CPU_TICKS = os.sysconf("SC_CLK_TCK")


# ----- inputs ---------------------------------------------------------------------------------
def easy_vqa_pairs(count: int) -> list[tuple[bytes, str]]:
    """(PNG bytes, question) for the first `count` easy-VQA test images, each with its first question."""
    from easy_vqa import get_test_image_paths, get_test_questions

    questions, _answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    first: dict[int, str] = {}
    for question, image_id in zip(questions, image_ids, strict=True):
        first.setdefault(image_id, question)
    chosen = sorted(first)[:count]
    return [(Path(paths[i]).read_bytes(), first[i]) for i in chosen]


def chat_body(model: str, png: bytes, question: str) -> bytes:
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (`share` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


# ----- in process -----------------------------------------------------------------------------
def load_editor(registration: dict[str, Any]) -> Any:
    """The demo model as `ModelRuntime(answer_only=True)` builds it for the server (no reference pool)."""
    import editor

    backbone = editor.load_backbone(registration["path"], edit_layer=registration["layer"])
    return editor.Editor(backbone, layer=registration["layer"], reference_pool=[], **registration["hparams"])


def in_process(ed: Any, pairs: list[tuple[bytes, str]], batches: list[int], seconds: float,
               min_calls: int) -> dict[str, Any]:
    """Per batch size: `Editor.answers` on consecutive pairs (PNG decoded first, as the server
    decodes before queueing), for at least `seconds` and `min_calls` calls after one warm-up call."""
    import io

    from PIL import Image

    inputs = [(Image.open(io.BytesIO(png)).convert("RGB"), question) for png, question in pairs]
    rows: dict[str, Any] = {}
    for batch in batches:
        def chunk(index: int, batch: int = batch) -> list[tuple[Any, str]]:
            start = (index * batch) % len(inputs)
            return [inputs[(start + j) % len(inputs)] for j in range(batch)]

        ed.answers(chunk(0))
        calls: list[float] = []
        begun = time.perf_counter()
        while time.perf_counter() - begun < seconds or len(calls) < min_calls:
            tick = time.perf_counter()
            ed.answers(chunk(len(calls) + 1))
            calls.append(time.perf_counter() - tick)
        rows[str(batch)] = {
            "calls": len(calls), "answers_per_second": round(batch * len(calls) / sum(calls), 3),
            "call_ms_p50": round(1000 * statistics.median(calls), 2),
            "call_ms_p95": round(1000 * percentile(calls, 0.95), 2),
        }
    return rows


def reference_answers(ed: Any, pairs: list[tuple[bytes, str]]) -> list[str]:
    import io

    from PIL import Image

    return [ed.answers([(Image.open(io.BytesIO(png)).convert("RGB"), question)])[0].text for png, question in pairs]


# ----- the server -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Installation:
    """A throwaway kb-daemon installation (SQLite) and one `kbctl serve` process on it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "KB_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.batch_log = home / "batches.log"

    def kbctl(self, *args: str) -> Any:
        result = subprocess.run([sys.executable, "-m", "kb_daemon.cli", *args], env=self.env, capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"kbctl {' '.join(args)} -> {result.returncode}: {result.stderr[-2000:]}")
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def start(self, model: str, max_batch: int, plain: bool, timeout: float = 300.0) -> str:
        import httpx

        self.port = free_port()
        serve = ["serve", "--model", model, "--port", str(self.port), "--max-batch", str(max_batch),
                 "--loglevel", "WARNING"]
        entry = ([sys.executable, "-m", "kb_daemon.cli"] if plain
                 else [sys.executable, str(Path(__file__).resolve()), SERVE_WITH_BATCH_LOG, str(self.batch_log)])
        log = open(self.home / "server.log", "wb")
        self.process = subprocess.Popen([*entry, *serve], env=self.env, cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}\n{self.log()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s\n{self.log()}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CPU_TICKS  # utime, stime

    def counters(self, url: str, token: str) -> dict[str, float]:
        """The server's CPU seconds so far and its batch counters from /metrics."""
        import httpx

        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
        found = {"server_cpu_seconds": self.cpu_seconds()}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            for metric in ("kb_batches_total", "kb_batched_requests_total"):
                if name.startswith(metric + "{") and 'model="demo"' in name:
                    found[metric] = float(value)
        return found

    def batches(self) -> list[tuple[float, int, float]]:
        """(ended, size, seconds) of every batch the server answered; `ended` is its `time.monotonic()`
        (CLOCK_MONOTONIC, the same clock in every process)."""
        if not self.batch_log.exists():
            return []
        rows = [line.split() for line in self.batch_log.read_text().splitlines()]
        return [(float(ended), int(size), float(seconds)) for ended, size, seconds in rows]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log(self) -> str:
        path = self.home / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def serve_with_batch_log(log_path: str, args: list[str]) -> None:
    """Run `kbctl ARGS` with each answered batch's size and seconds appended to `log_path`."""
    from kb_daemon.cli import cli
    from kb_daemon.server import hosting

    log = open(log_path, "a", buffering=1)
    answer = hosting.ModelHost._answer

    def logged(host: Any, loaded: Any, requests: list[Any], *args: Any, **kwargs: Any) -> None:
        tick = time.monotonic()
        answer(host, loaded, requests, *args, **kwargs)
        ended = time.monotonic()
        log.write(f"{ended:.6f} {len(requests)} {ended - tick:.6f}\n")

    hosting.ModelHost._answer = logged  # type: ignore[method-assign]
    cli.main(args, prog_name="kbctl")


@dataclass
class Completed:
    client: int
    started: float  # time.monotonic() seconds
    seconds: float
    status: int
    answer: str | None
    pair: int


@dataclass
class Level:
    """One client count's run: every request, and the measured window."""

    clients: int
    done: list[Completed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    span: tuple[float, float] = (0.0, 0.0)  # time.monotonic() when the clients started and when all stopped
    window: tuple[float, float] = (0.0, 0.0)  # time.monotonic() at its opening and closing
    counted: dict[str, float] = field(default_factory=dict)  # counter increments within the window


def run_level(url: str, token: str, bodies: list[bytes], clients: int, warmup_seconds: float, seconds: float,
              min_requests: int, max_seconds: float, counters: Callable[[], dict[str, float]]) -> Level:
    """`clients` threads asking without pause; the window opens after the warm-up and closes once it
    is `seconds` long and holds `min_requests` completions (or at `max_seconds`). `counters()` is read
    at the window's opening and closing."""
    import httpx

    level = Level(clients)
    lock = threading.Lock()
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client(index: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300.0) as http:
            sent = 0
            while not stop.is_set():
                pair = (index + sent * clients) % len(bodies)
                sent += 1
                tick = time.monotonic()
                try:
                    response = http.post("/v1/chat/completions", content=bodies[pair])
                    seconds_taken = time.monotonic() - tick
                    answer = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 \
                        else None
                    record = Completed(index, tick, seconds_taken, response.status_code, answer, pair)
                    with lock:
                        level.done.append(record)
                        if response.status_code != 200:
                            level.errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    with lock:
                        level.errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(warmup_seconds)
    before_counters = {**counters(), "client_cpu_seconds": sum(os.times()[:2])}
    opened = time.monotonic()
    with lock:
        before = len(level.done)
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        with lock:
            in_window = len(level.done) - before
        if (now - opened >= seconds and in_window >= min_requests) or now - opened >= max_seconds:
            break
    level.window = (opened, now)
    after_counters = {**counters(), "client_cpu_seconds": sum(os.times()[:2])}
    level.counted = {k: after_counters[k] - v for k, v in before_counters.items() if k in after_counters}
    stop.set()
    for thread in threads:
        thread.join(timeout=600)
    level.span = (began, time.monotonic())
    return level


def summarise(level: Level, references: list[str], batches: list[tuple[float, int, float]] | None) -> dict[str, Any]:
    opened, closed = level.window
    counted = level.counted
    inside = [r for r in level.done if opened <= r.started + r.seconds <= closed]
    ok = [r for r in inside if r.status == 200]
    window = closed - opened
    latencies = [r.seconds for r in ok]
    row: dict[str, Any] = {
        "clients": level.clients, "load_average_1min_after": round(os.getloadavg()[0], 2),
        "window_seconds": round(window, 2), "requests": len(ok),
        "failed": len(inside) - len(ok), "requests_per_second": round(len(ok) / window, 3),
        "latency_ms_p50": round(1000 * percentile(latencies, 0.50), 1) if ok else None,
        "latency_ms_p95": round(1000 * percentile(latencies, 0.95), 1) if ok else None,
        "latency_ms_p99": round(1000 * percentile(latencies, 0.99), 1) if ok else None,
        "answers_unlike_in_process": sum(1 for r in ok if r.answer != references[r.pair]),
        "server_cpu_seconds_per_request": round(counted["server_cpu_seconds"] / len(ok), 4) if ok else None,
        "client_cpu_seconds_per_request": round(counted["client_cpu_seconds"] / len(ok), 4) if ok else None,
        "metrics_batch_size_mean": round(counted["kb_batched_requests_total"] / counted["kb_batches_total"], 2)
        if counted.get("kb_batches_total") else None,
        "errors": sorted(set(level.errors))[:5],
    }
    if batches is not None:
        inside_batches = [(size, seconds) for ended, size, seconds in batches if opened <= ended <= closed]
        sizes = [size for size, _ in inside_batches]
        # the inference thread's time inside the window (a batch may straddle its edges)
        busy = sum(max(0.0, min(ended, closed) - max(ended - seconds, opened)) for ended, _, seconds in batches)
        row.update({
            "batches": len(sizes),
            "batch_size_mean": round(statistics.mean(sizes), 2) if sizes else None,
            "batch_size_max": max(sizes) if sizes else None,
            "batch_sizes": {str(s): sizes.count(s) for s in sorted(set(sizes))},
            "inference_busy_share": round(busy / window, 3),
            "inference_ms_per_request": round(1000 * sum(s for _, s in inside_batches) / sum(sizes), 2)
            if sizes else None,
        })
    return row


# ----- the report -----------------------------------------------------------------------------
def targets(rows: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict[str, Any]:
    by_clients = {row["clients"]: row for row in rows}
    result: dict[str, Any] = {}
    batch16 = [b["16"]["answers_per_second"] for b in baselines if "16" in b]
    if 16 in by_clients and batch16:
        reference = max(batch16)
        share = by_clients[16]["requests_per_second"] / reference
        result["throughput_16_clients"] = {
            "target": f"server req/s at 16 clients >= {TARGET_THROUGHPUT_SHARE:.0%} of in-process batch-16 answers/s",
            "server_requests_per_second": by_clients[16]["requests_per_second"],
            "in_process_answers_per_second": reference, "share": round(share, 3),
            "met": share >= TARGET_THROUGHPUT_SHARE}
    batch1 = [b["1"]["call_ms_p50"] for b in baselines if "1" in b]
    if 1 in by_clients and batch1 and by_clients[1]["latency_ms_p50"] is not None:
        reference = min(batch1)
        ratio = by_clients[1]["latency_ms_p50"] / reference
        result["latency_1_client"] = {
            "target": f"server p50 at 1 client <= {TARGET_LATENCY_RATIO}x the in-process batch-1 latency",
            "server_latency_ms_p50": by_clients[1]["latency_ms_p50"], "in_process_ms_p50": reference,
            "ratio": round(ratio, 3), "met": ratio <= TARGET_LATENCY_RATIO}
    return result


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| clients | p50 ms | p95 ms | p99 ms | req/s | mean batch (max) "
             "| in process, batch = clients: answers/s (before / after) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["server"]:
        if row.get("batch_size_mean"):
            batch = f"{row['batch_size_mean']} ({row['batch_size_max']})"
        else:
            batch = str(row.get("metrics_batch_size_mean") or "")
        base = [b[str(row["clients"])]["answers_per_second"] for b in report["in_process"].values()
                if str(row["clients"]) in b]
        lines.append(f"| {row['clients']} | {row['latency_ms_p50']} | {row['latency_ms_p95']} | "
                     f"{row['latency_ms_p99']} | {row['requests_per_second']:.2f} | {batch} | "
                     f"{' / '.join(f'{b:.2f}' for b in base)} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == SERVE_WITH_BATCH_LOG:
        serve_with_batch_log(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16,64", help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=15.0, help="shortest measured window per client count")
    parser.add_argument("--min-requests", type=int, default=200, help="fewest completions in a window")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="longest window, whatever its count")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--inprocess-seconds", type=float, default=6.0, help="per batch size, per run")
    parser.add_argument("--pairs", type=int, default=64, help="distinct (image, question) pairs")
    parser.add_argument("--max-batch", type=int, default=16, help="kbctl serve --max-batch")
    parser.add_argument("--plain-server", action="store_true",
                        help="run `python -m kb_daemon.cli serve` itself (no batch-size log)")
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 2 s windows, 8 pairs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_throughput.json"))
    parser.add_argument("--raw-out", type=Path, help="per-request latencies (default bench/out/serve_throughput-"
                                                     "raw.json; with --quick, beside --out)")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.min_requests, args.warmup_seconds = "1,4", 1.5, 4, 0.5
        args.inprocess_seconds, args.pairs = 0.5, 8
    raw_out = args.raw_out or (args.out.with_name(args.out.stem + "-raw.json") if args.quick
                               else Path("bench/out/serve_throughput-raw.json"))
    client_counts = [int(c) for c in args.clients.split(",")]
    batch_sizes = sorted({1, 16, *client_counts})

    pairs = easy_vqa_pairs(args.pairs)
    bodies = [chat_body("demo", png, question) for png, question in pairs]
    install = Installation(Path(tempfile.mkdtemp(prefix="kb-serve-bench-")))
    install.kbctl("init", "--json")
    registration = next(m for m in install.kbctl("model", "list", "--json") if m["name"] == "demo")
    token = install.kbctl("token", "create", "bench", "--role", "reader", "--json")["token"]

    ed = load_editor(registration)
    references = reference_answers(ed, pairs)
    baselines = {"before_server": in_process(ed, pairs, batch_sizes, args.inprocess_seconds, 3)}
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {
        "pairs": [question for _, question in pairs], "references": references,
        "columns": {"requests": ["client", "started_s", "seconds", "status", "pair"],
                    "batches": ["ended_s", "size", "seconds"]},  # times from the window's opening
        "levels": []}
    failed = True
    try:
        url = install.start("demo", args.max_batch, args.plain_server)
        for clients in client_counts:
            level = run_level(url, token, bodies, clients, args.warmup_seconds, args.seconds, args.min_requests,
                              args.max_seconds, lambda: install.counters(url, token))
            batches = None if args.plain_server else install.batches()
            rows.append(summarise(level, references, batches))
            print(json.dumps(rows[-1]), flush=True)
            if rows[-1]["requests"] == 0:
                raise RuntimeError(f"no request succeeded with {clients} clients: {rows[-1]['errors']}\n"
                                   f"server log ({install.home / 'server.log'}):\n{install.log()}")
            opened = level.window[0]
            raw["levels"].append({
                "clients": clients, "window": [0.0, round(level.window[1] - opened, 4)],
                "requests": [[r.client, round(r.started - opened, 4), round(r.seconds, 5), r.status, r.pair]
                             for r in level.done],
                "batches": [[round(ended - opened, 4), size, round(seconds, 5)] for ended, size, seconds in batches
                            if level.span[0] <= ended <= level.span[1]] if batches is not None else None})
        failed = False
    finally:
        install.stop()
        if not failed:  # a failed run's installation stays, with the server's log
            shutil.rmtree(install.home, ignore_errors=True)
    baselines["after_server"] = in_process(ed, pairs, batch_sizes, args.inprocess_seconds, 3)

    report = {
        "benchmark": "serve_throughput", "quick": args.quick, "model": "demo", "database": "sqlite",
        "version": 0, "pairs": len(pairs), "max_batch": args.max_batch,
        "server_entry": "python -m kb_daemon.cli serve" if args.plain_server
        else "kbctl's entry point with a batch-size log around ModelHost._answer",
        "client": "one thread per client, each with its own keep-alive httpx.Client",
        "in_process": baselines, "server": rows, "targets": targets(rows, list(baselines.values())),
        "machine": machine_facts(),  # torch_threads: the default, here and in the server
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    raw_out.parent.mkdir(parents=True, exist_ok=True)
    raw_out.write_text(json.dumps(raw) + "\n")
    print(markdown_table(report))
    print(json.dumps(report["targets"], indent=2))


if __name__ == "__main__":
    main()
