"""The use cases of kb-daemon, one method each, shared by every front door (`kbctl`, HTTP).

A method takes plain arguments (names, numbers, bytes already read, the acting user), owns its
unit of work (one transaction, committed before any worker is signalled) and returns a small
dataclass whose `as_dict()` is the JSON both front doors print. Nothing here formats text for a
terminal or reads a request; no query lives outside this module and the data modules
(`queue`, `snapshots`, `ingest`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kb_daemon.config import DEFAULT_MODEL, Settings, redact
from kb_daemon.db import Database
from kb_daemon.errors import InvalidInput, KbError, NotFound
from kb_daemon.models import (
    Fact,
    FactStatus,
    Job,
    JobStatus,
    Model,
    Version,
    as_utc,
    change_status,
    facts_in_status,
    utcnow,
)
from kb_daemon.queue import FactInput

DEMO_REFERENCE_POOL = "easy-vqa"
ProgressCallback = Callable[[int, int, str], None]  # (done, total, unit) of a running job


# ----- results ----------------------------------------------------------------------------------
class Result:
    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class InitResult(Result):
    home: str
    database: str
    demo_registered: bool


@dataclass(frozen=True)
class SchemaUpgrade(Result):
    before: str | None
    after: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.before, "to": self.after}


@dataclass(frozen=True)
class ModelInfo(Result):
    name: str
    path: str
    layer: str | None
    hparams: dict[str, Any]
    reference_pool: str | None
    canary: str | None
    canary_max_changed: float
    ingest_source: str | None
    head_version: int
    broker_warning: str | None = None

    @classmethod
    def of(cls, row: Model, broker_warning: str | None = None) -> ModelInfo:
        return cls(row.name, row.path, row.layer, dict(row.hparams), row.reference_pool, row.canary_path,
                   row.canary_max_changed, row.ingest_source, row.head_version, broker_warning)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["broker_warning"]
        return data


@dataclass(frozen=True)
class SettingsChange(Result):
    """A model's settings after `set_model`, the job that records the change, what changed."""

    model: ModelInfo
    job_id: int
    changed: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {**self.model.as_dict(), "job_id": self.job_id, "changed": self.changed}


@dataclass(frozen=True)
class Queued(Result):
    """A job was queued (and its worker signalled); `outcome` is set when the caller waited."""

    job_id: int
    fact_id: str | None = None
    rollback_to: int | None = None
    outcome: JobOutcome | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.fact_id is not None:
            data["fact_id"] = self.fact_id
        if self.rollback_to is not None:
            data["rollback_to"] = self.rollback_to
        data["job_id"] = self.job_id
        if self.outcome is not None:
            data.update(self.outcome.as_dict())
        return data


@dataclass(frozen=True)
class JobOutcome(Result):
    """How a waited-for job ended: done or held (a failure raises)."""

    status: str
    version: int | None
    canaries: dict[str, Any] | None = None
    # Per applied fact that collided with existing ones: {"fact_id", "answer", "conflicts", "total"},
    # the conflicts as the job result keeps them (`editor.fact.Conflict`, at most
    # `workers.runner.REPORT_CONFLICTS`) and how many there were.
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return self.status == JobStatus.HELD.value

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "status": self.status, "conflicts": self.conflicts}
        if self.held:
            data["canaries"] = self.canaries
        return data

    @classmethod
    def of(cls, status: str, result: dict[str, Any]) -> JobOutcome:
        conflicts = [{"fact_id": r.get("fact_id"), "answer": r.get("answer"), "conflicts": r["conflicts"],
                      "total": r.get("conflicts_total", len(r["conflicts"]))}
                     for r in result.get("reports") or [] if r.get("conflicts")]
        return cls(status, result.get("version"), result.get("canaries"), conflicts)


@dataclass(frozen=True)
class IngestResult(Result):
    model: str
    source: str
    job_id: int | None
    new: int
    changed: int
    retried: int  # facts whose earlier job failed, queued again
    unchanged: int
    retract: int  # with --sync: applied facts of this same source that are no longer in it
    skipped: list[dict[str, Any]]  # unchanged lines of facts a retract or rollback removed
    outcome: JobOutcome | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "outcome"}
        if self.outcome is not None:
            data.update(self.outcome.as_dict())
        return data


@dataclass(frozen=True)
class Cancelled(Result):
    """`status` is cancelled (it was queued) or running (it stops at its next fact boundary)."""

    job_id: int
    status: str


