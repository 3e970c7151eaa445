"""One served model: its weights loaded once, its versions' codebooks, and one inference thread.

A `ModelHost` answers from the model's head version and follows it: a follower thread reads the
head (one indexed row) every `poll_seconds`, sooner when PostgreSQL notifies a change, and when it
moved builds the new version's codebook from the loaded one (reading only the blobs of entries it
does not hold) before swapping it in. The swap replaces one reference, so a batch that has begun
keeps the codebook it resolved; the inference thread never waits for a load.

Requests are queued to the inference thread, which takes what is waiting (up to `max_batch`),
groups it by version and answers each group with one `generate()`. While a batch generates, the
next one gathers: concurrent clients are batched without a fixed wait, and a lone client's
request starts at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from kb_daemon.db import DatabaseUnavailable
from kb_daemon.errors import InvalidInput, KbError
from kb_daemon.models import Job, JobStatus, Model
from kb_daemon.queue import get_model
from kb_daemon.runtime import ModelRuntime
from kb_daemon.snapshots import Materialised, materialise_changes, materialise_from

if TYPE_CHECKING:
    from kb_daemon.db import Database

logger = logging.getLogger(__name__)
# How long a batch may wait for the clients the previous batch answered: this share of that batch's
# seconds, at most MAX_GATHER_SECONDS (bench/serve_throughput.py measured the split it prevents).
GATHER_SHARE = 0.25
MAX_GATHER_SECONDS = 0.05


class NotReady(KbError):
    """The model cannot answer yet (its first version is not loaded)."""


@dataclass(frozen=True)
class LoadedVersion:
    number: int
    loaded: Materialised
    positions: dict[str, int]  # fact id -> its entry's index in the codebook


@dataclass(frozen=True)
class Reply:
    text: str
    version: int
    fact_id: str | None
    distance: float | None
    radius: float | None = None  # the fired entry's effective radius in that version


@dataclass
class _Request:
    pinned: LoadedVersion | None  # None: the head when the batch forms
    image: Any  # a PIL image or None
    question: str
    edited: bool = True  # False: the base model's answer, every edit bypassed
    future: Future[Reply] = field(default_factory=Future)


@dataclass
class HostState:
    """What /readyz and /metrics report about one host."""

    name: str
    loaded_version: int | None
    head_version: int | None  # as last read from the database
    lag_versions: int
    lag_seconds: float  # how long the loaded version has been behind the head (0 when it is not)
    database_ok: bool
    staleness_seconds: float | None  # since the head was last read successfully
    queue_depth: int | None
    swaps: int
    batches: int  # generate() calls made for requests
    answered: int  # requests answered by them (answered / batches: the mean batch size)
    last_error: str | None


class ModelHost:
    """Serve one registered model; see the module docstring."""

    def __init__(self, db: Database, name: str, *, poll_seconds: float = 0.5, max_batch: int = 16,
                 cached_versions: int = 4, runtime_factory: Callable[[Model], ModelRuntime] | None = None) -> None:
        self.db, self.name = db, name
        self.poll_seconds, self.max_batch, self.cached_versions = poll_seconds, max_batch, cached_versions
        self._runtime_factory = runtime_factory or (lambda model: ModelRuntime(model, db.settings, answer_only=True))
        self.runtime: ModelRuntime | None = None
        self._head: LoadedVersion | None = None
        self._pinned: OrderedDict[int, LoadedVersion] = OrderedDict()
        self._pinned_lock = threading.Lock()  # guards _pinned
        self._pinned_load_lock = threading.Lock()
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._db_head: int | None = None
        self._last_read: float | None = None
        self._behind_since: float | None = None
        self._database_ok = False
        self._queue_depth: int | None = None
        self._last_error: str | None = None
        self.swaps = 0
        self.batches = self.answered = 0
        self.batch_sizes: Counter[int] = Counter()  # requests per generate() call -> calls
        self.blobs_read = 0  # entry blobs read from the database since start (tests count loads by it)

    # ----- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Load the weights and the head version (raises when either fails), then start following."""
        with self.db.session() as session:
            model = get_model(session, self.name)
        runtime = self._runtime_factory(model)
        with self.db.session() as session:
            model = get_model(session, self.name)
            runtime.check_spec(session, model)
        self.runtime = runtime
        self._follow_once()
        if self._head is None:
            raise NotReady(f"model {self.name!r}: could not load its head version ({self._last_error})")
        for target, label in ((self._infer_loop, "infer"), (self._follow_loop, "follow")):
            thread = threading.Thread(target=target, name=f"kb-serve-{label}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._requests.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def wake(self) -> None:
        """Read the head now (a PostgreSQL notification said it moved)."""
        self._wake.set()

    # ----- answering ----------------------------------------------------------------------
    def submit(self, image: Any, question: str, version: int | None = None, *, edited: bool = True) -> Future[Reply]:
        """Queue one question; `version` None answers from the head when its batch forms. A pinned
        version is loaded here, in the caller's thread, before the request is queued."""
        if self._head is None or self.runtime is None:
            raise NotReady(f"model {self.name!r} is not loaded yet")
        needs_image = self.runtime.editor.backbone.family.needs_image
        if needs_image and image is None:
            raise InvalidInput(f"model {self.name!r} answers questions about an image; send one")
        if not needs_image and image is not None:
            raise InvalidInput(f"model {self.name!r} is a text-only model; send no image")
        head = self._head
        loaded = None if version is None else head if version == head.number else self.pinned(version)
        request = _Request(loaded, image, question, edited)
        self._requests.put(request)
        return request.future

    def is_loaded(self, number: int) -> bool:
        """Whether version `number` is the head or a cached pinned version (no load needed)."""
        head = self._head
        if head is not None and head.number == number:
            return True
        with self._pinned_lock:
            return number in self._pinned

    def pinned(self, number: int) -> LoadedVersion:
        """Version `number`, loaded on first use and kept among the `cached_versions` last used.
        One pinned load at a time; the head keeps following meanwhile."""
        found = self._cached(number)
        if found is not None:
            return found
        with self._pinned_load_lock:
            found = self._cached(number)
            if found is not None:
                return found
            loaded = self._load(number, self._head)
            self._remember(loaded)
            return loaded

    def _cached(self, number: int) -> LoadedVersion | None:
        with self._pinned_lock:
            found = self._pinned.get(number)
            if found is not None:
                self._pinned.move_to_end(number)
            return found

    def _remember(self, loaded: LoadedVersion) -> None:
        with self._pinned_lock:
            self._pinned[loaded.number] = loaded
            self._pinned.move_to_end(loaded.number)
            while len(self._pinned) > self.cached_versions:
                self._pinned.popitem(last=False)

    def _gather(self, first: _Request, previous: int, previous_seconds: float) -> list[_Request]:
        """`first` and what else is queued, up to `max_batch`. When fewer are waiting than the
        previous batch answered, wait for the rest a little (a quarter of that batch's time, at most
        MAX_GATHER_SECONDS): the clients it answered are sending their next requests, and without the
        wait they would split into a large batch and a small one, alternating. After a batch of
        one there is no wait, so a lone client's request starts at once."""
        batch = [first]
        wanted = min(previous, self.max_batch)
        deadline = time.monotonic() + min(GATHER_SHARE * previous_seconds, MAX_GATHER_SECONDS)
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = self._requests.get(timeout=remaining) if len(batch) < wanted and remaining > 0 \
                    else self._requests.get_nowait()
            except queue.Empty:
                if len(batch) >= wanted or time.monotonic() >= deadline:
                    break
                continue
            if item is None:
                self._requests.put(None)
                break
            batch.append(item)
        return batch

    def _infer_loop(self) -> None:
        previous, previous_seconds = 1, 0.0
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = self._gather(first, previous, previous_seconds)
            started = time.monotonic()
            self._run_batch(batch)
            previous, previous_seconds = len(batch), time.monotonic() - started

    def _run_batch(self, batch: list[_Request]) -> None:
        head = self._head  # as it is now, for every request not pinned to a version
        assert head is not None
        groups: dict[tuple[int, bool], tuple[LoadedVersion, list[_Request]]] = {}
        for request in batch:
            loaded = request.pinned or head
            groups.setdefault((loaded.number, request.edited), (loaded, []))[1].append(request)
        for (_number, edited), (loaded, requests) in groups.items():
            self._answer(loaded, requests, edited)

    def _answer(self, loaded: LoadedVersion, requests: list[_Request], edited: bool) -> None:
        assert self.runtime is not None
        editor = self.runtime.editor
        codebook = loaded.loaded.codebook
        try:
            editor.load_codebook(codebook)
            answers = editor.answers([(r.image, r.question) for r in requests], edited=edited)
        except Exception as exc:  # noqa: BLE001  (reported to each waiting request)
            logger.exception("model %s: answering a batch of %d failed", self.name, len(requests))
            for request in requests:
                request.future.set_exception(exc)
            return
        self.batches += 1
        self.answered += len(requests)
        self.batch_sizes[len(requests)] += 1
        for request, answer in zip(requests, answers, strict=True):
            radius = float(codebook.radii[loaded.positions[answer.fact_id]]) if answer.fact_id else None
            request.future.set_result(Reply(answer.text, loaded.number, answer.fact_id, answer.distance, radius))

    # ----- following the head -------------------------------------------------------------
    def _follow_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._follow_once()

    def _follow_once(self) -> None:
        head_read = False
        try:
            with self.db.session() as session:
                head = session.execute(select(Model.head_version).where(Model.name == self.name)).scalar_one()
                depth = session.execute(select(func.count(Job.id)).join(Model, Model.id == Job.model_id).where(
                    Model.name == self.name, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
                )).scalar_one()
            head_read = True
            self._db_head, self._queue_depth, self._last_read = head, depth, time.monotonic()
            if not self._database_ok:
                if self._last_error is not None:
                    logger.warning("model %s: the database answers again; following the head", self.name)
                self._database_ok = True
            current = self._head
            if current is None or current.number != head:
                if self._behind_since is None:
                    self._behind_since = time.monotonic()
                loaded = self._load(head, current)
                self._head = loaded  # the swap: batches that already resolved keep their version
                self._behind_since = None
                if current is not None:
                    self.swaps += 1
                    self._remember(current)  # the previous head stays available to pinned requests
                    # Its lookup index (KB_INDEX_ENTRIES) is let go: a pinned request that needs
                    # one begins another build, and the new head builds its own.
                    current.loaded.codebook.drop_index()
                logger.info("model %s: answering from version %d (%d entries, %d blobs read)", self.name,
                            head, len(loaded.loaded.codebook), loaded.loaded.blobs_read)
            self._last_error = None
        except Exception as exc:  # noqa: BLE001  (keep answering from the loaded version; retry next poll)
            # The database is down when the head cannot be read or the load cannot reach it; a load
            # that fails on what it read (a corrupt blob, say) leaves the database reported reachable.
            database_ok = head_read and not isinstance(exc, (DatabaseUnavailable, SQLAlchemyError))
            first = self._last_error is None or database_ok != self._database_ok
            self._database_ok, self._last_error = database_ok, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if first:
                logger.warning("model %s: cannot follow the head (%s); answering from version %s",
                               self.name, self._last_error, self._head.number if self._head else None)

    def _load(self, number: int, base: LoadedVersion | None) -> LoadedVersion:
        """Version `number`'s codebook: from `base` by the span changes between the two versions
        (`snapshots.materialise_changes`: O(changes) rows and blobs); failing that, reusing the
        entry tensors of `base` and of the cached pinned versions, so that only the blobs of
        entries none of them holds are read. With nothing held (the server's start), the worker's
        local codebook cache is tried first (`kb_daemon.snapshot_cache`)."""
        if base is not None:
            with self._pinned_lock:
                others = [pinned.loaded for pinned in self._pinned.values() if pinned is not base]
            with self.db.session() as session:
                changed = materialise_changes(session, get_model(session, self.name), number, base.loaded,
                                              base.number, others)
            if changed is not None:
                self.blobs_read += changed.blobs_read
                positions = dict(zip(changed.codebook.fact_ids, range(len(changed.codebook)), strict=True))
                return LoadedVersion(number, changed, positions)
        with self._pinned_lock:
            held = [base, *self._pinned.values()] if base is not None else list(self._pinned.values())
        if not held:
            from kb_daemon.snapshot_cache import CodebookCache

            cache = CodebookCache.for_settings(self.db.settings)
            if cache.keep_versions > 0:
                with self.db.session() as session:
                    cached = cache.load(session, get_model(session, self.name), number)
                if cached is not None:
                    return LoadedVersion(number, cached,
                                         {fact_id: i for i, fact_id in enumerate(cached.codebook.fact_ids)})
        known: dict[int, Any] = {}
        for loaded_version in held:
            book = loaded_version.loaded.codebook
            for i, entry_id in enumerate(loaded_version.loaded.entry_ids):
                if entry_id not in known:
                    known[entry_id] = book.entry(i)
        with self.db.session() as session:
            model = get_model(session, self.name)
            loaded = materialise_from(session, model, number, known)
        self.blobs_read += loaded.blobs_read
        return LoadedVersion(number, loaded, {fact_id: i for i, fact_id in enumerate(loaded.codebook.fact_ids)})

    # ----- reporting ----------------------------------------------------------------------
    @property
    def head_number(self) -> int | None:
        return self._head.number if self._head is not None else None

    def state(self) -> HostState:
        now = time.monotonic()
        loaded = self.head_number
        head = self._db_head
        lag = max(0, head - loaded) if head is not None and loaded is not None else 0
        behind = self._behind_since
        return HostState(
            self.name, loaded, head, lag,
            lag_seconds=(now - behind) if behind is not None else 0.0,
            database_ok=self._database_ok,
            staleness_seconds=(now - self._last_read) if self._last_read is not None else None,
            queue_depth=self._queue_depth, swaps=self.swaps, batches=self.batches, answered=self.answered,
            last_error=self._last_error,
        )
