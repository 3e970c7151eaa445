"""Claim, apply, store, commit: the work of a worker as plain functions (no Celery here).

Each job is claimed under the model's lock with a lease, computed outside any transaction while a
heartbeat renews the lease, and committed in one transaction that also checks the lease is still
ours and that the head is the one the result was computed from. A crash anywhere leaves the old
head or the new one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from editor.errors import EditorError
from kb_daemon.config import Settings
from kb_daemon.db import Database, DatabaseUnavailable, JSONItems
from kb_daemon.errors import Conflict, InvalidInput, KbError
from kb_daemon.ingest import read_inputs
from kb_daemon.memory import trim_free_memory
from kb_daemon.models import Fact, FactStatus, Job, JobStatus, Model, change_status, facts_in_status, utcnow
from kb_daemon.queue import assert_lease, claim_next_job, get_model, lock_model, renew_lease, settings_for
from kb_daemon.runtime import ModelRuntime, RuntimeFor, load_model, open_image
from kb_daemon.snapshots import codebook_of, commit_changes, commit_version, entry_rows_for, in_chunks, store_entry

logger = logging.getLogger(__name__)

# Test hook for fault-injection tests, never set in production: seconds to pause inside the commit
# of a job's result, after its blobs, entries, spans, version row and ledger changes are written
# but before the transaction commits, so a test can kill -9 the worker at exactly that point.
FAULT_PAUSE_IN_COMMIT = "KB_FAULT_PAUSE_IN_COMMIT"


class Heartbeat:
    """Renews a job's lease in the background while the job runs."""

    def __init__(self, db: Database, job_id: int, worker: str, settings: Settings) -> None:
        self._db, self._job_id, self._worker, self._settings = db, job_id, worker, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.heartbeat_seconds):
            try:
                with self._db.session() as session:
                    if not renew_lease(session, self._job_id, self._worker, self._settings.lease_seconds):
                        return
            except Exception as exc:  # noqa: BLE001  (the commit re-checks the lease anyway)
                logger.warning("could not renew the lease of job %d: %s", self._job_id, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Change:
    """What a job did to the in-memory codebook, to be recorded in one transaction."""

    kind: str
    applied: list[str] = field(default_factory=list)
    superseded: dict[str, str] = field(default_factory=dict)  # old fact id -> new fact id
    retracted: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # each fact's report as compact JSON text
    held: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    # Fact ids of this job's entries known to be in the database already (stored by a checkpoint).
    stored: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Parent:
    """The head's codebook as a job found it, for the commit to record the job's changes against."""

    number: int
    fact_ids: list[str]
    entry_ids: list[int]  # ascending: a version's codebook order
    radii: Any  # torch.Tensor (N,) float32

    @classmethod
    def of(cls, runtime: ModelRuntime, head: int) -> Parent | None:
        """The runtime's codebook when it holds the head with known entry rows, else None."""
        if runtime.version != head or runtime.entry_ids is None:
            return None
        codebook = runtime.editor.codebook
        return cls(head, codebook.fact_ids, list(runtime.entry_ids), codebook.radii.clone())


def run_pending(db: Database, runtime_for: RuntimeFor, model_name: str, worker: str,
                settings: Settings) -> list[dict[str, Any]]:
    """Apply the model's queued jobs in order until none is left; return one outcome per job."""
    outcomes: list[dict[str, Any]] = []
    while True:
        with db.session() as session:
            model = get_model(session, model_name)
            job = claim_next_job(session, model, worker, settings.lease_seconds)
            if job is None:
                return outcomes
        logger.info("job %d (%s) of %s claimed by %s", job.id, job.kind, model_name, worker)
        started = time.perf_counter()
        with Heartbeat(db, job.id, worker, settings):
            outcome = _run_one(db, runtime_for, model_name, job, worker, settings)
        outcome["seconds"] = round(time.perf_counter() - started, 3)
        logger.info("job %d finished: %s", job.id, outcome)
        outcomes.append(outcome)
        release_free_memory(db)


def release_free_memory(db: Database | None = None) -> None:
    """Give the memory a finished job no longer needs back to the operating system.

    Three steps, each for memory nothing else gives back (figures in docs/decisions.md): close
    SQLite's pooled connections, whose page caches and prepared statements (IN lists as long as
    the codebook) outgrow the codebook over a large batch; a full garbage collection, since a
    job's ORM objects form cycles and an idle worker allocates too little for the collector to
    run; `malloc_trim(0)`, which returns every free page of glibc's heaps (a no-op off glibc).
    """
    if db is not None and db.settings.is_sqlite:
        db.engine.dispose()
    gc.collect()
    trim_free_memory()


def _run_one(db: Database, runtime_for: RuntimeFor, model_name: str, job: Job, worker: str,
             settings: Settings) -> dict[str, Any]:
    """Run one claimed job. `job` is the row as claimed (detached): only the lease holder writes it."""
    job_id = job.id
    runtime: ModelRuntime | None = None
    try:
        # A rollback must work even when the head's codebook is damaged: it loads its own.
        loaded = load_model(db, model_name, runtime_for=runtime_for, load_codebook=job.kind != "rollback")
        runtime, model, head = loaded.runtime, loaded.model, loaded.head
        with db.session() as session:  # `kbctl model set`: a job runs with the settings queued before it
            effective = settings_for(session, model, job.seq)
        runtime.configure(effective["hparams"], effective["reference_pool"])
        parent = Parent.of(runtime, head)
        change = execute(db, runtime, model, job, worker, head, settings.batch_checkpoint_facts, effective)
        outcome = commit(db, runtime, model_name, job_id, worker, head, change, parent)
        # The job's appends are over: between jobs the codebook holds one exact copy of its tensors.
        runtime.editor.codebook.compact()
        runtime.write_cache(db, model)  # in the background: the next start reads one file
        return outcome
    except DatabaseUnavailable:
        # Nothing was stored; the lease lapses and the job runs again once the database is back.
        if runtime is not None:
            runtime.invalidate()
        raise
    except JobCancelled as exc:
        if runtime is not None:
            runtime.invalidate()
        record_cancel(db, job_id, worker, exc.actor)
        logger.info("job %d cancelled by %s", job_id, exc.actor)
        return {"job_id": job_id, "status": JobStatus.CANCELLED.value}
    except Conflict as exc:
        if runtime is not None:
            runtime.invalidate()
        release(db, job_id, worker)
        logger.warning("job %d: %s", job_id, exc)
        return {"job_id": job_id, "status": "conflict", "error": str(exc)}
    except (KbError, EditorError, ValueError) as exc:
        if runtime is not None:
            runtime.invalidate()
        record_failure(db, job_id, worker, str(exc), getattr(exc, "fact_id", None))
        return {"job_id": job_id, "status": JobStatus.FAILED.value, "error": str(exc)}


def execute(db: Database, runtime: ModelRuntime, model: Model, job: Job, worker: str, head: int,
            checkpoint_every: int = 20, effective: dict[str, Any] | None = None) -> Change:
    """Apply the job to the runtime's in-memory codebook; only batches write (checkpoints)."""
    change = Change(job.kind)
    if job.kind == "edit":
        _apply_fact(db, runtime, change, job.payload["fact_id"], job.id, steps_as_progress=True)
    elif job.kind == "retract":
        _retract(runtime, change, job.payload["fact_id"])
    elif job.kind == "rollback":
        # From the version the runtime holds, only the entries that differ are read (O(changes)).
        with db.session() as session:
            runtime.use_version(session, model, int(job.payload["version"]))
        change.result["rolled_back_to"] = int(job.payload["version"])
    elif job.kind == "batch":
        _run_batch(db, runtime, model, job, worker, head, change, checkpoint_every, effective)
    else:
        raise InvalidInput(f"unknown job kind {job.kind!r}")
    return change


def _run_batch(db: Database, runtime: ModelRuntime, model: Model, job: Job, worker: str, head: int,
               change: Change, checkpoint_every: int, effective: dict[str, Any] | None = None) -> None:
    """Apply a batch in order, checkpointing every few facts so a restart resumes, not redoes."""
    ed = runtime.editor
    canary_path = effective["canary_path"] if effective else model.canary_path
    canary_max_changed = effective["canary_max_changed"] if effective else model.canary_max_changed
    sources = canaries_source(canary_path)
    canaries = load_canaries(canary_path)
    before = [a.text for a in ed.answers(canaries)] if canaries else []  # on the head, before the batch
    fact_ids = list(job.payload.get("facts", []))
    retracts = list(job.payload.get("retract", []))
    total = len(fact_ids) + len(retracts)
    start = 0
    checkpoint = (job.result or {}).get("checkpoint")
    if checkpoint and checkpoint.get("head") == head:
        with db.session() as session:
            rows = entry_rows_for(session, model, checkpoint["codebook"])
            ed.load_codebook(codebook_of(session, model, rows, f"checkpoint of job {job.id}"))
        start = int(checkpoint["done"])
        change.applied = list(checkpoint["applied"])
        change.stored = set(checkpoint["codebook"])
        change.superseded = dict(checkpoint["superseded"])
        change.result["resumed_at"] = start
        logger.info("job %d: resuming the batch after fact %d of %d", job.id, start, len(fact_ids))
    for done, fact_id in enumerate(fact_ids[start:], start + 1):
        check_not_cancelled(db, job.id)
        try:
            _apply_fact(db, runtime, change, fact_id, job.id)
        except JobCancelled:
            raise
        except (KbError, EditorError, ValueError) as exc:
            raise FactFailed(fact_id, str(exc)) from exc
        _progress(db, job.id, done, total)
        if done % checkpoint_every == 0 and done < len(fact_ids):
            save_checkpoint(db, model, job.id, worker, head, done, runtime, change)
    for done, fact_id in enumerate(retracts, len(fact_ids) + 1):
        _retract(runtime, change, fact_id)
        _progress(db, job.id, done, total)
    change.result["applied_in_this_attempt"] = len(fact_ids) - start
    if canaries:
        after = [a.text for a in ed.answers(canaries)]
        broken = [{"image": image, "question": question, "before": b, "after": a}
                  for (image, question), b, a in zip(sources, before, after, strict=True) if a != b]
        change.result["canaries"] = {"total": len(canaries), "changed": len(broken), "broken": broken}
        change.held = len(broken) / len(canaries) > canary_max_changed


def save_checkpoint(db: Database, model: Model, job_id: int, worker: str, head: int, done: int,
                    runtime: ModelRuntime, change: Change) -> None:
    """Store the entries made so far and where the batch stands (entries outside any version)."""
    codebook = runtime.editor.codebook
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert_lease(session, job, worker)
        newly_stored = store_new_entries(session, model, codebook, change)
        job.result = {"checkpoint": {"head": head, "done": done, "codebook": codebook.fact_ids,
                                     "applied": change.applied, "superseded": change.superseded}}
    change.stored |= newly_stored  # only once the checkpoint has committed
    logger.info("job %d: checkpoint after fact %d", job_id, done)


def store_new_entries(session: Any, model: Model, codebook: Any, change: Change) -> set[str]:
    """Store the entries this job created that are not in the database yet; return their fact ids.

    Every other entry of the in-memory codebook came from the database (the head version, or a
    checkpoint). Only this job's new fact ids are looked up, so a checkpoint or a commit costs
    O(new entries), not O(codebook): an IN list of every fact id of the codebook made each
    checkpoint slower and left a prepared statement as long as the codebook in SQLite's cache.
    """
    applied = set(change.applied) - change.stored
    candidates = [codebook.entry(i) for i, fact_id in enumerate(codebook.fact_ids) if fact_id in applied]
    if not candidates:
        return set()
    existing = {row.fact_id for row in entry_rows_for_existing(session, model, [e.fact_id for e in candidates])}
    for entry in candidates:
        if entry.fact_id not in existing:
            store_entry(session, model, entry)
    return {entry.fact_id for entry in candidates}


def _progress(db: Database, job_id: int, done: int, total: int) -> None:
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(progress_done=done, progress_total=total))
    logger.info("job %d: %d/%d", job_id, done, total)


