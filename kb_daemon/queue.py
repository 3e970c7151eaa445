"""The job queue of record: registration, fact submission, ordered claims with leases, the reaper.

Jobs of one model run strictly in `seq` order, one at a time: a job is claimed only when no
earlier job of its model is unfinished and no job of its model holds a live lease. Functions take a
`Session` and never commit; the caller's unit of work does.
"""

from __future__ import annotations

import getpass
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from kb_daemon.config import Settings
from kb_daemon.errors import Conflict, InvalidInput, NotFound
from kb_daemon.models import Fact, FactStatus, Job, JobStatus, Model, as_utc, change_status, utcnow
from kb_daemon.snapshots import create_initial_version, put_blob

MAX_QUESTION_CHARS = 2_000
MAX_ANSWER_CHARS = 500
MAX_ATTEMPTS = 5
UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ----- models ---------------------------------------------------------------------------------
def get_model(session: Session, name: str) -> Model:
    model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    if model is None:
        names = session.execute(select(Model.name).order_by(Model.name)).scalars().all()
        known = ", ".join(names) if names else "none; run `kbctl init`"
        raise NotFound(f"unknown model {name!r} (registered: {known})")
    return model


def lock_model(session: Session, model_id: int) -> Model:
    """Take the model's row lock for the rest of the transaction (SQLite: the write lock)."""
    return session.execute(select(Model).where(Model.id == model_id).with_for_update()).scalar_one()


def register_model(
    session: Session, name: str, path: str, *, layer: str | None = None, hparams: dict[str, Any] | None = None,
    reference_pool: str | None = None, canary_path: str | None = None, canary_max_changed: float = 0.0,
    ingest_source: str | None = None, actor: str, source: str = "cli",
) -> Model:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidInput(f"model name {name!r} must be letters, digits, '-', '_' or '.'")
    if session.execute(select(Model).where(Model.name == name)).scalar_one_or_none() is not None:
        raise Conflict(f"model {name!r} is already registered")
    if path != "demo" and not (Path(path) / "config.json").is_file():
        raise InvalidInput(f"{path!r} is not a model directory (no config.json)")
    if not 0.0 <= canary_max_changed <= 1.0:
        raise InvalidInput(f"canary share must lie in [0, 1], got {canary_max_changed}")
    from editor.config import EditConfig  # a dataclass module: no torch

    # Every knob is pinned now, defaults included: a later release's defaults never change the
    # radii or values of a model whose history was built with the old ones.
    pinned = EditConfig.from_dict(dict(hparams or {})).to_dict()
    model = Model(name=name, path=path, layer=layer, hparams=pinned, reference_pool=reference_pool,
                  canary_path=canary_path, canary_max_changed=canary_max_changed, ingest_source=ingest_source,
                  head_version=0, next_job_seq=0)
    session.add(model)
    session.flush()
    create_initial_version(session, model, actor, source)
    return model


# ----- facts ----------------------------------------------------------------------------------
def read_image(path: str | Path, settings: Settings, *, root: Path | None = None) -> bytes:
    """Read and validate an untrusted image file; return its bytes. `root` confines the path.

    The checks are the editor's (`editor.images.read_image_file`) with the settings' limits and
    the common formats; messages name the path as given.
    """
    from editor.errors import InvalidFactError
    from editor.images import COMMON_IMAGE_FORMATS, read_image_file

    candidate = Path(path)
    if root is not None:
        if candidate.is_absolute():
            raise InvalidInput(f"image path {str(path)!r} must be relative to the source folder")
        resolved = (root / candidate).resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise InvalidInput(f"image path {str(path)!r} escapes the source folder")
        candidate = resolved
    try:
        data, _ = read_image_file(candidate, str(path), max_bytes=settings.max_image_bytes,
                                  max_pixels=settings.max_image_pixels, allowed_formats=COMMON_IMAGE_FORMATS)
    except InvalidFactError as exc:
        raise InvalidInput(str(exc)) from exc
    return data


def check_image_bytes(data: bytes, name: str, settings: Settings) -> Any:
    """Validate untrusted image bytes (an upload) as `read_image` does a file; return the image."""
    from editor.errors import InvalidFactError
    from editor.images import COMMON_IMAGE_FORMATS, check_image

    try:
        return check_image(data, name, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                           allowed_formats=COMMON_IMAGE_FORMATS)
    except InvalidFactError as exc:
        raise InvalidInput(str(exc)) from exc


def clean_text(value: str, what: str, limit: int) -> str:
    """`editor.fact.clean_text` (the one cleaning of questions and answers) with the daemon's error."""
    from editor.errors import InvalidFactError
    from editor.fact import clean_text as clean

    try:
        return clean(value, what, limit)
    except InvalidFactError as exc:
        raise InvalidInput(str(exc)) from exc


