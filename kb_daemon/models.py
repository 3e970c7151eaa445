"""Database schema (SQLAlchemy 2). Alembic migrations in migrations/ are the only way it is created."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from kb_daemon.errors import KbError

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes even for timezone-aware columns; they are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Model(Base):
    """A registered base model and how it is edited."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    path: Mapped[str] = mapped_column(Text)
    layer: Mapped[str | None] = mapped_column(Text)
    hparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reference_pool: Mapped[str | None] = mapped_column(Text)  # "easy-vqa" or a JSON Lines file
    canary_path: Mapped[str | None] = mapped_column(Text)
    canary_max_changed: Mapped[float] = mapped_column(Float, default=0.0)
    ingest_source: Mapped[str | None] = mapped_column(Text)  # what the nightly batch reads
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # codebook spec, set by the first worker
    head_version: Mapped[int] = mapped_column(Integer, default=0)
    next_job_seq: Mapped[int] = mapped_column(Integer, default=0)
    last_worker: Mapped[str | None] = mapped_column(String(200))
    last_worker_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Blob(Base):
    """Content-addressed bytes: images of facts and codebook entry tensors (safetensors)."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Fact(Base):
    """The ledger: every fact ever submitted, who sent it, from where, and what became of it."""

    __tablename__ = "facts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    key: Mapped[str | None] = mapped_column(String(200))  # stable key from an ingestion source
    image_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    rephrases: Mapped[list[str]] = mapped_column(JSON, default=list)
    negatives: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    source: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # a FactStatus; see FACT_TRANSITIONS
    entered_version: Mapped[int | None] = mapped_column(Integer)
    left_version: Mapped[int | None] = mapped_column(Integer)
    superseded_by: Mapped[str | None] = mapped_column(String(40))
    # The applied fact this one replaces over its scope (`submit-fact --supersedes`).
    supersedes: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("ix_facts_model_key", "model_id", "key"),)


class Entry(Base):
    """A codebook entry; its tensors live once in a blob and are shared by every version."""

    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # creation order = codebook order
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    fact_id: Mapped[str] = mapped_column(ForeignKey("facts.id"), unique=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    answer: Mapped[str] = mapped_column(Text)  # normalised
    input_id: Mapped[str] = mapped_column(String(64))
    base_radius: Mapped[float] = mapped_column(Float)


class EntrySpan(Base):
    """Entry `entry_id` belongs to versions from_version <= v < to_version (open when NULL)."""

    __tablename__ = "entry_spans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    entry_id: Mapped[int] = mapped_column(ForeignKey("entries.id"))
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    # The entry's effective radius in these versions (after GRACE's overlap rule); a change of
    # radius closes the span and opens another. NULL on spans written before migration 0002.
    radius: Mapped[float | None] = mapped_column(Float)
    __table_args__ = (
        Index("ix_entry_spans_model_versions", "model_id", "from_version", "to_version"),
        Index("ix_entry_spans_model_to_version", "model_id", "to_version"),
    )


class Version(Base):
    """A numbered knowledge state of one model. History is never rewritten."""

    __tablename__ = "versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    parent: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))  # init, edit, retract, rollback, batch
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    content_sha256: Mapped[str] = mapped_column(String(64))
    num_entries: Mapped[int] = mapped_column(Integer, default=0)
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    actor: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_versions_model_number"),)


class Job(Base):
    """The queue of record. Celery messages only say that a model has work waiting."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    seq: Mapped[int] = mapped_column(Integer)  # per-model order of execution
    kind: Mapped[str] = mapped_column(String(20))  # edit, retract, rollback, batch
    status: Mapped[str] = mapped_column(String(20), default="queued")  # a JobStatus; see JOB_TRANSITIONS
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # Who asked to cancel this running job; its worker stops at the next fact boundary.
    cancel_requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        UniqueConstraint("model_id", "seq", name="uq_jobs_model_seq"),
        Index("ix_jobs_model_status", "model_id", "status"),
    )

    @property
    def fact_ids(self) -> list[str]:
        """The facts this job applies: an edit's one, a batch's list (retracts and rollbacks: none)."""
        if self.kind == "edit":
            return [self.payload["fact_id"]]
        return list(self.payload.get("facts", [])) if self.kind == "batch" else []