def _apply_fact(db: Database, runtime: ModelRuntime, change: Change, fact_id: str, job_id: int,
                steps_as_progress: bool = False) -> None:
    """Apply one fact. Every few optimisation steps, stop if the job was cancelled; for a one-fact
    job the steps are also the job's progress."""
    with db.session() as session:
        fact = session.get(Fact, fact_id)
        if fact is None:
            raise InvalidInput(f"job names unknown fact {fact_id!r}")
        editor_fact = runtime.to_editor_fact(session, fact)
        named = fact.supersedes

    def on_steps(done: int, total: int) -> None:
        if steps_as_progress:
            _progress(db, job_id, done, total)
        check_not_cancelled(db, job_id)

    # The fact named by --supersedes leaves with this edit; one that already left the head (a
    # retract or rollback queued in between) is not an error: the report says so.
    supersedes = [named] if named and runtime.editor.codebook.has_fact(named) else []
    report = runtime.editor.apply(editor_fact, progress=on_steps, supersedes=supersedes)
    change.applied.append(fact_id)
    for old in report.superseded:
        change.superseded[old] = fact_id
    details = bounded_report(report.to_dict())
    if named and not supersedes:
        details["supersede_skipped"] = f"{named} is no longer in the head"
    change.reports.append(json.dumps(details, separators=(",", ":")))


