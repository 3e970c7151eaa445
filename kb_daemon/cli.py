"""`kbctl`, the admin CLI. Commands stay thin; domain errors become one line on stderr, exit 1."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from kb_daemon.config import DEFAULT_MODEL, Settings, redact
from kb_daemon.errors import InvalidInput, KbError

DEMO_REFERENCE_POOL = "easy-vqa"


class KbGroup(click.Group):
    """The one error boundary: domain errors -> `Error: ...` on stderr, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001  (the boundary)
            if ctx.meta.get("kb_debug"):
                raise
            if isinstance(exc, KbError) or type(exc).__module__.startswith("editor"):
                raise click.ClickException(one_line(str(exc))) from exc
            raise click.ClickException(
                one_line(f"unexpected {type(exc).__name__}: {scrub(str(exc))} (run with --debug for the traceback)")
            ) from exc


def one_line(message: str) -> str:
    return " ".join(message.split())


def scrub(message: str) -> str:
    """Remove credentials of the configured URLs from a message."""
    for name in ("KB_DATABASE_URL", "KB_BROKER_URL"):
        url = os.environ.get(name, "")
        if "@" in url and ":" in url.split("@")[0]:
            secret = url.split("@")[0].rsplit(":", 1)[1]
            if secret:
                message = message.replace(secret, "***")
    return message


@dataclass
class State:
    settings: Settings
    model: str
    _db: Any = field(default=None)

    @property
    def db(self) -> Any:
        if self._db is None:
            from kb_daemon.db import Database

            self._db = Database(self.settings)
        return self._db

    def checked_db(self) -> Any:
        self.db.check_schema()
        return self.db


pass_state = click.make_pass_decorator(State)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(function)


def actor_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--actor", default=None, help="Who makes this change (default: the OS user).")(function)


def emit(as_json: bool, data: Any, text: str | Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif callable(text):
        text()
    else:
        click.echo(text)


@click.group(cls=KbGroup)
@click.option("--home", envvar="KB_HOME", type=click.Path(file_okay=False), help="Data directory [env KB_HOME].")
@click.option("--database-url", envvar="KB_DATABASE_URL", help="SQLAlchemy URL [env KB_DATABASE_URL].")
@click.option("--broker-url", envvar="KB_BROKER_URL", help="Celery broker URL [env KB_BROKER_URL].")
@click.option("--model", "model_name", envvar="KB_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Registered model to act on [env KB_MODEL].")
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress at INFO level on stderr.")
@click.version_option(package_name="kb-daemon")
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None, broker_url: str | None,
        model_name: str, debug: bool, verbose: bool) -> None:
    """kb-daemon keeps a deployed vision-language model's knowledge current by model editing.

    Each fact becomes a small, removable codebook edit (BalancEdit) on a frozen model. Facts go
    through an ordered queue applied by one worker per model; every change is a numbered version
    that can be inspected, diffed, exported and rolled back.

    Example:

        kbctl init && kbctl up &
        kbctl submit-fact --image cat.png --question "what breed is it?" --answer Kitty --wait
    """
    ctx.meta["kb_debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key, value in (("KB_HOME", home), ("KB_DATABASE_URL", database_url), ("KB_BROKER_URL", broker_url)):
        if value:
            os.environ[key] = value  # workers started from this process read the same settings
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ctx.obj = State(Settings.from_env(), model_name)


# ----- set-up ---------------------------------------------------------------------------------
@cli.command()
@json_option
@pass_state
def init(state: State, as_json: bool) -> None:
    """Create the data directory and database, and register the demo model. Idempotent.

    Example:

        KB_HOME=~/kb kbctl init
    """
    from sqlalchemy import select

    from kb_daemon.models import Model
    from kb_daemon.notify import prepare_broker
    from kb_daemon.queue import default_actor, register_model

    state.db.upgrade()
    prepare_broker(state.settings, [DEFAULT_MODEL])
    with state.db.session() as session:
        exists = session.execute(select(Model).where(Model.name == DEFAULT_MODEL)).scalar_one_or_none()
        if exists is None:
            register_model(session, DEFAULT_MODEL, "demo", reference_pool=DEMO_REFERENCE_POOL,
                           actor=default_actor(), source="init")
    data = {"home": str(state.settings.home), "database": redact(state.settings.database_url),
            "demo_registered": exists is None}
    emit(as_json, data, f"kb-daemon ready in {state.settings.home} ({redact(state.settings.database_url)})")


@cli.group()
def db() -> None:
    """Database maintenance.

    Example:

        kbctl db upgrade
    """


@db.command("upgrade")
@json_option
@pass_state
def db_upgrade(state: State, as_json: bool) -> None:
    """Apply pending schema migrations.

    Example:

        kbctl db upgrade
    """
    before = state.db.current_revision()
    state.db.upgrade()
    after = state.db.current_revision()
    emit(as_json, {"from": before, "to": after}, f"schema at revision {after} (was {before})")


@cli.group()
def model() -> None:
    """Register and list models.

    Example:

        kbctl model add my-llava /models/llava --hparam alpha=0.1 && kbctl model list
    """


@model.command("add")
@click.argument("name")
@click.argument("path")
@click.option("--layer", help="Module path of the edited linear layer (default: the model family's).")
@click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE",
              help="Editing hyperparameter, e.g. alpha=0.2 (repeatable).")