def check_fact_limits(fact: FactInput, settings: Settings) -> None:
    """Refuse a fact with more rephrasings or negatives than the settings allow: each one is work
    in every edit of it (a training row per optimisation step, a row of the keys pass)."""
    rephrases = len(fact.rephrases)
    if rephrases > settings.max_rephrases_per_fact:
        raise InvalidInput(f"{rephrases:,} rephrases; the limit is {settings.max_rephrases_per_fact:,} "
                           "(KB_MAX_REPHRASES)")
    negatives = len(fact.negative_images) + len(fact.negative_questions)
    if negatives > settings.max_negatives_per_fact:
        raise InvalidInput(f"{negatives:,} negatives (images and questions); the limit is "
                           f"{settings.max_negatives_per_fact:,} (KB_MAX_NEGATIVES)")


@dataclass(frozen=True)
class FactInput:
    """A fact as a user or a source gives it, images already read and validated."""

    image: bytes | None
    question: str
    answer: str
    rephrases: tuple[str, ...] = ()
    negative_images: tuple[bytes, ...] = ()
    negative_questions: tuple[str, ...] = ()
    key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    supersedes: str | None = None  # an applied fact this one replaces over its scope

    def cleaned(self) -> FactInput:
        return FactInput(
            self.image,
            clean_text(self.question, "question", MAX_QUESTION_CHARS),
            clean_text(self.answer, "answer", MAX_ANSWER_CHARS),
            tuple(clean_text(q, "rephrase", MAX_QUESTION_CHARS) for q in self.rephrases),
            self.negative_images,
            tuple(clean_text(q, "negative question", MAX_QUESTION_CHARS) for q in self.negative_questions),
            self.key,
            supersedes=self.supersedes.strip() if self.supersedes else None,
        )


def record_fact(session: Session, model: Model, fact: FactInput, *, actor: str, source: str) -> Fact:
    fact = fact.cleaned()
    image_sha = put_blob(session, fact.image, "image") if fact.image is not None else None
    negatives = [{"image_sha256": put_blob(session, data, "image")} for data in fact.negative_images]
    negatives += [{"question": q} for q in fact.negative_questions]
    if fact.supersedes is not None:
        check_supersedable(session, model, fact.supersedes)
    row = Fact(id="f-" + uuid.uuid4().hex[:16], model_id=model.id, key=fact.key, image_sha256=image_sha,
               question=fact.question, answer=fact.answer, rephrases=list(fact.rephrases), negatives=negatives,
               source=source, actor=actor, status=FactStatus.PENDING.value, supersedes=fact.supersedes)
    session.add(row)
    session.flush()
    return row


# A fact that a new one may supersede: in the head, or queued to be applied before the new one.
SUPERSEDABLE = (FactStatus.APPLIED.value, FactStatus.PENDING.value)


def check_supersedable(session: Session, model: Model, fact_id: str) -> Fact:
    """The fact `fact_id` of `model`, which a new fact may name as the one it supersedes."""
    fact = session.get(Fact, fact_id)
    if fact is None or fact.model_id != model.id:
        raise NotFound(f"cannot supersede {fact_id!r}: model {model.name!r} has no such fact")
    if fact.status not in SUPERSEDABLE:
        raise InvalidInput(f"cannot supersede {fact_id}: it is {fact.status.replace('_', ' ')}, not applied")
    return fact


def submit_fact(
    session: Session, model: Model, fact: FactInput, *, actor: str, source: str = "cli"
) -> tuple[Fact, Job]:
    row = record_fact(session, model, fact, actor=actor, source=source)
    job = enqueue(session, model, "edit", {"fact_id": row.id}, actor=actor, source=source)
    return row, job


def get_fact(session: Session, model: Model, fact_id: str) -> Fact:
    fact = session.get(Fact, fact_id)
    if fact is None or fact.model_id != model.id:
        raise NotFound(f"model {model.name!r} has no fact {fact_id!r}")
    return fact


# ----- jobs -----------------------------------------------------------------------------------
def enqueue(session: Session, model: Model, kind: str, payload: dict[str, Any], *, actor: str, source: str,
            created: JobStatus = JobStatus.QUEUED) -> Job:
    """Append a job to the model's ordered queue (the sequence number comes from a row counter).
    `created` DONE records an event that takes its place in the order but never runs."""
    seq = session.execute(
        update(Model).where(Model.id == model.id).values(next_job_seq=Model.next_job_seq + 1)
        .returning(Model.next_job_seq)
    ).scalar_one()
    job = Job(model_id=model.id, seq=seq, kind=kind, status=created.value, payload=payload, actor=actor,
              source=source, attempts=0, progress_done=0, progress_total=0,
              finished_at=utcnow() if created == JobStatus.DONE else None)
    session.add(job)
    session.flush()
    return job


