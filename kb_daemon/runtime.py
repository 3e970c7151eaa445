"""A loaded model with its editor and the codebook of one version, for workers and `kbctl ask`.

Imports torch and the editor inside methods only, so importing kb_daemon stays light.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from kb_daemon.config import Settings
from kb_daemon.memory import trim_free_memory
from kb_daemon.models import Fact, Model
from kb_daemon.queue import get_model
from kb_daemon.snapshot_cache import CodebookCache, LoadSource, Snapshot, capture, load_version
from kb_daemon.snapshots import Materialised, get_blob, get_version, manifest_at, set_spec

if TYPE_CHECKING:
    from kb_daemon.db import Database

logger = logging.getLogger(__name__)
EASY_VQA_POOL_SIZE = 120


def load_reference_pool(spec: str | None) -> list[Any]:
    """Reference inputs for hard-negative mining: "easy-vqa[:N]" or a JSON Lines file of
    {"image": path relative to the file, "question": ...}."""
    from PIL import Image

    from editor.samples import ReferenceItem

    if not spec:
        return []
    if spec.startswith("easy-vqa"):
        from easy_vqa import get_train_image_paths, get_train_questions

        size = int(spec.split(":", 1)[1]) if ":" in spec else EASY_VQA_POOL_SIZE
        questions, _answers, image_ids = get_train_questions()
        paths = get_train_image_paths()
        # The last train images: the benchmark builder and the demo draw from the first ones.
        chosen = sorted(set(image_ids))[-size:]
        first_question: dict[Any, str] = {}
        for question, image_id in zip(questions, image_ids, strict=True):
            first_question.setdefault(image_id, question)
        return [ReferenceItem(Image.open(paths[i]).convert("RGB"), first_question[i]) for i in chosen]
    from kb_daemon.ingest import read_inputs

    path = Path(spec)
    return [ReferenceItem(Image.open(path.parent / image).convert("RGB") if image else None, question)
            for image, question in read_inputs(path, "reference pool")]


def open_image(data: bytes | None) -> Any:
    if data is None:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class ModelRuntime:
    """One model loaded once per process; the codebook follows the version asked for."""

    def __init__(self, model: Model, settings: Settings | None = None, *, answer_only: bool = False) -> None:
        """Load `model`'s weights on `settings.device` (default: the settings of the environment).

        `answer_only` skips the hard-negative reference pool, which only edits use (a server)."""
        import editor

        settings = settings or Settings.from_env()
        self.name = model.name
        backbone = editor.load_backbone(model.path, edit_layer=model.layer, device=settings.device,
                                        dtype=settings.dtype)
        pool = [] if answer_only else load_reference_pool(model.reference_pool)
        self.editor = editor.Editor(backbone, layer=model.layer, reference_pool=pool, **dict(model.hparams))
        if settings.index_entries:
            self.editor.index_settings = editor.IndexSettings(threshold=settings.index_entries, background=True)
        self.spec = dataclasses.asdict(self.editor.spec)
        self.version: int | None = None
        # The entry row id of each codebook entry while `version` is set (None: unknown), so that a
        # move to another version reads only the spans and blobs that differ.
        self.entry_ids: list[int] | None = None
        self.hparams = dict(model.hparams)
        self.reference_pool = model.reference_pool
        # Packed codebook files of recent versions ($KB_HOME/cache/codebooks), derived from the database.
        self.cache = CodebookCache.for_settings(settings)
        self.last_load: VersionLoad | None = None  # how the current version's codebook was loaded
        self._cache_lock = threading.Lock()
        self._cache_writer: threading.Thread | None = None  # runs while writes are pending
        self._cache_pending: tuple[Database, Snapshot] | None = None

    def configure(self, hparams: dict[str, Any], reference_pool: str | None) -> None:
        """Edit with these hyperparameters and this hard-negative pool from now on (`kbctl model set`)."""
        if hparams == self.hparams and reference_pool == self.reference_pool:
            return
        pool = load_reference_pool(reference_pool) if reference_pool != self.reference_pool else None
        self.editor.reconfigure(hparams, pool)
        self.hparams, self.reference_pool = dict(hparams), reference_pool

    def check_spec(self, session: Session, model: Model) -> None:
        set_spec(session, model, self.spec)

    def use_version(self, session: Session, model: Model, number: int) -> None:
        """Load version `number`'s codebook unless it is loaded: from the loaded version by the
        span changes between the two, else from its cache file when it checks out, else from the
        loaded version reading only the changed entries' blobs, else every blob from the database
        (see kb_daemon.snapshot_cache.load_version)."""
        if self.version == number:
            return
        held = self.editor.codebook if self.version is not None else None
        base = None
        if held is not None and self.entry_ids is not None and len(self.entry_ids) == len(held):
            base = (self.version, Materialised(held, self.entry_ids, 0))
        self.version, self.entry_ids = None, None  # unknown until the new codebook is in: a failed load reloads
        started = time.perf_counter()
        loaded, source = load_version(session, model, number, self.cache, held, base=base)
        self.editor.load_codebook(loaded.codebook)
        self.version, self.entry_ids = number, list(loaded.entry_ids)
        self.last_load = VersionLoad(number, source, len(loaded.codebook), loaded.blobs_read,
                                     time.perf_counter() - started)
        logger.info("model %s: version %d loaded from the %s (%d entries, %d blobs read, %.2f s)", self.name,
                    number, source, len(loaded.codebook), loaded.blobs_read, self.last_load.seconds)

    def write_cache(self, db: Database, model: Model) -> None:
        """Write the loaded version's cache file in a background thread unless it exists, so that
        the next process to load this version reads one file. The codebook's tensors are captured
        now (views: O(N) small objects); the digests and the writing happen in the thread, which
        re-reads the version's rows and writes nothing when they are not the captured entries.
        One thread writes at a time; a version captured while it writes replaces any other
        waiting one, so a busy worker writes its latest version, not every one."""
        number = self.version
        if number is None or self.cache.keep_versions <= 0 or self.cache.path(model, number).exists():
            return
        snapshot = capture(model, number, self.editor.codebook)
        if snapshot is None:
            return
        with self._cache_lock:
            self._cache_pending = (db, snapshot)
            if self._cache_writer is None:
                # Not a daemon thread: a short-lived process (`kbctl ask`) finishes the write first.
                self._cache_writer = threading.Thread(target=self._write_pending, name=f"codebook-cache-{self.name}")
                self._cache_writer.start()

    def _write_pending(self) -> None:
        while True:
            with self._cache_lock:
                pending, self._cache_pending = self._cache_pending, None
                if pending is None:
                    self._cache_writer = None
                    return
            self._write_one(*pending)
            del pending
            # What the write allocated (records, arrays, this thread's arena) goes back now: the
            # worker's own trim after a job runs before this thread is done.
            trim_free_memory()

    def _write_one(self, db: Database, snapshot: Snapshot) -> None:
        try:
            with db.session() as session:
                model = get_model(session, snapshot.model_name)
                if model.id != snapshot.model_id:
                    return  # the model was deleted and its name registered again
                version = get_version(session, model, snapshot.number)
                rows = manifest_at(session, model, snapshot.number)
            started = time.perf_counter()
            path = self.cache.write(snapshot, version, rows, model)
            logger.info("model %s: version %d cached in %s (%.2f s)", snapshot.model_name, snapshot.number,
                        path, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001  (a cache is optional: the database has it all)
            logger.warning("model %s: version %d not cached: %s", snapshot.model_name, snapshot.number, exc)

    def wait_for_cache(self) -> None:
        """Wait until the cache writes asked for so far are done."""
        while True:
            with self._cache_lock:
                writer = self._cache_writer
            if writer is None:
                return
            writer.join()

    def committed(self, number: int | None, entry_ids: list[int]) -> None:
        """The in-memory codebook is now version `number` (None: a held version, not followed),
        whose entries are the rows `entry_ids` in codebook order."""
        self.version = number
        self.entry_ids = list(entry_ids) if number is not None else None

    def invalidate(self) -> None:
        """Forget the loaded version (after a failed job changed the in-memory codebook)."""
        self.version, self.entry_ids = None, None

    def to_editor_fact(self, session: Session, fact: Fact) -> Any:
        import editor

        what = f"fact {fact.id}"
        image = open_image(get_blob(session, fact.image_sha256, what)) if fact.image_sha256 else None
        negatives = []
        for negative in fact.negatives:
            if "image_sha256" in negative:
                negatives.append(editor.Negative(image=open_image(get_blob(session, negative["image_sha256"], what))))
            else:
                negatives.append(editor.Negative(question=negative["question"]))
        return editor.Fact(image, fact.question, fact.answer, rephrases=tuple(fact.rephrases),
                           negatives=tuple(negatives), fact_id=fact.id)


RuntimeFor = Callable[[Model], ModelRuntime]


@dataclass(frozen=True)
class VersionLoad:
    """How a runtime's codebook was loaded: source is "reuse" (from the version it held before),
    "cache" (the local cache file) or "database" (every blob)."""

    number: int
    source: LoadSource
    entries: int
    blobs_read: int
    seconds: float


@dataclass(frozen=True)
class Loaded:
    """A runtime ready for one unit of work, and what was read while it was made ready."""

    runtime: ModelRuntime
    model: Model  # its row as read in the loading transaction (detached)
    head: int  # the model's head version in that transaction
    version: int  # the version asked for (the head when none was); loaded unless load_codebook=False


def load_model(db: Database, model_name: str, version: int | None = None, *,
               runtime_for: RuntimeFor | None = None, load_codebook: bool = True) -> Loaded:
    """Make a model ready to answer or edit at `version` (default: the head).

    The weights load outside any transaction (seconds to minutes; on SQLite a transaction holds
    the write lock). Then one transaction checks or records the codebook spec, reads the head and
    loads the version's codebook, so the spec, the head and the codebook agree. `runtime_for`
    returns a runtime kept by the caller (a worker loads each model once); by default a fresh one
    is made. `load_codebook=False` leaves the runtime's codebook as it is: a rollback job must run
    even when the head's codebook cannot be read. An unknown model or version raises NotFound
    before anything is loaded.
    """
    with db.session() as session:
        model = get_model(session, model_name)
        if version is not None:
            get_version(session, model, version)
    runtime = runtime_for(model) if runtime_for is not None else ModelRuntime(model, db.settings)
    with db.session() as session:
        model = get_model(session, model_name)
        runtime.check_spec(session, model)
        head = model.head_version
        number = head if version is None else version
        if load_codebook:
            runtime.use_version(session, model, number)
    if load_codebook and runtime.last_load is not None and runtime.last_load.source == "database":
        runtime.write_cache(db, model)
    return Loaded(runtime, model, head, number)