# A job's result keeps at most this many of each fact's conflicts and `split_with` ids; the totals
# go beside them. A 10,000-fact batch on the demo model (bench/nightly_batch.py) named 300 conflicts
# per fact (median; 1,911 at most): 808 MB of its 911 MB job result, held by the worker until the
# commit.
REPORT_CONFLICTS = 20


def _conflict_rank(conflict: dict[str, Any]) -> int:
    """Which conflicts an operator needs first: the fact's input fired the entry before, then an
    entry whose own input no longer answers its answer, then one whose radius was cut."""
    if conflict.get("kind") == "fires_on_new_input":
        return 0
    if conflict.get("now_answers") != conflict.get("answer"):
        return 1
    if conflict.get("radius_after", 0.0) < conflict.get("radius_before", 0.0):
        return 2
    return 3


def bounded_report(details: dict[str, Any]) -> dict[str, Any]:
    """An edit report as a job result keeps it: the first `REPORT_CONFLICTS` conflicts by
    `_conflict_rank` (in report order within a rank) and `split_with` ids, with `conflicts_total`
    and `split_with_total` when some were left out."""
    conflicts = list(details.get("conflicts") or [])
    if len(conflicts) > REPORT_CONFLICTS:
        details["conflicts"] = sorted(conflicts, key=_conflict_rank)[:REPORT_CONFLICTS]
        details["conflicts_total"] = len(conflicts)
    split = list(details.get("split_with") or [])
    if len(split) > REPORT_CONFLICTS:
        details["split_with"] = split[:REPORT_CONFLICTS]
        details["split_with_total"] = len(split)
    return details