def record_settings_change(session: Session, model: Model, before: dict[str, Any], after: dict[str, Any], *,
                           actor: str, source: str) -> Job:
    """A change of the model's settings, as a finished job in its ordered queue: the jobs queued
    before it run with `before`, the ones after it with `after` (see `settings_for`)."""
    return enqueue(session, model, "settings", {"before": before, "after": after}, actor=actor, source=source,
                   created=JobStatus.DONE)


def model_settings(model: Model) -> dict[str, Any]:
    """What a job of `model` runs with, as the model row holds it now."""
    return {"hparams": dict(model.hparams), "reference_pool": model.reference_pool,
            "canary_path": model.canary_path, "canary_max_changed": model.canary_max_changed}


def settings_for(session: Session, model: Model, seq: int) -> dict[str, Any]:
    """The settings of the job at `seq`: the latest settings change queued before it, else what the
    first change after it replaced, else the model's current ones."""
    earlier = session.execute(
        select(Job.payload).where(Job.model_id == model.id, Job.kind == "settings", Job.seq < seq)
        .order_by(Job.seq.desc()).limit(1)
    ).scalar_one_or_none()
    if earlier is not None:
        return dict(earlier["after"])
    later = session.execute(
        select(Job.payload).where(Job.model_id == model.id, Job.kind == "settings", Job.seq > seq)
        .order_by(Job.seq).limit(1)
    ).scalar_one_or_none()
    return dict(later["before"]) if later is not None else model_settings(model)


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def claim_next_job(session: Session, model: Model, worker: str, lease_seconds: float,
                   now: datetime | None = None) -> Job | None:
    """Lease the model's next job in sequence order, or None when there is none or one is running."""
    now = now or utcnow()
    lock_model(session, model.id)
    session.execute(update(Model).where(Model.id == model.id).values(last_worker=worker, last_worker_seen_at=now))
    job = session.execute(
        select(Job).where(Job.model_id == model.id, Job.status.in_(UNFINISHED)).order_by(Job.seq).limit(1)
    ).scalar_one_or_none()
    if job is None:
        return None
    lease = as_utc(job.lease_expires_at)
    if job.status == JobStatus.RUNNING and lease is not None and lease > now and job.lease_owner != worker:
        return None  # another worker holds it: strictly one job per model at a time
    if job.attempts >= MAX_ATTEMPTS:
        change_status(job, JobStatus.FAILED)
        job.error, job.finished_at = f"gave up after {job.attempts} attempts", now
        session.flush()
        return claim_next_job(session, model, worker, lease_seconds, now)
    change_status(job, JobStatus.RUNNING)
    job.lease_owner = worker
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.attempts += 1
    job.started_at = job.started_at or now
    session.flush()
    return job


def renew_lease(session: Session, job_id: int, worker: str, lease_seconds: float) -> bool:
    """Extend a running job's lease; a renewal is also a sighting of its worker (`kbctl status`)."""
    now = utcnow()
    result = cast("CursorResult[Any]", session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == worker, Job.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
    ))
    if result.rowcount != 1:
        return False
    session.execute(update(Model).where(Model.id == select(Job.model_id).where(Job.id == job_id).scalar_subquery())
                    .values(last_worker=worker, last_worker_seen_at=now))
    return True


def assert_lease(session: Session, job: Job, worker: str) -> None:
    """Inside the committing transaction: the job must still be ours."""
    session.refresh(job)
    if job.status != JobStatus.RUNNING or job.lease_owner != worker:
        raise Conflict(f"job {job.id} is no longer leased to {worker} (status {job.status}); result dropped")


def models_needing_work(session: Session, now: datetime | None = None) -> list[str]:
    """Names of models with queued jobs or with a running job whose lease has expired."""
    now = now or utcnow()
    rows = session.execute(
        select(Model.name, Job.status, Job.lease_expires_at).join(Job, Job.model_id == Model.id)
        .where(Job.status.in_(UNFINISHED))
    ).all()
    names = {name for name, status, lease in rows
             if status == JobStatus.QUEUED or ((expires := as_utc(lease)) is not None and expires <= now)}
    return sorted(names)


def queue_depth(session: Session, model: Model) -> int:
    return session.execute(
        select(func.count()).select_from(Job).where(Job.model_id == model.id, Job.status.in_(UNFINISHED))
    ).scalar_one()