@dataclass(frozen=True)
class Promoted(Result):
    version: int
    head: int


@dataclass(frozen=True)
class JobInfo(Result):
    id: int
    seq: int
    kind: str
    status: str
    payload: dict[str, Any]
    attempts: int
    error: str | None
    actor: str
    source: str
    created_at: datetime
    finished_at: datetime | None
    progress: tuple[int, int]
    version: int | None
    started_at: datetime | None = None

    @classmethod
    def of(cls, job: Job) -> JobInfo:
        return cls(job.id, job.seq, job.kind, job.status, job.payload, job.attempts, job.error, job.actor,
                   job.source, job.created_at, job.finished_at, (job.progress_done, job.progress_total),
                   (job.result or {}).get("version"), job.started_at)

    @property
    def unfinished(self) -> bool:
        return self.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["progress"] = list(self.progress)
        return data


@dataclass(frozen=True)
class ModelStatus(Result):
    model: str
    head_version: int
    queue_depth: int
    running_job: int | None
    running_seconds: float | None
    running_progress: tuple[int, int] | None  # (done, total) facts of the running job
    lease_owner: str | None  # the worker holding the running job
    lease_expires_in_seconds: float | None  # negative: the lease lapsed
    worker_lost: bool  # the running job's lease lapsed: its worker stopped renewing it
    retry_at: datetime | None  # when the reaper hands a lost job out again, at the latest
    last_worker: str | None
    last_worker_seen_seconds_ago: float | None  # a claim or a lease renewal, whichever was last

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["running_progress"] = list(self.running_progress) if self.running_progress else None
        return data


@dataclass(frozen=True)
class VersionInfo(Result):
    version: int
    parent: int | None
    kind: str
    entries: int
    added: list[str]
    removed: list[str]
    held: bool
    actor: str
    source: str
    created_at: datetime
    content_sha256: str
    promoted_by: str | None  # who made this held version the head (it was held until then)

    @classmethod
    def of(cls, row: Version) -> VersionInfo:
        return cls(row.number, row.parent, row.kind, row.num_entries, list(row.summary.get("added", [])),
                   list(row.summary.get("removed", [])), row.held, row.actor, row.source, row.created_at,
                   row.content_sha256, row.summary.get("promoted_by"))


@dataclass(frozen=True)
class FactSummary(Result):
    fact_id: str
    question: str
    answer: str
    base_radius: float | None = None


@dataclass(frozen=True)
class FactCard(Result):
    fact_id: str
    question: str
    answer: str
    status: str
    image_sha256: str | None


@dataclass(frozen=True)
class VersionDetail(Result):
    info: VersionInfo
    facts: list[FactSummary]
    canaries: dict[str, Any] | None = None  # a batch's canary check: total, changed, broken (before/after)

    def as_dict(self) -> dict[str, Any]:
        data = {**self.info.as_dict(), "facts": [f.as_dict() for f in self.facts]}
        if self.canaries is not None:
            data["canaries"] = self.canaries
        return data


@dataclass(frozen=True)
class RadiusChange(Result):
    fact_id: str
    before: float
    after: float

    def as_dict(self) -> dict[str, Any]:
        return {"fact_id": self.fact_id, "from": self.before, "to": self.after}


@dataclass(frozen=True)
class VersionDiff(Result):
    first: int
    second: int
    added: list[str]
    removed: list[str]
    radii_changed: list[RadiusChange]

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.radii_changed)

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.first, "to": self.second, "added": self.added, "removed": self.removed,
                "radii_changed": [c.as_dict() for c in self.radii_changed]}


@dataclass(frozen=True)
class ExportBundle:
    """A version's codebook bytes (safetensors) and the metadata that goes beside them."""

    version: int
    codebook: bytes
    metadata: dict[str, Any]

    @property
    def entries(self) -> int:
        return len(self.metadata["facts"])


@dataclass(frozen=True)
class FactDetail(Result):
    """A ledger row with the edit report of the job that applied it (None before that)."""

    fact_id: str
    status: str
    question: str
    answer: str
    rephrases: list[str]
    negatives: list[dict[str, str]]
    key: str | None
    source: str
    actor: str
    submitted_at: datetime
    entered_version: int | None
    left_version: int | None
    superseded_by: str | None
    error: str | None
    report: dict[str, Any] | None
    warnings: list[str]
    image_sha256: str | None = None  # the fact's image blob (None for a text-only model)
    supersedes: str | None = None  # the fact this one was submitted to replace