def _retract(runtime: ModelRuntime, change: Change, fact_id: str) -> None:
    if not runtime.editor.codebook.has_fact(fact_id):
        raise InvalidInput(f"fact {fact_id} is not in the head version; nothing to retract")
    runtime.editor.retract(fact_id)
    change.retracted.append(fact_id)


def canaries_source(path: str | None) -> list[tuple[str | None, str]]:
    return read_inputs(Path(path), "canary") if path else []


def load_canaries(path: str | None) -> list[tuple[Any, str]]:
    """Canary inputs (edit-case `loc` style JSON Lines; images relative to the file)."""
    if not path:
        return []
    root = Path(path).parent
    return [(open_image((root / image).read_bytes()) if image else None, question)
            for image, question in canaries_source(path)]


def commit(db: Database, runtime: ModelRuntime, model_name: str, job_id: int, worker: str, head: int,
           change: Change, parent: Parent | None = None) -> dict[str, Any]:
    """Record the job's result as the next version, in one transaction: as its changes to
    `parent` (the head's codebook as the job found it) when given, else from the whole codebook."""
    codebook = runtime.editor.codebook
    with db.session() as session:
        model = get_model(session, model_name)
        model = lock_model(session, model.id)
        job = session.get(Job, job_id)
        assert job is not None
        assert_lease(session, job, worker)
        if job.cancel_requested_by:  # under the model lock that `kbctl cancel` takes too
            raise JobCancelled(job.cancel_requested_by)
        if model.head_version != head:
            raise Conflict(f"head moved from {head} to {model.head_version} while job {job_id} ran; it will rerun")
        store_new_entries(session, model, codebook, change)
        summary = {"job": job.id, **({"canaries": change.result["canaries"]} if "canaries" in change.result else {})}
        recorded = _commit_changes(session, model, codebook, parent, change, job, summary) if parent else None
        if recorded is None:
            rows = entry_rows_for(session, model, codebook.fact_ids)
            recorded = commit_version(
                session, model, parent=head, kind=change.kind, entries=rows, radii=codebook.radii.tolist(),
                actor=job.actor, source=job.source, job_id=job.id, summary=summary, held=change.held,
            ), [row.id for row in rows]
        version, entry_ids = recorded
        _update_ledger(session, version, change)
        now = utcnow()
        status = JobStatus.HELD if change.held else JobStatus.DONE
        change_status(job, status)
        job.result = {"version": version.number, "reports": JSONItems(change.reports), **change.result}
        job.finished_at, job.lease_owner, job.lease_expires_at, job.error = now, None, None, None
        number = version.number
        _fault_pause_in_commit(session, job_id, number)
    runtime.committed(None if change.held else number, entry_ids)
    return {"job_id": job_id, "status": status.value, "version": number,
            "edits": len(change.reports)}


