"""Settings: where data lives and how to reach the database and the broker. Read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from kb_daemon.errors import InvalidInput

DEFAULT_MODEL = "demo"


def default_home() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("kb-daemon", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Paths and URLs; method knobs live with each registered model, not here."""

    home: Path
    database_url: str
    broker_url: str
    # A job's lease: a worker that stops renewing it for this long is presumed dead.
    lease_seconds: float = 30.0
    # How often a running job renews its lease, and how often the reaper runs.
    heartbeat_seconds: float = 5.0
    reaper_seconds: float = 15.0
    # Broker polling interval of the worker (latency from submit to start).
    polling_seconds: float = 0.25
    # Nightly ingestion: crontab fields "minute hour day_of_month month day_of_week".
    ingest_schedule: str = "0 2 * * *"
    # A batch stores its entries every this many facts, so a restarted worker resumes from there.
    batch_checkpoint_facts: int = 20
    # A worker that has applied this many facts since it started restarts itself in place (same
    # PID, same command line) once the job that reached the count is stored: the memory each edit
    # leaves behind in Python's and glibc's allocators (about 2 KiB per fact) goes with the old
    # process. 0: never.
    worker_restart_facts: int = 1000
    # How long a SQLite writer waits for the lock before the operation fails (and is retried).
    sqlite_busy_seconds: float = 30.0
    # Where workers and `kbctl ask` run the model, and the base weights' dtype ("auto": a CUDA
    # GPU with bfloat16 when there is one, else the CPU with float32). Codebook math is float32.
    device: str = "auto"
    dtype: str = "auto"
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    # Per fact: each rephrasing is a training row of every optimisation step, each negative a row
    # of the keys pass, so these bound how long one edit holds its model's queue.
    max_rephrases_per_fact: int = 32
    max_negatives_per_fact: int = 32  # negative images and negative questions together
    # Signs the operator console's session cookies. Servers behind one load balancer need the same
    # value; unset, each server keeps a random one in $KB_HOME/session-secret.
    session_secret: str | None = None
    # Packed codebook files kept per model in $KB_HOME/cache/codebooks (derived from the database,
    # so that a start reads one file instead of a blob per entry); 0: no cache.
    codebook_cache_versions: int = 2
    # Codebooks of at least this many entries are looked up through an approximate
    # nearest-neighbour index (editor.ann), built in a background thread of each worker, server
    # and `kbctl ask` process while the exact scan answers; 0: always the exact scan.
    index_entries: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        home = Path(env.get("KB_HOME") or default_home()).expanduser().resolve()
        database_url = env.get("KB_DATABASE_URL") or f"sqlite:///{home / 'kb.sqlite3'}"
        broker_url = env.get("KB_BROKER_URL") or f"sqla+sqlite:///{home / 'broker.sqlite3'}"
        settings = cls(home=home, database_url=database_url, broker_url=broker_url)
        overrides: dict[str, object] = {}
        for name, key in (("lease_seconds", "KB_LEASE_SECONDS"), ("heartbeat_seconds", "KB_HEARTBEAT_SECONDS"),
                          ("reaper_seconds", "KB_REAPER_SECONDS"), ("polling_seconds", "KB_POLLING_SECONDS"),
                          ("sqlite_busy_seconds", "KB_SQLITE_BUSY_SECONDS")):
            if env.get(key):
                try:
                    overrides[name] = float(env[key])
                except ValueError as exc:
                    raise InvalidInput(f"{key} must be a number of seconds, got {env[key]!r}") from exc
        for name, key, least in (("batch_checkpoint_facts", "KB_BATCH_CHECKPOINT_FACTS", 1),
                                 ("worker_restart_facts", "KB_WORKER_RESTART_FACTS", 0),
                                 ("codebook_cache_versions", "KB_CODEBOOK_CACHE_VERSIONS", 0),
                                 ("index_entries", "KB_INDEX_ENTRIES", 0)):
            if env.get(key):
                try:
                    overrides[name] = max(least, int(env[key]))
                except ValueError as exc:
                    raise InvalidInput(f"{key} must be an integer, got {env[key]!r}") from exc
        for name, key in (("max_rephrases_per_fact", "KB_MAX_REPHRASES"),
                          ("max_negatives_per_fact", "KB_MAX_NEGATIVES")):
            if env.get(key):
                try:
                    count = int(env[key])
                except ValueError:
                    count = -1
                if count < 0:
                    raise InvalidInput(f"{key} must be an integer >= 0, got {env[key]!r}")
                overrides[name] = count
        if env.get("KB_DEVICE"):
            overrides["device"] = env["KB_DEVICE"]
        if env.get("KB_DTYPE"):
            if env["KB_DTYPE"] not in ("auto", "float32", "bfloat16", "float16"):
                raise InvalidInput(f"KB_DTYPE must be auto, float32, bfloat16 or float16, got {env['KB_DTYPE']!r}")
            overrides["dtype"] = env["KB_DTYPE"]
        if env.get("KB_SESSION_SECRET"):
            overrides["session_secret"] = env["KB_SESSION_SECRET"]
        if env.get("KB_INGEST_SCHEDULE"):
            overrides["ingest_schedule"] = env["KB_INGEST_SCHEDULE"]
        return replace(settings, **overrides) if overrides else settings

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def redact(url: str) -> str:
    """A URL with its password replaced by '***', for logs and messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    scheme, sep, rest = url.partition("+") if url.startswith("sqla+") else ("", "", url)
    try:
        parsed = make_url(rest)
    except ArgumentError:
        return "<unparseable url>"
    shown = parsed.render_as_string(hide_password=True)
    return f"{scheme}{sep}{shown}" if sep else shown