def report_warnings(report: dict[str, Any] | None) -> list[str]:
    """What an operator should look at in an edit report, one short phrase each."""
    if not report:
        return []
    radius = float(report["radius"])
    warnings = []
    inside = sum(1 for d in report.get("negative_distances", []) if d <= radius)
    if inside:
        warnings.append(f"{inside} negative{'s' if inside > 1 else ''} inside the radius")
    outside = sum(1 for d in report.get("positive_distances", []) if d > radius)
    if outside:
        warnings.append(f"{outside} rephrasing{'s' if outside > 1 else ''} outside the radius")
    if report.get("radius_fallback"):
        warnings.append(f"radius fallback: {report['radius_fallback']}")
    if report.get("converged") is False:
        warnings.append(f"values did not converge in {report.get('steps')} steps")
    listed = report.get("conflicts") or []
    warnings.extend(conflict_phrase(c) for c in listed)
    if report.get("conflicts_total", 0) > len(listed):
        warnings.append(f"{report['conflicts_total'] - len(listed)} more conflicts not listed (the job keeps "
                        f"{len(listed)} per fact: those that changed what an input answers first)")
    if report.get("supersede_skipped"):
        warnings.append(f"not superseded: {report['supersede_skipped']}")
    return warnings


def conflict_phrase(conflict: dict[str, Any]) -> str:
    """One conflict of an edit report (`editor.fact.Conflict`) as an operator reads it."""
    how = ("its entry fired on this fact's input" if conflict["kind"] == "fires_on_new_input"
           else "their scopes overlapped")
    now = conflict["now_answers"]
    return (f"conflicts with {conflict['fact_id']} ({conflict['answer']!r}): {how}; its radius "
            f"{conflict['radius_before']:.4g} -> {conflict['radius_after']:.4g}, its own input now answers "
            + (repr(now) if now is not None else "as the unedited model")
            + "; supersede it with --supersedes if this fact replaces it")


@dataclass(frozen=True)
class Answer(Result):
    answer: str
    version: int
    fact_id: str | None