class ApiToken(Base):
    """A bearer token of the HTTP server. Only its SHA-256 is stored; the text is shown once, at creation.

    The name is the actor the audit records for everything done with the token, so a name is never
    reused, not even after its token is revoked: revoking keeps the row.
    """

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # a Role
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # hex
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_by: Mapped[str | None] = mapped_column(String(200))
    # Refreshed by authentication at most once a minute, so that a busy token costs no write per request.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Role(str, enum.Enum):
    """What a token may do; each role may do everything the ones before it may.

    reader: ask and read. editor: also submit and retract facts. admin: also roll back, promote,
    ingest and export. The values are the strings stored in `api_tokens.role`.
    """

    READER = "reader"
    EDITOR = "editor"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the order reader < editor < admin (the order of definition)."""
        return list(Role).index(self)

    def allows(self, needed: Role | str) -> bool:
        """Whether a caller with this role may do what `needed` may (admin ⊇ editor ⊇ reader)."""
        return self.rank >= Role(needed).rank


# ----- statuses -------------------------------------------------------------------------------
class JobStatus(str, enum.Enum):
    """Where a job stands. The values are the strings stored in `jobs.status`."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    HELD = "held"  # its version was held by the canary check; `kbctl promote` makes it done
    CANCELLED = "cancelled"  # `kbctl cancel`: never ran, or stopped at a fact boundary with nothing stored


class FactStatus(str, enum.Enum):
    """What became of a fact. The values are the strings stored in `facts.status`."""

    PENDING = "pending"
    APPLIED = "applied"  # in the head version
    HELD = "held"  # in a held version, waiting for `kbctl promote`
    SUPERSEDED = "superseded"
    RETRACTED = "retracted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its job was cancelled before the fact was applied


# Every change of a status goes through `change_status`, which allows exactly these moves.
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({
        JobStatus.RUNNING,  # claimed with a lease
        JobStatus.FAILED,  # given up after too many attempts
        JobStatus.CANCELLED,  # cancelled before any worker claimed it
    }),
    JobStatus.RUNNING: frozenset({
        JobStatus.RUNNING,  # its lease expired and a worker claimed it again
        JobStatus.QUEUED,  # released: its result was computed on a head that moved
        JobStatus.DONE,
        JobStatus.HELD,
        JobStatus.FAILED,  # the job failed, or was given up after too many attempts
        JobStatus.CANCELLED,  # its worker saw the cancel request at a fact boundary
    }),
    JobStatus.HELD: frozenset({JobStatus.DONE}),  # its version promoted
    JobStatus.DONE: frozenset(),
    JobStatus.FAILED: frozenset(),  # `kbctl retry` queues a new job with the same work
    JobStatus.CANCELLED: frozenset(),
}

FACT_TRANSITIONS: dict[FactStatus, frozenset[FactStatus]] = {
    FactStatus.PENDING: frozenset({
        FactStatus.APPLIED,
        FactStatus.HELD,
        FactStatus.SUPERSEDED,  # by a later fact of its own batch
        FactStatus.FAILED,  # its edit job failed
        FactStatus.CANCELLED,  # its job was cancelled
    }),
    FactStatus.HELD: frozenset({FactStatus.APPLIED}),  # promoted, or rolled back to
    FactStatus.APPLIED: frozenset({FactStatus.SUPERSEDED, FactStatus.RETRACTED, FactStatus.ROLLED_BACK}),
    # A rollback to a version that holds the fact applies it again.
    FactStatus.SUPERSEDED: frozenset({FactStatus.APPLIED}),
    FactStatus.RETRACTED: frozenset({FactStatus.APPLIED}),
    FactStatus.ROLLED_BACK: frozenset({FactStatus.APPLIED}),
    FactStatus.FAILED: frozenset({FactStatus.PENDING}),  # `kbctl retry` of its job
    FactStatus.CANCELLED: frozenset({FactStatus.PENDING}),  # `kbctl retry` of its job
}


def facts_in_status(session: Session, job: Job, status: FactStatus) -> list[Fact]:
    """The job's facts that are in `status`, in the job's order."""
    facts = [session.get(Fact, fact_id) for fact_id in job.fact_ids]
    return [f for f in facts if f is not None and f.status == status.value]


class IllegalTransition(KbError):
    """A job or fact asked to move to a status its current one does not lead to."""


def change_status(row: Job | Fact, new: JobStatus | FactStatus) -> None:
    """Move a job or a fact to `new`; raise IllegalTransition, leaving the row as it was, when the
    transition table does not allow the move."""
    status_type: type[JobStatus] | type[FactStatus]
    if isinstance(row, Job):
        kind, status_type, table = "job", JobStatus, cast(Mapping[Any, frozenset[Any]], JOB_TRANSITIONS)
    else:
        kind, status_type, table = "fact", FactStatus, cast(Mapping[Any, frozenset[Any]], FACT_TRANSITIONS)
    if not isinstance(new, status_type):
        raise TypeError(f"a {kind}'s status is a {status_type.__name__}, got {new!r}")
    try:
        current = status_type(row.status)
    except ValueError:
        raise IllegalTransition(f"{kind} {row.id} has the unknown status {row.status!r}") from None
    allowed = table[current]
    if new not in allowed:
        names = ", ".join(sorted(s.value for s in allowed)) or "nothing"
        raise IllegalTransition(
            f"{kind} {row.id} cannot go from {current.value} to {new.value} (from {current.value}: {names})"
        )
    row.status = new.value