def _commit_changes(session: Any, model: Model, codebook: Any, parent: Parent, change: Change, job: Job,
                    summary: dict[str, Any]) -> tuple[Any, list[int]] | None:
    """Commit `codebook` as its differences from `parent`: the entries added and removed, and the
    kept ones whose radius changed (`snapshots.commit_changes`, O(changes) rows). Returns the
    version and the codebook's entry row ids, or None when it cannot (a version was held after
    the parent, or the codebook is not in entry order); the caller then commits the whole codebook."""
    import torch

    known = dict(zip(parent.fact_ids, parent.entry_ids, strict=True))
    fact_ids = codebook.fact_ids
    unknown = [f for f in fact_ids if f not in known]
    known.update((row.fact_id, row.id) for row in entry_rows_for(session, model, unknown))
    child = torch.tensor([known[f] for f in fact_ids], dtype=torch.int64)  # (N',)
    if bool((child[1:] <= child[:-1]).any()):
        return None
    radii = codebook.radii.to(torch.float32)  # (N',)
    parent_ids = torch.tensor(parent.entry_ids, dtype=torch.int64)  # (N,)
    if len(parent_ids):
        in_parent = torch.isin(child, parent_ids)
        at = torch.searchsorted(parent_ids, child).clamp_max(len(parent_ids) - 1)
        changed = in_parent & (parent.radii[at] != radii)
    else:
        in_parent = changed = torch.zeros(len(child), dtype=torch.bool)
    arrive = ~in_parent | changed
    arriving = dict(zip(child[arrive].tolist(), radii[arrive].tolist(), strict=True))
    leaving = parent_ids[~torch.isin(parent_ids, child)].tolist() + child[changed].tolist()
    version = commit_changes(session, model, parent=parent.number, kind=change.kind, arriving=arriving,
                             leaving=leaving, actor=job.actor, source=job.source, job_id=job.id, summary=summary,
                             held=change.held)
    return None if version is None else (version, child.tolist())


def _fault_pause_in_commit(session: Any, job_id: int, number: int) -> None:
    """Test hook (see FAULT_PAUSE_IN_COMMIT): does nothing unless that variable is set."""
    pause = os.environ.get(FAULT_PAUSE_IN_COMMIT)
    if not pause:
        return
    session.flush()  # every row of the result is now written, none committed
    logger.warning("test hook %s: job %d written as version %d, pausing %s s before the commit",
                   FAULT_PAUSE_IN_COMMIT, job_id, number, pause)
    time.sleep(float(pause))


def entry_rows_for_existing(session: Any, model: Model, fact_ids: list[str]) -> list[Any]:
    from kb_daemon.models import Entry

    return [row for chunk in in_chunks(fact_ids) for row in session.execute(
        select(Entry).where(Entry.model_id == model.id, Entry.fact_id.in_(chunk))).scalars()]