# ----- the service --------------------------------------------------------------------------------
@dataclass
class Service:
    """The use cases over one deployment's database and broker (settings)."""

    settings: Settings
    _db: Database | None = field(default=None, repr=False)
    _schema_checked: bool = field(default=False, repr=False)

    @property
    def db(self) -> Database:
        """The database, without checking its schema (set-up and maintenance use this)."""
        if self._db is None:
            self._db = Database(self.settings)
        return self._db

    def checked_db(self) -> Database:
        """The database after refusing a schema this code does not expect ("run kbctl db upgrade")."""
        if not self._schema_checked:
            self.db.check_schema()
            self._schema_checked = True
        return self.db

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()

    # ----- set-up -----------------------------------------------------------------------------
    def init(self, actor: str) -> InitResult:
        """Create the schema, the broker's tables and the demo model's registration. Idempotent."""
        from kb_daemon.notify import prepare_broker
        from kb_daemon.queue import register_model

        self.db.upgrade()
        prepare_broker(self.settings, [DEFAULT_MODEL])
        with self.db.session() as session:
            exists = _find_model(session, DEFAULT_MODEL) is not None
            if not exists:
                register_model(session, DEFAULT_MODEL, "demo", reference_pool=DEMO_REFERENCE_POOL,
                               actor=actor, source="init")
        self._schema_checked = True
        return InitResult(str(self.settings.home), redact(self.settings.database_url), not exists)

    def upgrade_schema(self) -> SchemaUpgrade:
        before = self.db.current_revision()
        self.db.upgrade()
        return SchemaUpgrade(before, self.db.current_revision())

    def add_model(self, name: str, path: str, *, actor: str, layer: str | None = None,
                  hparams: dict[str, Any] | None = None, reference_pool: str | None = None,
                  canary: str | None = None, canary_max_changed: float = 0.0,
                  ingest_source: str | None = None) -> ModelInfo:
        """Register a model; paths are stored as given (the CLI resolves them against its cwd)."""
        from kb_daemon.notify import prepare_broker
        from kb_daemon.queue import register_model

        with self.checked_db().session() as session:
            row = register_model(session, name, path, layer=layer, hparams=hparams or {},
                                 reference_pool=reference_pool, canary_path=canary,
                                 canary_max_changed=canary_max_changed, ingest_source=ingest_source,
                                 actor=actor)
            info = ModelInfo.of(row)
        try:  # the model's queue exists before anyone publishes to it (see prepare_broker)
            prepare_broker(self.settings, [name])
        except Exception as exc:  # noqa: BLE001  (the worker declares it again when it starts)
            info = replace(info, broker_warning=f"could not declare the queue of {name} on the broker "
                                           f"{redact(self.settings.broker_url)} ({type(exc).__name__}); "
                                           "its worker declares it on start")
        return info

    def set_model(self, name: str, *, actor: str, hparams: dict[str, Any] | None = None,
                  reference_pool: str | None = None, canary: str | None = None,
                  canary_max_changed: float | None = None, ingest_source: str | None = None) -> SettingsChange:
        """Change a registered model's settings. Recorded as a job in its ordered queue: jobs queued
        before the change run with the old settings, jobs queued after it with the new ones;
        versions already built keep what they were built with. The method and the distance cannot
        change (the stored codebooks were made under them)."""
        from editor.config import EditConfig  # a dataclass module: no torch
        from kb_daemon.queue import lock_model, model_settings, record_settings_change

        with self.checked_db().session() as session:
            row = lock_model(session, _model(session, name).id)
            before, before_source = model_settings(row), row.ingest_source
            merged = {**row.hparams, **(hparams or {})}
            for fixed in ("method", "distance"):
                if merged.get(fixed) != row.hparams.get(fixed):
                    raise InvalidInput(f"{fixed} of model {name!r} cannot change from {row.hparams.get(fixed)!r} "
                                       f"to {merged.get(fixed)!r}: its codebooks were built under it; register the "
                                       "weights again as another model")
            pinned = EditConfig.from_dict(merged).to_dict()
            if canary_max_changed is not None and not 0.0 <= canary_max_changed <= 1.0:
                raise InvalidInput(f"canary share must lie in [0, 1], got {canary_max_changed}")
            row.hparams = pinned
            row.reference_pool = reference_pool if reference_pool is not None else row.reference_pool
            row.canary_path = canary if canary is not None else row.canary_path
            row.canary_max_changed = canary_max_changed if canary_max_changed is not None else row.canary_max_changed
            row.ingest_source = ingest_source if ingest_source is not None else row.ingest_source
            after = model_settings(row)
            changed = [f"hparams.{k}" for k, v in sorted(after["hparams"].items()) if before["hparams"].get(k) != v]
            changed += [k for k in sorted(before) if k != "hparams" and before[k] != after[k]]
            if ingest_source is not None and ingest_source != before_source:
                changed.append("ingest_source")
            if not changed:
                raise InvalidInput(f"model {name!r} already has these settings; nothing changed")
            job = record_settings_change(session, row, before, after, actor=actor, source="cli")
            return SettingsChange(ModelInfo.of(row), job.id, changed)

    def list_models(self) -> list[ModelInfo]:
        with self.checked_db().session() as session:
            return [ModelInfo.of(m) for m in session.execute(select(Model).order_by(Model.name)).scalars()]

    # ----- changes ----------------------------------------------------------------------------
    def submit_fact(self, model: str, fact: FactInput, *, actor: str, source: str = "cli") -> Queued:
        """Record a fact (validated here, before anything is written) and queue its edit."""
        from kb_daemon.admission import admit
        from kb_daemon.queue import submit_fact

        fact = fact.cleaned()
        db = self.checked_db()
        with db.session() as session:  # short: on SQLite every transaction holds the write lock
            admit(self.settings, _model(session, model), fact)  # the model's tokenizer and limits
        with db.session() as session:
            row, job = submit_fact(session, _model(session, model), fact, actor=actor, source=source)
            queued = Queued(job.id, fact_id=row.id)
        self._signal(model)
        return queued

    def retract(self, model: str, fact_id: str, *, actor: str, source: str = "cli") -> Queued:
        from kb_daemon.queue import enqueue, get_fact

        with self.checked_db().session() as session:
            row = _model(session, model)
            fact = get_fact(session, row, fact_id)
            if fact.status != FactStatus.APPLIED.value:
                raise InvalidInput(f"fact {fact_id} is {fact.status}, not applied; nothing to retract")
            job = enqueue(session, row, "retract", {"fact_id": fact_id}, actor=actor, source=source)
            queued = Queued(job.id, fact_id=fact_id)
        self._signal(model)
        return queued

    def rollback(self, model: str, version: int, *, actor: str, source: str = "rollback") -> Queued:
        """Queue a new head whose content equals `version` (history is kept)."""
        from kb_daemon.queue import enqueue
        from kb_daemon.snapshots import get_version

        with self.checked_db().session() as session:
            row = _model(session, model)
            get_version(session, row, version)
            job = enqueue(session, row, "rollback", {"version": version}, actor=actor, source=source)
            queued = Queued(job.id, rollback_to=version)
        self._signal(model)
        return queued

    def promote(self, model: str, version: int, *, actor: str) -> Promoted:
        """Make a held batch version the head despite its broken canaries."""
        from kb_daemon.queue import lock_model
        from kb_daemon.snapshots import promote_version

        with self.checked_db().session() as session:
            row = lock_model(session, _model(session, model).id)
            promote_version(session, row, version, actor)
        return Promoted(version, version)

    def ingest(self, model: str, source: str | Path, *, sync: bool, actor: str, origin: str = "cli",
               name: str | None = None) -> IngestResult:
        """Validate the whole source, compare it with the ledger and queue one batch (or nothing).
        `name` is what the source is known by (default: its path; an upload: its file name)."""
        from kb_daemon.ingest import ingest_source

        data = ingest_source(self.checked_db(), self.settings, model, source, sync=sync, actor=actor, origin=origin,
                             name=name)
        result = IngestResult(**data)
        if result.job_id is not None:
            self._signal(model)
        return result

    def cancel(self, model: str, job_id: int, *, actor: str) -> Cancelled:
        """A queued job never runs; a running one stops at its next fact boundary, storing nothing.
        Its pending facts end as cancelled in the ledger."""
        from kb_daemon.queue import get_job, lock_model

        with self.checked_db().session() as session:
            row = lock_model(session, _model(session, model).id)  # the lock a worker's commit takes
            job = _job_of(session, row, get_job(session, job_id))
            if job.status == JobStatus.QUEUED.value:
                change_status(job, JobStatus.CANCELLED)
                job.error, job.finished_at = f"cancelled by {actor}", utcnow()
                for fact in facts_in_status(session, job, FactStatus.PENDING):
                    change_status(fact, FactStatus.CANCELLED)
                    fact.error = f"cancelled by {actor} (job {job_id})"
                return Cancelled(job_id, JobStatus.CANCELLED.value)
            if job.status == JobStatus.RUNNING.value:
                job.cancel_requested_by = actor
                return Cancelled(job_id, JobStatus.RUNNING.value)
            raise InvalidInput(f"job {job_id} is {job.status}; only a queued or running job can be cancelled")

    def retry(self, model: str, job_id: int, *, actor: str) -> Queued:
        """Queue a failed or cancelled job's work again, as a new job at the end of the queue; its
        facts go back to pending."""
        from kb_daemon.queue import enqueue, get_job

        ended = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)
        with self.checked_db().session() as session:
            row = _model(session, model)
            job = _job_of(session, row, get_job(session, job_id))
            if job.status not in ended:
                raise InvalidInput(f"job {job_id} is {job.status}; only a failed or cancelled job can be retried")
            for status in (FactStatus.FAILED, FactStatus.CANCELLED):
                for fact in facts_in_status(session, job, status):
                    change_status(fact, FactStatus.PENDING)
                    fact.error = None
            new = enqueue(session, row, job.kind, dict(job.payload), actor=actor, source=f"retry:{job_id}")
            queued = Queued(new.id)
        self._signal(model)
        return queued

    def wait(self, job_id: int, timeout_seconds: float, progress: ProgressCallback | None = None,
             poll_seconds: float = 0.2) -> JobOutcome:
        """Poll a job until it is done or held; a failed job or the timeout raises `KbError`."""
        from kb_daemon.queue import get_job

        db = self.checked_db()
        deadline = time.monotonic() + timeout_seconds
        while True:
            with db.session() as session:
                job = get_job(session, job_id)
                status, result, error = job.status, job.result or {}, job.error
                done, total, kind = job.progress_done, job.progress_total, job.kind
            if progress is not None and total:
                progress(done, total, "optimisation steps" if kind == "edit" else "facts")
            if status in (JobStatus.DONE.value, JobStatus.HELD.value):
                return JobOutcome.of(status, result)
            if status == JobStatus.FAILED.value:
                raise KbError(f"job {job_id} failed: {error}")
            if status == JobStatus.CANCELLED.value:
                raise KbError(f"job {job_id} was {error}")
            if time.monotonic() > deadline:
                raise KbError(f"timed out after {timeout_seconds:.0f} s waiting for job {job_id} ({status}); "
                              "is a worker running? start one with `kbctl up` or `kbctl worker`")
            time.sleep(poll_seconds)

    def _signal(self, model: str) -> None:
        """Wake the model's worker; called only after the job's transaction committed."""
        from kb_daemon.notify import signal_model

        signal_model(self.settings, model)

    # ----- inspection -------------------------------------------------------------------------
    def jobs(self, model: str, limit: int = 20) -> list[JobInfo]:
        with self.checked_db().session() as session:
            row = _model(session, model)
            return [JobInfo.of(j) for j in session.execute(
                select(Job).where(Job.model_id == row.id).order_by(Job.seq.desc()).limit(limit)).scalars()]

    def job(self, model: str, job_id: int) -> JobInfo:
        from kb_daemon.queue import get_job

        with self.checked_db().session() as session:
            return JobInfo.of(_job_of(session, _model(session, model), get_job(session, job_id)))

    def find_job(self, job_id: int) -> tuple[str, JobInfo]:
        """Job `job_id` of whichever model, with that model's name."""
        from kb_daemon.queue import get_job

        with self.checked_db().session() as session:
            job = get_job(session, job_id)
            model = session.get(Model, job.model_id)
            assert model is not None
            return model.name, JobInfo.of(job)

    def wait_ended(self, model: str, job_id: int, timeout_seconds: float, poll_seconds: float = 0.2) -> JobInfo:
        """Poll until the job is no longer queued or running, whatever its end."""
        deadline = time.monotonic() + timeout_seconds
        while (info := self.job(model, job_id)).unfinished:
            if time.monotonic() > deadline:
                raise KbError(f"timed out after {timeout_seconds:.0f} s waiting for job {job_id} ({info.status})")
            time.sleep(poll_seconds)
        return info

    def status(self, model: str) -> ModelStatus:
        from kb_daemon.queue import queue_depth

        with self.checked_db().session() as session:
            row = _model(session, model)
            running = session.execute(select(Job).where(Job.model_id == row.id, Job.status == JobStatus.RUNNING.value)
                                      .order_by(Job.seq).limit(1)).scalar_one_or_none()
            now = utcnow()
            expires = as_utc(running.lease_expires_at) if running is not None else None
            expires_in = round((expires - now).total_seconds(), 1) if expires is not None else None
            lost = expires_in is not None and expires_in < 0
            return ModelStatus(
                row.name, row.head_version, queue_depth(session, row),
                running.id if running else None,
                _seconds_since(now, running.started_at) if running else None,
                (running.progress_done, running.progress_total) if running else None,
                running.lease_owner if running else None, expires_in, lost,
                expires + timedelta(seconds=self.settings.reaper_seconds) if lost and expires else None,
                row.last_worker, _seconds_since(now, row.last_worker_seen_at),
            )

    def history(self, model: str, limit: int = 50, before: int | None = None) -> tuple[int, list[VersionInfo]]:
        """(head version, the newest `limit` versions below `before` (default: all), newest first)."""
        with self.checked_db().session() as session:
            row = _model(session, model)
            query = select(Version).where(Version.model_id == row.id)
            if before is not None:
                query = query.where(Version.number < before)
            versions = [VersionInfo.of(v) for v in session.execute(
                query.order_by(Version.number.desc()).limit(limit)).scalars()]
            return row.head_version, versions

    def fact_cards(self, model: str, fact_ids: Sequence[str]) -> list[FactCard]:
        """Short descriptions of facts of `model` (unknown ids are left out), in the order asked."""
        with self.checked_db().session() as session:
            row = _model(session, model)
            found = _facts_by_id(session, list(fact_ids))
            return [FactCard(f.id, f.question, f.answer, f.status, f.image_sha256)
                    for f in (found.get(i) for i in fact_ids) if f is not None and f.model_id == row.id]

    def radius_at(self, model: str, fact_id: str, version: int | None = None) -> float | None:
        """The effective radius of a fact's entry in `version` (default: the head); None when the
        version does not hold it (or predates stored radii)."""
        from sqlalchemy import or_

        from kb_daemon.models import Entry, EntrySpan

        with self.checked_db().session() as session:
            row = _model(session, model)
            number = row.head_version if version is None else version
            return session.execute(
                select(EntrySpan.radius).join(Entry, Entry.id == EntrySpan.entry_id).where(
                    Entry.model_id == row.id, Entry.fact_id == fact_id, EntrySpan.from_version <= number,
                    or_(EntrySpan.to_version.is_(None), EntrySpan.to_version > number))).scalar_one_or_none()

    def held_versions(self, model: str) -> list[VersionInfo]:
        """Batch versions the canary gate held and nobody has promoted yet, newest first."""
        with self.checked_db().session() as session:
            row = _model(session, model)
            rows = session.execute(select(Version).where(Version.model_id == row.id, Version.held.is_(True))
                                   .order_by(Version.number.desc())).scalars()
            return [VersionInfo.of(v) for v in rows if not v.summary.get("promoted_by")]

    def image(self, model: str, digest: str) -> bytes:
        """The bytes of an image that a fact of `model` was given (its own or a negative)."""
        from kb_daemon.models import Blob
        from kb_daemon.snapshots import get_blob

        with self.checked_db().session() as session:
            row = _model(session, model)
            blob = session.get(Blob, digest)
            owned = session.execute(select(Fact.id).where(Fact.model_id == row.id, Fact.image_sha256 == digest)
                                    .limit(1)).first() is not None
            if blob is None or blob.kind != "image" or not (owned or _negative_of(session, row, digest)):
                raise NotFound(f"model {model!r} has no image {digest[:12]}")
            return get_blob(session, digest, f"image {digest[:12]}")

    def head_at(self, model: str, when: datetime) -> VersionInfo | None:
        """The version that was head at `when`: the newest one created by then that was not held
        (a promoted version counts from its creation). None before the model existed."""
        with self.checked_db().session() as session:
            row = _model(session, model)
            found = session.execute(
                select(Version).where(Version.model_id == row.id, Version.created_at <= when,
                                      (Version.held.is_(False)) | (Version.summary["promoted_by"].isnot(None)))
                .order_by(Version.number.desc()).limit(1)).scalar_one_or_none()
            return VersionInfo.of(found) if found is not None else None

    def version(self, model: str, version: int) -> VersionDetail:
        """`show` without the list of every fact the version holds (what it added and removed is
        in its info): one row, for pages."""
        from kb_daemon.snapshots import get_version

        with self.checked_db().session() as session:
            stored = get_version(session, _model(session, model), version)
            return VersionDetail(VersionInfo.of(stored), [], stored.summary.get("canaries"))

    def show(self, model: str, version: int) -> VersionDetail:
        from kb_daemon.snapshots import entries_at, get_version

        with self.checked_db().session() as session:
            row = _model(session, model)
            stored = get_version(session, row, version)
            entries = entries_at(session, row, version)
            facts = _facts_by_id(session, [e.fact_id for e in entries])
            return VersionDetail(VersionInfo.of(stored),
                                 [FactSummary(e.fact_id, facts[e.fact_id].question, facts[e.fact_id].answer,
                                              e.base_radius) for e in entries],
                                 stored.summary.get("canaries"))

    def diff(self, model: str, first: int, second: int) -> VersionDiff:
        """Facts added and removed from `first` to `second`, and radii changed. Read from the spans'
        stored radii (no blob is read) unless a span predates them; then both versions are built."""
        from kb_daemon.snapshots import get_version, materialise, radii_by_fact_at

        with self.checked_db().session() as session:
            row = _model(session, model)
            get_version(session, row, first)
            get_version(session, row, second)
            radii_a, radii_b = radii_by_fact_at(session, row, first), radii_by_fact_at(session, row, second)
            if None in radii_a.values() or None in radii_b.values():
                a, b = materialise(session, row, first), materialise(session, row, second)
                radii_a = dict(zip(a.fact_ids, a.radii.tolist(), strict=True))
                radii_b = dict(zip(b.fact_ids, b.radii.tolist(), strict=True))
        return VersionDiff(
            first, second,
            added=[f for f in radii_b if f not in radii_a],
            removed=[f for f in radii_a if f not in radii_b],
            radii_changed=[RadiusChange(f, radii_a[f], radii_b[f])
                           for f in radii_b if f in radii_a and radii_a[f] != radii_b[f]],
        )

    def export(self, model: str, version: int) -> ExportBundle:
        """A version's codebook (loadable by `editor` anywhere) and its metadata."""
        from kb_daemon.snapshots import get_version, materialise

        with self.checked_db().session() as session:
            row = _model(session, model)
            meta = VersionInfo.of(get_version(session, row, version)).as_dict()
            codebook = materialise(session, row, version)
            facts = _facts_by_id(session, list(codebook.fact_ids))
            meta.update({"model": row.name, "model_path": row.path, "layer": row.layer, "spec": row.spec,
                         "hparams": row.hparams,
                         "facts": [{"fact_id": f, "question": facts[f].question, "answer": facts[f].answer}
                                   for f in codebook.fact_ids]})
        return ExportBundle(version, codebook.to_bytes(), meta)

    def fact(self, model: str, fact_id: str) -> FactDetail:
        """One fact of the ledger, its status and the report of the edit that applied it."""
        from kb_daemon.queue import get_fact
        from kb_daemon.snapshots import get_version

        with self.checked_db().session() as session:
            row = _model(session, model)
            fact = get_fact(session, row, fact_id)
            report = None
            if fact.entered_version is not None:
                job_id = get_version(session, row, fact.entered_version).job_id
                job = session.get(Job, job_id) if job_id is not None else None
                for item in ((job.result or {}).get("reports") or []) if job is not None else []:
                    if item.get("fact_id") == fact_id:
                        report = dict(item)
            return FactDetail(fact.id, fact.status, fact.question, fact.answer, list(fact.rephrases),
                              list(fact.negatives), fact.key, fact.source, fact.actor, fact.submitted_at,
                              fact.entered_version, fact.left_version, fact.superseded_by, fact.error, report,
                              report_warnings(report), fact.image_sha256, fact.supersedes)

    def ask(self, model: str, image: bytes | None, question: str, version: int | None = None) -> Answer:
        """Answer with the edited model at `version` (default: the head), loaded in this process."""
        from kb_daemon.queue import MAX_QUESTION_CHARS, clean_text
        from kb_daemon.runtime import load_model, open_image

        question = clean_text(question, "question", MAX_QUESTION_CHARS)
        loaded = load_model(self.checked_db(), model, version)
        answer = loaded.runtime.editor.answers([(open_image(image), question)])[0]
        return Answer(answer.text, loaded.version, answer.fact_id)