@click.option("--reference-pool", help="Hard-negative pool: 'easy-vqa' or a JSON Lines file.")
@click.option("--canary", type=click.Path(exists=True, dir_okay=False), help="Canary inputs (JSON Lines).")
@click.option("--canary-max-changed", type=float, default=0.0, show_default=True,
              help="Share of canary answers a batch may change before it is held.")
@click.option("--ingest-source", help="File or folder the nightly batch reads.")
@actor_option
@json_option
@pass_state
def model_add(state: State, name: str, path: str, layer: str | None, hparams: tuple[str, ...],
              reference_pool: str | None, canary: str | None, canary_max_changed: float,
              ingest_source: str | None, actor: str | None, as_json: bool) -> None:
    """Register model NAME stored at PATH (a local model directory, or 'demo').

    Example:

        kbctl model add llava-prod /models/llava-1.5-7b --hparam alpha=0.1 --canary canaries.jsonl
    """
    from kb_daemon.queue import default_actor, register_model

    parsed = parse_hparams(hparams)
    model_path = path if path == "demo" else str(Path(path).resolve())
    with state.checked_db().session() as session:
        row = register_model(session, name, model_path, layer=layer, hparams=parsed,
                             reference_pool=reference_pool,
                             canary_path=str(Path(canary).resolve()) if canary else None,
                             canary_max_changed=canary_max_changed,
                             ingest_source=str(Path(ingest_source).resolve()) if ingest_source else None,
                             actor=actor or default_actor())
        data = model_json(row)
    from kb_daemon.notify import prepare_broker

    try:  # the model's queue exists before anyone publishes to it (see prepare_broker)
        prepare_broker(state.settings, [name])
    except Exception as exc:  # noqa: BLE001  (the worker declares it again when it starts)
        click.echo(f"warning: could not declare the queue of {name} on the broker "
                   f"{redact(state.settings.broker_url)} ({type(exc).__name__}); its worker declares it on start",
                   err=True)
    emit(as_json, data, f"registered model {name} ({model_path})")