def _update_ledger(session: Any, version: Any, change: Change) -> None:
    """Fact statuses after a version; for a held version they are kept for `kbctl promote`."""
    added, removed = set(version.summary["added"]), set(version.summary["removed"])
    statuses: dict[str, FactStatus] = {fact_id: FactStatus.APPLIED for fact_id in added}
    for fact_id in removed:
        if fact_id in change.superseded:
            statuses[fact_id] = FactStatus.SUPERSEDED
        elif fact_id in change.retracted:
            statuses[fact_id] = FactStatus.RETRACTED
        else:
            statuses[fact_id] = FactStatus.ROLLED_BACK
    for fact_id in set(change.applied) - added:  # applied, then superseded within the same batch
        statuses[fact_id] = FactStatus.SUPERSEDED
    if change.held:
        version.summary = {**version.summary, "ledger": {f: status.value for f, status in statuses.items()}}
        for fact_id in added:
            change_status(session.get(Fact, fact_id), FactStatus.HELD)
        return
    for fact_id, status in statuses.items():
        fact = session.get(Fact, fact_id)
        change_status(fact, status)
        fact.error = None
        if status == FactStatus.APPLIED:
            fact.entered_version, fact.left_version = version.number, None
        elif fact_id in removed:
            fact.left_version = version.number
        if status == FactStatus.SUPERSEDED:
            fact.superseded_by = change.superseded.get(fact_id)


def _end_running_job(session: Any, job_id: int, worker: str, status: JobStatus, error: str) -> Job | None:
    """Move our running job to `status` with `error` and give up its lease; None when the job is no
    longer ours (see queue.assert_lease)."""
    job = session.get(Job, job_id)
    if job is None or job.lease_owner != worker or job.status != JobStatus.RUNNING:
        return None
    change_status(job, status)
    job.error, job.finished_at = error, utcnow()
    job.lease_owner, job.lease_expires_at = None, None
    return job


class JobCancelled(KbError):
    """`kbctl cancel` asked this running job to stop; it stops at a fact boundary, storing nothing."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"cancelled by {actor}")
        self.actor = actor


def check_not_cancelled(db: Database, job_id: int) -> None:
    """At a fact boundary: stop if someone asked to cancel the job."""
    with db.session() as session:
        actor = session.execute(select(Job.cancel_requested_by).where(Job.id == job_id)).scalar_one_or_none()
    if actor:
        raise JobCancelled(actor)


def record_cancel(db: Database, job_id: int, worker: str, actor: str) -> None:
    """The job stopped on request: it and its facts still pending are cancelled; nothing was stored
    but a batch's checkpointed entries, which no version holds."""
    with db.session() as session:
        job = _end_running_job(session, job_id, worker, JobStatus.CANCELLED, f"cancelled by {actor}")
        if job is None:
            return
        for fact in facts_in_status(session, job, FactStatus.PENDING):
            change_status(fact, FactStatus.CANCELLED)
            fact.error = f"cancelled by {actor} (job {job_id})"


class FactFailed(KbError):
    """One fact of a batch could not be applied: the batch fails, naming it."""

    def __init__(self, fact_id: str, reason: str) -> None:
        super().__init__(f"fact {fact_id}: {reason}")
        self.fact_id = fact_id


def record_failure(db: Database, job_id: int, worker: str, message: str, failed_fact: str | None = None) -> None:
    """The job failed: so did each of its facts still pending, with the reason (a batch's other
    facts say which fact stopped it). Re-running their source queues them again."""
    with db.session() as session:
        job = _end_running_job(session, job_id, worker, JobStatus.FAILED, message)
        if job is None:
            return
        for fact in facts_in_status(session, job, FactStatus.PENDING):
            change_status(fact, FactStatus.FAILED)
            fact.error = message if fact.id == failed_fact or job.kind == "edit" else (
                    f"not applied: batch job {job_id} failed on fact {failed_fact}" if failed_fact
                    else f"not applied: batch job {job_id} failed: {message}")


def release(db: Database, job_id: int, worker: str) -> None:
    """Give a job back to the queue (its result was computed on a stale head)."""
    with db.session() as session:
        job = session.execute(
            select(Job).where(Job.id == job_id, Job.lease_owner == worker, Job.status == JobStatus.RUNNING.value)
            .with_for_update()
        ).scalar_one_or_none()
        if job is None:
            return  # no longer ours
        change_status(job, JobStatus.QUEUED)
        job.lease_owner, job.lease_expires_at = None, None