def parse_hparams(pairs: Sequence[str]) -> dict[str, Any]:
    """`["alpha=0.1"]` -> {"alpha": 0.1}: JSON values where they parse, else strings. Checked (unknown
    keys, bad values) and pinned when the model is registered."""
    from editor.eval.hparams import parse_hparams as parse

    return parse(list(pairs))


# ----- helpers over one session ---------------------------------------------------------------------
def _find_model(session: Session, name: str) -> Model | None:
    return session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()


def _model(session: Session, name: str) -> Model:
    from kb_daemon.queue import get_model

    return get_model(session, name)


def _job_of(session: Session, model: Model, job: Job) -> Job:
    """`job` if it belongs to `model`; a job of another model is reported as not found."""
    if job.model_id != model.id:
        raise NotFound(f"model {model.name!r} has no job {job.id}")
    return job


def _negative_of(session: Session, model: Model, digest: str) -> bool:
    """Whether some fact of `model` has the image `digest` among its negatives (a text search of
    the JSON column narrows the facts, the decoded list decides)."""
    from sqlalchemy import String, cast

    candidates = session.execute(select(Fact.negatives).where(
        Fact.model_id == model.id, cast(Fact.negatives, String).contains(digest)).limit(20)).scalars()
    return any(n.get("image_sha256") == digest for negatives in candidates for n in negatives)


def _facts_by_id(session: Session, fact_ids: Sequence[str]) -> dict[str, Fact]:
    """The ledger rows of `fact_ids` in one query per 500 ids."""
    found: dict[str, Fact] = {}
    ids = list(dict.fromkeys(fact_ids))
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        found.update((f.id, f) for f in session.execute(select(Fact).where(Fact.id.in_(chunk))).scalars())
    return found


def _seconds_since(now: datetime, then: datetime | None) -> float | None:
    moment = as_utc(then)
    return round((now - moment).total_seconds(), 1) if moment is not None else None