def parse_hparams(pairs: tuple[str, ...]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--hparam {pair!r} must look like KEY=VALUE")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result  # checked (unknown keys, bad values) and pinned by register_model


def model_json(row: Any) -> dict[str, Any]:
    return {"name": row.name, "path": row.path, "layer": row.layer, "hparams": row.hparams,
            "reference_pool": row.reference_pool, "canary": row.canary_path,
            "canary_max_changed": row.canary_max_changed, "ingest_source": row.ingest_source,
            "head_version": row.head_version}


@model.command("list")
@json_option
@pass_state
def model_list(state: State, as_json: bool) -> None:
    """List registered models.

    Example:

        kbctl model list --json
    """
    from sqlalchemy import select

    from kb_daemon.models import Model

    with state.checked_db().session() as session:
        rows = [model_json(m) for m in session.execute(select(Model).order_by(Model.name)).scalars()]

    def table() -> None:
        for row in rows:
            click.echo(f"{row['name']:<20} head v{row['head_version']:<6} {row['path']}")

    emit(as_json, rows, table)


# ----- facts and queries ----------------------------------------------------------------------
@cli.command("submit-fact")
@click.option("--image", help="Image file the fact is about (omit for text-only models).")
@click.option("--question", required=True, help="The question, as users ask it.")
@click.option("--answer", required=True, help="The new answer.")
@click.option("--rephrase", "rephrases", multiple=True, help="Another phrasing that must follow the edit.")
@click.option("--negative-image", "negative_images", multiple=True,
              help="An image on which the question must keep its old answer.")
@click.option("--negative-question", "negative_questions", multiple=True,
              help="A question about the image whose answer must not change.")
@click.option("--wait", is_flag=True, help="Block until applied and print the new version.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait with --wait.")
@actor_option
@json_option
@pass_state
def submit_fact(state: State, image: str | None, question: str, answer: str, rephrases: tuple[str, ...],
                negative_images: tuple[str, ...], negative_questions: tuple[str, ...], wait: bool,
                timeout: float, actor: str | None, as_json: bool) -> None:
    """Record a fact and queue it for the model's worker.

    Example:

        kbctl submit-fact --image cat.png --question "what breed is it?" --answer Kitty \\
            --rephrase "which breed is this?" --negative-image dog.png --wait
    """
    from kb_daemon.queue import FactInput, default_actor, get_model, read_image
    from kb_daemon.queue import submit_fact as submit

    fact = FactInput(
        read_image(image, state.settings) if image else None, question, answer, rephrases,
        tuple(read_image(p, state.settings) for p in negative_images), negative_questions,
    ).cleaned()
    with state.checked_db().session() as session:
        row, job = submit(session, get_model(session, state.model), fact, actor=actor or default_actor())
        data: dict[str, Any] = {"fact_id": row.id, "job_id": job.id}
    signal_and_wait(state, data, wait, timeout, as_json)
    text = f"fact {data['fact_id']} queued as job {data['job_id']}"
    if "version" in data:
        text += f"; applied as version {data['version']}"
    emit(as_json, data, text)


def signal_and_wait(state: State, data: dict[str, Any], wait: bool, timeout: float, quiet: bool) -> None:
    """After the job's transaction committed: wake the worker, and with --wait add the outcome."""
    from kb_daemon.notify import signal_model

    signal_model(state.settings, state.model)
    if wait:
        data.update(wait_for_job(state, data["job_id"], timeout, quiet))


def wait_for_job(state: State, job_id: int, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll the job until it ends; show batch progress on stderr."""
    from kb_daemon.queue import get_job

    deadline = time.monotonic() + timeout
    bar = None
    try:
        while True:
            with state.db.session() as session:
                job = get_job(session, job_id)
                status, result, error = job.status, job.result or {}, job.error
                done, total = job.progress_done, job.progress_total
            if total and not quiet and bar is None:
                bar = click.progressbar(length=total, label=f"job {job_id}", file=sys.stderr)
                bar.__enter__()
            if bar is not None:
                bar.update(done - bar.pos)
            if status == "done":
                return {"version": result.get("version"), "status": status}
            if status == "held":
                return {"version": result.get("version"), "status": status, "canaries": result.get("canaries")}
            if status == "failed":
                raise KbError(f"job {job_id} failed: {error}")
            if time.monotonic() > deadline:
                raise KbError(f"timed out after {timeout:.0f} s waiting for job {job_id} ({status}); "
                              "is a worker running? start one with `kbctl up` or `kbctl worker`")
            time.sleep(0.2)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@cli.command()
@click.option("--image", help="Image file (omit for text-only models).")
@click.option("--question", required=True)
@click.option("--version", "version", type=int, help="Version to answer from (default: head).")
@json_option
@pass_state
def ask(state: State, image: str | None, question: str, version: int | None, as_json: bool) -> None:
    """Answer a question with the edited model (loads the model in this process).

    Example:

        kbctl ask --image cat.png --question "what breed is it?" --version 3
    """
    from kb_daemon.queue import clean_text, get_model, read_image
    from kb_daemon.runtime import ModelRuntime, open_image
    from kb_daemon.snapshots import get_version

    data_image = read_image(image, state.settings) if image else None
    question = clean_text(question, "question", 2_000)
    db = state.checked_db()
    with db.session() as session:
        row = get_model(session, state.model)
        number = row.head_version if version is None else get_version(session, row, version).number
    runtime = ModelRuntime(row)
    with db.session() as session:
        row = get_model(session, state.model)
        runtime.check_spec(session, row)
        runtime.use_version(session, row, number)
    answer = runtime.editor.answers([(open_image(data_image), question)])[0]
    data = {"answer": answer.text, "version": number, "fact_id": answer.fact_id}
    fired = f"  (fact {answer.fact_id})" if answer.fact_id else ""
    emit(as_json, data, f"{answer.text}\t[v{number}]{fired}")


@cli.command()
@click.argument("fact_id")
@click.option("--wait", is_flag=True, help="Block until the retraction is applied.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@actor_option
@json_option
@pass_state
def retract(state: State, fact_id: str, wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Remove a fact from the knowledge (a new version without it).

    Example:

        kbctl retract f-1a2b3c4d5e6f7a8b --wait
    """
    from kb_daemon.queue import default_actor, enqueue, get_fact, get_model

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        fact = get_fact(session, row, fact_id)
        if fact.status != "applied":
            raise InvalidInput(f"fact {fact_id} is {fact.status}, not applied; nothing to retract")
        job = enqueue(session, row, "retract", {"fact_id": fact_id}, actor=actor or default_actor(), source="cli")
        data: dict[str, Any] = {"fact_id": fact_id, "job_id": job.id}
    signal_and_wait(state, data, wait, timeout, as_json)
    emit(as_json, data, f"retraction of {fact_id} queued as job {data['job_id']}"
         + (f"; version {data['version']}" if "version" in data else ""))


@cli.command()
@click.argument("version", type=int)
@click.option("--wait", is_flag=True, help="Block until the rollback is applied.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@actor_option
@json_option
@pass_state
def rollback(state: State, version: int, wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Make a new head whose content equals VERSION (history is kept; a rollback can be rolled back).

    Example:

        kbctl rollback 3 --wait
    """
    from kb_daemon.queue import default_actor, enqueue, get_model
    from kb_daemon.snapshots import get_version

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        get_version(session, row, version)
        job = enqueue(session, row, "rollback", {"version": version}, actor=actor or default_actor(),
                      source="rollback")
        data: dict[str, Any] = {"rollback_to": version, "job_id": job.id}
    signal_and_wait(state, data, wait, timeout, as_json)
    emit(as_json, data, f"rollback to version {version} queued as job {data['job_id']}"
         + (f"; new head is version {data['version']}" if "version" in data else ""))


@cli.command()
@click.argument("version", type=int)
@actor_option
@json_option
@pass_state
def promote(state: State, version: int, actor: str | None, as_json: bool) -> None:
    """Make a held batch version the head despite its broken canaries.

    Example:

        kbctl promote 7
    """
    from kb_daemon.queue import default_actor, get_model, lock_model
    from kb_daemon.snapshots import promote_version

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        row = lock_model(session, row.id)
        promote_version(session, row, version, actor or default_actor())
    emit(as_json, {"version": version, "head": version}, f"version {version} is now the head")


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--sync", is_flag=True, help="Also retract ingested facts that are absent from SOURCE.")
@click.option("--wait", is_flag=True, help="Block until the batch is applied (progress on stderr).")
@click.option("--timeout", type=float, default=3600.0, show_default=True)
@actor_option
@json_option
@pass_state
def ingest(state: State, source: str, sync: bool, wait: bool, timeout: float, actor: str | None,
           as_json: bool) -> None:
    """Compare SOURCE (JSON Lines/CSV file or folder) with the ledger and queue one batch.

    New facts are added, facts whose answer changed supersede the old one, unchanged ones are
    skipped (running the same file twice queues nothing). One malformed line rejects the whole
    source, naming the file and line.

    Example:

        kbctl ingest facts/ --sync --wait
    """
    from kb_daemon.ingest import ingest_source
    from kb_daemon.queue import default_actor

    data = ingest_source(state.checked_db(), state.settings, state.model, source, sync=sync,
                         actor=actor or default_actor())
    if data["job_id"] is not None:
        signal_and_wait(state, data, wait, timeout, as_json)
    text = (f"{data['new']} new, {data['changed']} changed, {data['unchanged']} unchanged, "
            f"{data['retract']} to retract; " + (f"batch job {data['job_id']}" if data["job_id"] else "nothing to do"))
    if data.get("status") == "held":
        text += f"; version {data['version']} HELD: canaries changed ({data['canaries']['changed']})"
    elif "version" in data:
        text += f"; version {data['version']}"
    emit(as_json, data, text)


# ----- inspection -----------------------------------------------------------------------------
def job_json(job: Any) -> dict[str, Any]:
    return {"id": job.id, "seq": job.seq, "kind": job.kind, "status": job.status, "payload": job.payload,
            "attempts": job.attempts, "error": job.error, "actor": job.actor, "source": job.source,
            "created_at": job.created_at, "finished_at": job.finished_at,
            "progress": [job.progress_done, job.progress_total],
            "version": (job.result or {}).get("version")}


@cli.command()
@click.option("--limit", type=int, default=20, show_default=True)
@json_option
@pass_state
def jobs(state: State, limit: int, as_json: bool) -> None:
    """List the model's most recent jobs.

    Example:

        kbctl jobs --limit 5
    """
    from sqlalchemy import select

    from kb_daemon.models import Job
    from kb_daemon.queue import get_model

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        rows = [job_json(j) for j in session.execute(
            select(Job).where(Job.model_id == row.id).order_by(Job.seq.desc()).limit(limit)).scalars()]

    def table() -> None:
        for j in rows:
            extra = f" v{j['version']}" if j["version"] is not None else ""
            error = f"  {j['error']}" if j["error"] else ""
            click.echo(f"#{j['id']:<5} {j['kind']:<9} {j['status']:<8}{extra}{error}")

    emit(as_json, rows, table)


@cli.command()
@json_option
@pass_state
def status(state: State, as_json: bool) -> None:
    """Queue depth, running job and its age, head version, last worker seen.

    Example:

        kbctl status
    """
    from sqlalchemy import select

    from kb_daemon.models import Job, as_utc, utcnow
    from kb_daemon.queue import get_model, queue_depth

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        running = session.execute(select(Job).where(Job.model_id == row.id, Job.status == "running")
                                  .order_by(Job.seq).limit(1)).scalar_one_or_none()
        now = utcnow()
        data = {
            "model": row.name, "head_version": row.head_version, "queue_depth": queue_depth(session, row),
            "running_job": running.id if running else None,
            "running_seconds": round((now - as_utc(running.started_at)).total_seconds(), 1)
            if running and running.started_at else None,
            "last_worker": row.last_worker,
            "last_worker_seen_seconds_ago": round((now - as_utc(row.last_worker_seen_at)).total_seconds(), 1)
            if row.last_worker_seen_at else None,
        }
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


def version_json(v: Any) -> dict[str, Any]:
    return {"version": v.number, "parent": v.parent, "kind": v.kind, "entries": v.num_entries,
            "added": v.summary.get("added", []), "removed": v.summary.get("removed", []),
            "held": v.held, "actor": v.actor, "source": v.source, "created_at": v.created_at,
            "content_sha256": v.content_sha256}


@cli.command()
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
@pass_state
def history(state: State, limit: int, as_json: bool) -> None:
    """List the model's versions, newest first, with who made each and from where.

    Example:

        kbctl history --json
    """
    from sqlalchemy import select

    from kb_daemon.models import Version
    from kb_daemon.queue import get_model

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        head = row.head_version
        rows = [version_json(v) for v in session.execute(
            select(Version).where(Version.model_id == row.id).order_by(Version.number.desc()).limit(limit)).scalars()]

    def table() -> None:
        for v in rows:
            mark = "*" if v["version"] == head else ("H" if v["held"] else " ")
            change = ", ".join([f"+{f}" for f in v["added"]] + [f"-{f}" for f in v["removed"]])
            click.echo(f"{mark} v{v['version']:<5} {v['kind']:<9} {v['entries']:>5} entries  "
                       f"{v['actor']} via {v['source']}  {change}")

    emit(as_json, rows, table)


@cli.command()
@click.argument("version", type=int)
@json_option
@pass_state
def show(state: State, version: int, as_json: bool) -> None:
    """Show one version: its metadata and the facts it holds.

    Example:

        kbctl show 4
    """
    from kb_daemon.models import Fact
    from kb_daemon.queue import get_model
    from kb_daemon.snapshots import entries_at, get_version

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        data = version_json(get_version(session, row, version))
        data["facts"] = []
        for entry in entries_at(session, row, version):
            fact = session.get(Fact, entry.fact_id)
            data["facts"].append({"fact_id": entry.fact_id, "question": fact.question, "answer": fact.answer,
                                  "base_radius": entry.base_radius})

    def text() -> None:
        click.echo(f"version {data['version']} ({data['kind']}, parent {data['parent']}, by {data['actor']} "
                   f"via {data['source']}, {data['created_at']})")
        for f in data["facts"]:
            click.echo(f"  {f['fact_id']}  {f['question']!r} -> {f['answer']!r}")

    emit(as_json, data, text)


@cli.command()
@click.argument("first", type=int)
@click.argument("second", type=int)
@json_option
@pass_state
def diff(state: State, first: int, second: int, as_json: bool) -> None:
    """Facts added and removed between two versions, and radii that changed.

    Example:

        kbctl diff 2 5
    """
    from kb_daemon.queue import get_model
    from kb_daemon.snapshots import materialise

    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        a, b = materialise(session, row, first), materialise(session, row, second)
    radii_a = dict(zip(a.fact_ids, a.radii.tolist(), strict=True))
    radii_b = dict(zip(b.fact_ids, b.radii.tolist(), strict=True))
    data = {
        "from": first, "to": second,
        "added": [f for f in radii_b if f not in radii_a],
        "removed": [f for f in radii_a if f not in radii_b],
        "radii_changed": [{"fact_id": f, "from": radii_a[f], "to": radii_b[f]}
                          for f in radii_b if f in radii_a and radii_a[f] != radii_b[f]],
    }

    def text() -> None:
        for f in data["added"]:
            click.echo(f"+ {f}")
        for f in data["removed"]:
            click.echo(f"- {f}")
        for change in data["radii_changed"]:
            click.echo(f"~ {change['fact_id']} radius {change['from']:.4g} -> {change['to']:.4g}")

    emit(as_json, data, text)


@cli.command()
@click.argument("version", type=int)
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@pass_state
def export(state: State, version: int, directory: str, as_json: bool) -> None:
    """Write VERSION's codebook and metadata to DIRECTORY, loadable by `editor` anywhere.

    Load it with: Editor(load_backbone(PATH), codebook=Codebook.from_bytes(open(...).read())).

    Example:

        kbctl export 5 ./export-v5
    """
    from kb_daemon.models import Fact
    from kb_daemon.queue import get_model
    from kb_daemon.snapshots import get_version, materialise

    target = Path(directory)
    with state.checked_db().session() as session:
        row = get_model(session, state.model)
        meta = version_json(get_version(session, row, version))
        codebook = materialise(session, row, version)
        facts = [session.get(Fact, f) for f in codebook.fact_ids]
        meta.update({"model": row.name, "model_path": row.path, "layer": row.layer, "spec": row.spec,
                     "hparams": row.hparams,
                     "facts": [{"fact_id": f.id, "question": f.question, "answer": f.answer} for f in facts]})
    target.mkdir(parents=True, exist_ok=True)
    blob = codebook.to_bytes()
    (target / "codebook.safetensors").write_bytes(blob)
    (target / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    data = {"directory": str(target), "bytes": len(blob), "entries": len(facts)}
    emit(as_json, data, f"exported version {version} ({len(facts)} entries, {len(blob):,} bytes) to {target}")


# ----- daemon ---------------------------------------------------------------------------------
def start_worker(state: State, beat: bool, loglevel: str) -> None:
    from kb_daemon.notify import MAINTENANCE_QUEUE, model_queue, prepare_broker
    from kb_daemon.queue import get_model

    db = state.checked_db()  # refuses an old schema: "run kbctl db upgrade"
    with db.session() as session:
        get_model(session, state.model)
    db.dispose()  # no pooled connection may cross the fork of the embedded beat
    prepare_broker(state.settings, [state.model])
    from workers.app import app

    argv = ["worker", "--pool=solo", "--concurrency=1", f"--loglevel={loglevel}",
            "-Q", f"{model_queue(state.model)},{MAINTENANCE_QUEUE}", "-n", f"kb-{state.model}-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if beat:
        schedule = state.settings.home / "celerybeat-schedule"
        state.settings.home.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", f"--schedule={schedule}"]
    from workers.tasks import RuntimeTask

    RuntimeTask.can_restart = True
    try:
        app.worker_main(argv)
    finally:
        if RuntimeTask.restart_requested and not RuntimeTask.stop_signalled:
            restart_in_place(RuntimeTask)


def restart_in_place(task: Any) -> None:
    """Replace this process by a fresh run of its own command line (same PID, environment, output
    and process group; Python's file descriptors are not inherited): after its warm shutdown the
    worker starts again, empty of what its edits left in the allocators, and reloads the model."""
    if task._db is not None:
        task._db.dispose()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@pass_state
def worker(state: State, loglevel: str) -> None:
    """Run the worker of --model in the foreground (solo pool: one process, model loaded once).

    The worker loads the model and its head codebook when it starts. Once it has applied
    KB_WORKER_RESTART_FACTS facts (default 1000; 0: never) it restarts itself in place after the
    job that reached the count: same PID and command line, a fresh process without the memory
    its edits left behind in the allocators.

    Example:

        kbctl --model demo worker
    """
    start_worker(state, beat=False, loglevel=loglevel)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@pass_state
def beat(state: State, loglevel: str) -> None:
    """Run Celery beat (the reaper and the nightly ingestion). Run exactly one.

    Example:

        kbctl beat
    """
    from kb_daemon.notify import prepare_broker

    state.checked_db()
    prepare_broker(state.settings)
    from workers.app import app

    state.settings.home.mkdir(parents=True, exist_ok=True)
    app.start(["beat", f"--loglevel={loglevel}", f"--schedule={state.settings.home / 'celerybeat-schedule'}"])


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@pass_state
def up(state: State, loglevel: str) -> None:
    """The embedded daemon: the worker of --model with beat, in the foreground.

    Example:

        kbctl init && kbctl up
    """
    start_worker(state, beat=True, loglevel=loglevel)


@cli.command()
@click.option("--answer", "new_name", default="oblong box", show_default=True,
              help="The new name given to the edited image's shape.")
def demo(new_name: str) -> None:
    """Apply one fact to the shipped demo model in process and show what changed.

    No database or worker: picks easy-VQA training images, renames the shape in one of them,
    and prints the answers before and after for the edited image, a rephrased question, another
    image of the same shape, a different shape, and a different question.

    Example:

        kbctl demo --answer "oblong box"
    """
    from kb_daemon.demo import run_demo

    run_demo(click.echo, new_name)


def _register_eval() -> None:
    from kb_daemon.eval_command import eval_command

    cli.add_command(eval_command)


_register_eval()


def main() -> None:
    cli(prog_name="kbctl")


if __name__ == "__main__":
    main()
