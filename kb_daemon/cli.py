"""`kbctl`, the admin CLI. Commands stay thin; domain errors become one line on stderr, exit 1."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kb_daemon.config import DEFAULT_MODEL, Settings
from kb_daemon.errors import KbError
from kb_daemon.eval_command import eval_command, eval_stream_command

if TYPE_CHECKING:
    from kb_daemon.service import JobOutcome, Queued, Service

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
            message = scrub(str(exc), ctx.meta.get("kb_secrets", ()))
            raise click.ClickException(
                one_line(f"unexpected {type(exc).__name__}: {message} (run with --debug for the traceback)")
            ) from exc


def one_line(message: str) -> str:
    return printable(" ".join(message.split()))


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """The passwords inside the configured database and broker URLs."""
    found = []
    for url in (settings.database_url, settings.broker_url):
        userinfo = url.split("://", 1)[-1].split("@")[0] if "@" in url else ""
        if ":" in userinfo and userinfo.rsplit(":", 1)[1]:
            found.append(userinfo.rsplit(":", 1)[1])
    return tuple(found)


def scrub(message: str, secrets: Sequence[str]) -> str:
    """Remove credentials of the configured URLs from a message."""
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


@dataclass
class State:
    """What every command gets: the settings, the model it acts on and the service over them."""

    settings: Settings
    model: str
    environ: dict[str, str]  # the environment a worker started from this command runs with
    service: Service = field(init=False)

    def __post_init__(self) -> None:
        from kb_daemon.service import Service  # SQLAlchemy and the models load with the first command

        self.service = Service(self.settings)


pass_state = click.make_pass_decorator(State)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(function)


def model_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """`--model NAME` after the command name too (`kbctl jobs --model x` = `kbctl --model x jobs`)."""

    def choose(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        state = ctx.find_object(State)
        if value and state is not None:
            state.model = value

    return click.option("--model", "model_name", default=None, expose_value=False, callback=choose,
                        metavar="NAME", help="Registered model to act on (default: kbctl's --model).")(function)


def actor_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--actor", default=None, help="Who makes this change (default: the OS user).")(function)


def emit(as_json: bool, data: Any, text: str | Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))  # JSON escapes every control character
    elif callable(text):
        text()
    else:
        echo(text)


# Characters that would act on the terminal instead of being shown: C0/C1 controls (but tab and
# newline, which kbctl's own output uses) and the bidirectional overrides and isolates that
# reorder what follows them. Stored text holds no tab or newline: input collapses white space.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text that may hold stored user input with its terminal controls shown escaped (\\u202e)."""
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def echo(text: str) -> None:
    click.echo(printable(text))


def actor_of(actor: str | None) -> str:
    from kb_daemon.queue import default_actor

    return actor or default_actor()


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

    \b
    Example:
        kbctl init && kbctl up &
        kbctl submit-fact --image cat.png --question "what breed is it?" --answer Kitty --wait
    """
    ctx.meta["kb_debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    environ = dict(os.environ)
    for key, value in (("KB_HOME", home), ("KB_DATABASE_URL", database_url), ("KB_BROKER_URL", broker_url)):
        if value:
            environ[key] = value
    environ["KB_MODEL"] = model_name
    settings = Settings.from_env(environ)
    ctx.meta["kb_secrets"] = secrets_of(settings)
    ctx.obj = State(settings, model_name, environ)
    ctx.call_on_close(ctx.obj.service.close)


# ----- set-up ---------------------------------------------------------------------------------
@cli.command()
@json_option
@pass_state
def init(state: State, as_json: bool) -> None:
    """Create the data directory and database, and register the demo model. Idempotent.

    \b
    Example:
        KB_HOME=~/kb kbctl init
    """
    result = state.service.init(actor=actor_of(None))
    emit(as_json, result.as_dict(), f"kb-daemon ready in {result.home} ({result.database})")


@cli.group()
def db() -> None:
    """Database maintenance.

    \b
    Example:
        kbctl db upgrade
    """


@db.command("upgrade")
@json_option
@pass_state
def db_upgrade(state: State, as_json: bool) -> None:
    """Apply pending schema migrations.

    \b
    Example:
        kbctl db upgrade
    """
    result = state.service.upgrade_schema()
    emit(as_json, result.as_dict(), f"schema at revision {result.after} (was {result.before})")


@cli.group()
def model() -> None:
    """Register and list models.

    \b
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

    \b
    Example:
        kbctl model add llava-prod /models/llava-1.5-7b --hparam alpha=0.1 --canary canaries.jsonl
    """
    from kb_daemon.service import parse_hparams

    info = state.service.add_model(
        name, path if path == "demo" else absolute(path), actor=actor_of(actor), layer=layer,
        hparams=parse_hparams(hparams), reference_pool=reference_pool,
        canary=absolute(canary) if canary else None, canary_max_changed=canary_max_changed,
        ingest_source=absolute(ingest_source) if ingest_source else None,
    )
    if info.broker_warning:
        click.echo(f"warning: {info.broker_warning}", err=True)
    emit(as_json, info.as_dict(), f"registered model {name} ({info.path})")


@model.command("set")
@click.argument("name")
@click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE",
              help="Editing hyperparameter to change, e.g. max_answer_tokens=96 (repeatable).")
@click.option("--reference-pool", help="Hard-negative pool: 'easy-vqa' or a JSON Lines file.")
@click.option("--canary", type=click.Path(exists=True, dir_okay=False), help="Canary inputs (JSON Lines).")
@click.option("--canary-max-changed", type=float, help="Share of canary answers a batch may change before it is held.")
@click.option("--ingest-source", help="File or folder the nightly batch reads.")
@actor_option
@json_option
@pass_state
def model_set(state: State, name: str, hparams: tuple[str, ...], reference_pool: str | None, canary: str | None,
              canary_max_changed: float | None, ingest_source: str | None, actor: str | None, as_json: bool) -> None:
    """Change the settings of registered model NAME.

    The change takes its place in the model's ordered queue (`kbctl jobs` lists it, with who made
    it): jobs queued before it run with the old settings, jobs queued after it with the new ones.
    Versions already built keep what they were built with. The method and the distance cannot
    change: the stored codebooks were made under them.

    \b
    Example:
        kbctl model set demo --hparam max_answer_tokens=96 --canary canaries.jsonl
    """
    from kb_daemon.service import parse_hparams

    result = state.service.set_model(
        name, actor=actor_of(actor), hparams=parse_hparams(hparams), reference_pool=reference_pool,
        canary=absolute(canary) if canary else None, canary_max_changed=canary_max_changed,
        ingest_source=absolute(ingest_source) if ingest_source else None,
    )
    emit(as_json, result.as_dict(), f"model {name}: {', '.join(result.changed)} changed "
                                    f"(recorded as job {result.job_id}; jobs queued from now on use it)")


def absolute(path: str) -> str:
    return str(Path(path).resolve())


@model.command("list")
@json_option
@pass_state
def model_list(state: State, as_json: bool) -> None:
    """List registered models.

    \b
    Example:
        kbctl model list --json
    """
    rows = state.service.list_models()

    def table() -> None:
        for row in rows:
            echo(f"{row.name:<20} head v{row.head_version:<6} {row.path}")

    emit(as_json, [row.as_dict() for row in rows], table)



# ----- API tokens -----------------------------------------------------------------------------
@cli.group()
def token() -> None:
    """API tokens for the HTTP server (`kbctl serve`), each with a role.

    A reader may ask and read; an editor may also submit and retract facts; an admin may also roll
    back, promote, ingest and export. The token's name is the actor the audit records for
    everything done with it. Only a hash is stored: a token is shown once, when it is created.

    \b
    Example:
        kbctl token create ci-bot --role editor
        kbctl token list
        kbctl token revoke ci-bot
    """


@token.command("create")
@click.argument("name")
@click.option("--role", required=True, metavar="reader|editor|admin",
              help="What the token may do: reader (ask, read), editor (also submit, retract) or admin "
                   "(also rollback, promote, ingest, export).")
@actor_option
@json_option
@pass_state
def token_create(state: State, name: str, role: str, actor: str | None, as_json: bool) -> None:
    """Create token NAME and print it, once: it cannot be shown again.

    NAME (letters, digits and . _ @ -, at most 100) is the actor the audit records for every
    change made with the token; a name is never reused, not even after a revoke. Store the
    printed token in a secret manager, and send it to the server as `Authorization: Bearer TOKEN`.
    The text output is the token alone on stdout (a note goes to stderr), so it can be piped.

    \b
    Example:
        KB_TOKEN=$(kbctl token create ci-bot --role editor)  # then into the secret manager
        kbctl token create ops --role admin --json
    """
    from kb_daemon.tokens import create_token

    created = create_token(state.service.checked_db(), name, role, actor=actor_of(actor))

    def text() -> None:
        echo(created.token)
        click.echo(printable(f"token {created.name} ({created.role}) created; it is shown only this once: "
                             "store it in a secret manager and send it as `Authorization: Bearer <token>`"),
                   err=True)

    emit(as_json, created.as_dict(), text)


@token.command("list")
@json_option
@pass_state
def token_list(state: State, as_json: bool) -> None:
    """List tokens (revoked ones too) with role, who created them and when each was last used.

    Token texts are never shown: only their hashes are stored.

    \b
    Example:
        kbctl token list --json
    """
    from kb_daemon.tokens import list_tokens

    rows = list_tokens(state.service.checked_db())

    def table() -> None:
        for row in rows:
            status = "active" if row.active else f"revoked {_when(row.revoked_at)} by {row.revoked_by}"
            echo(f"{row.name:<24} {row.role:<7} {status:<40} created {_when(row.created_at)} by {row.created_by}"
                 f", last used {_when(row.last_used_at) if row.last_used_at else 'never'}")

    emit(as_json, [row.as_dict() for row in rows], table)


def _when(moment: datetime | None) -> str:
    """A stored UTC time in the local time zone, to the minute (as `kbctl status` shows times)."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment is not None else "-"


@token.command("revoke")
@click.argument("name")
@actor_option
@json_option
@pass_state
def token_revoke(state: State, name: str, actor: str | None, as_json: bool) -> None:
    """Revoke token NAME: the server refuses it from now on. The name stays taken (it is in the audit).

    Revoking a revoked token changes nothing and says when and by whom it was revoked.

    \b
    Example:
        kbctl token revoke ci-bot
    """
    from kb_daemon.tokens import revoke_token

    info = revoke_token(state.service.checked_db(), name, actor=actor_of(actor))
    emit(as_json, info.as_dict(), f"token {info.name} revoked {_when(info.revoked_at)} by {info.revoked_by}")


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
@click.option("--supersedes", metavar="FACT_ID",
              help="An applied fact this one replaces: its entry leaves the knowledge in the same version "
                   "(see the conflicts a --wait report names).")
@click.option("--wait", is_flag=True, help="Block until applied and print the new version.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait with --wait.")
@actor_option
@json_option
@model_option
@pass_state
def submit_fact(state: State, image: str | None, question: str, answer: str, rephrases: tuple[str, ...],
                negative_images: tuple[str, ...], negative_questions: tuple[str, ...], supersedes: str | None,
                wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Record a fact and queue it for the model's worker.

    With --wait, the result names every applied fact the new one conflicts with (another
    answer on overlapping inputs), what each now answers, and how their radii were split.
    When the new fact replaces one of them, submit it with --supersedes FACT_ID.

    \b
    Example:
        kbctl submit-fact --image cat.png --question "what breed is it?" --answer Kitty \\
            --rephrase "which breed is this?" --negative-image dog.png --wait
    """
    from kb_daemon.queue import FactInput, read_image

    fact = FactInput(
        read_image(image, state.settings) if image else None, question, answer, rephrases,
        tuple(read_image(p, state.settings) for p in negative_images), negative_questions,
        supersedes=supersedes,
    )
    queued = waited(state, state.service.submit_fact(state.model, fact, actor=actor_of(actor)), wait, timeout,
                    as_json)
    text = f"fact {queued.fact_id} queued as job {queued.job_id}"
    data = queued.as_dict()
    if queued.outcome is not None:
        detail = state.service.fact(state.model, str(queued.fact_id))
        data["warnings"] = detail.warnings
        data["conflicts"] = (detail.report or {}).get("conflicts", [])
        data["superseded"] = (detail.report or {}).get("superseded", [])
        text += f"; applied as version {queued.outcome.version}"
        if detail.report is not None:
            text += f" (radius {detail.report['radius']:.4g}, {detail.report['steps']} steps)"
        if data["superseded"]:
            text += "; superseded " + ", ".join(data["superseded"])
        if detail.warnings:
            text += "".join(f"\nwarning: {w}" for w in detail.warnings)
    emit(as_json, data, text)


def waited(state: State, queued: Queued, wait: bool, timeout: float, quiet: bool) -> Queued:
    """With --wait: the queued job with its outcome, batch progress shown on stderr meanwhile."""
    if not wait:
        return queued
    return replace(queued, outcome=wait_for_job(state, queued.job_id, timeout, quiet))


def wait_for_job(state: State, job_id: int, timeout: float, quiet: bool) -> JobOutcome:
    """Wait for the job, showing its progress on stderr: a bar on a terminal, otherwise one line
    each time the count of facts done changes."""
    bar: Any = None
    shown = -1

    def progress(done: int, total: int, unit: str) -> None:
        nonlocal bar, shown
        if quiet or done == shown:
            return
        shown = done
        if not sys.stderr.isatty():
            click.echo(f"job {job_id}: {done}/{total} {unit}", err=True)
            return
        if bar is None:
            bar = click.progressbar(length=total, label=f"job {job_id}", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        return state.service.wait(job_id, timeout, progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@cli.command("wait")
@click.argument("job_id", type=int)
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait.")
@json_option
@pass_state
def wait_command(state: State, job_id: int, timeout: float, as_json: bool) -> None:
    """Wait for JOB_ID to finish, with its progress on stderr; print the version it made.

    Exits 1 if the job fails (with its error) and 3 if its batch was held by the canary gate.

    \b
    Example:
        kbctl ingest facts/ && kbctl wait 12
    """
    outcome = wait_for_job(state, job_id, timeout, as_json)
    emit(as_json, {"job_id": job_id, **outcome.as_dict()}, f"job {job_id} {outcome.status}: version "
         f"{outcome.version}" + (" HELD by the canary gate" if outcome.held else ""))
    if outcome.held:
        raise click.exceptions.Exit(EXIT_HELD)


@cli.command()
@click.option("--image", help="Image file (omit for text-only models).")
@click.option("--question", required=True)
@click.option("--version", "version", type=int, help="Version to answer from (default: head).")
@json_option
@model_option
@pass_state
def ask(state: State, image: str | None, question: str, version: int | None, as_json: bool) -> None:
    """Answer a question with the edited model (loads the model in this process).

    \b
    Example:
        kbctl ask --image cat.png --question "what breed is it?" --version 3
    """
    from kb_daemon.queue import read_image

    answer = state.service.ask(state.model, read_image(image, state.settings) if image else None, question,
                               version)
    fired = f"  (fact {answer.fact_id})" if answer.fact_id else ""
    emit(as_json, answer.as_dict(), f"{answer.answer}\t[v{answer.version}]{fired}")


@cli.command()
@click.argument("fact_id")
@click.option("--wait", is_flag=True, help="Block until the retraction is applied.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@actor_option
@json_option
@model_option
@pass_state
def retract(state: State, fact_id: str, wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Remove a fact from the knowledge (a new version without it).

    \b
    Example:
        kbctl retract f-1a2b3c4d5e6f7a8b --wait
    """
    queued = waited(state, state.service.retract(state.model, fact_id, actor=actor_of(actor)), wait, timeout,
                    as_json)
    emit(as_json, queued.as_dict(), f"retraction of {fact_id} queued as job {queued.job_id}"
         + (f"; version {queued.outcome.version}" if queued.outcome else ""))


@cli.command()
@click.argument("version", type=int)
@click.option("--wait", is_flag=True, help="Block until the rollback is applied.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@actor_option
@json_option
@model_option
@pass_state
def rollback(state: State, version: int, wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Make a new head whose content equals VERSION (history is kept; a rollback can be rolled back).

    \b
    Example:
        kbctl rollback 3 --wait
    """
    queued = waited(state, state.service.rollback(state.model, version, actor=actor_of(actor)), wait, timeout,
                    as_json)
    emit(as_json, queued.as_dict(), f"rollback to version {version} queued as job {queued.job_id}"
         + (f"; new head is version {queued.outcome.version}" if queued.outcome else ""))


@cli.command()
@click.argument("job_id", type=int)
@click.option("--wait", is_flag=True, help="With a running job: block until it has stopped.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@actor_option
@json_option
@model_option
@pass_state
def cancel(state: State, job_id: int, wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Cancel JOB_ID: a queued job never runs; a running one stops at its next fact boundary.

    Nothing of a cancelled job is stored as a version; its facts are marked cancelled in the ledger
    (`kbctl retry JOB_ID` queues the same work again).

    \b
    Example:
        kbctl cancel 12 --wait
    """
    result = state.service.cancel(state.model, job_id, actor=actor_of(actor))
    data = result.as_dict()
    if result.status == "running" and wait:
        data["status"] = state.service.wait_ended(state.model, job_id, timeout).status
    text = (f"job {job_id} cancelled" if data["status"] == "cancelled"
            else f"job {job_id} is {data['status']}" + ("; it stops at its next fact boundary"
                                                         if data["status"] == "running" else ""))
    emit(as_json, data, text)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--wait", is_flag=True, help="Block until the new job is applied.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@actor_option
@json_option
@model_option
@pass_state
def retry(state: State, job_id: int, wait: bool, timeout: float, actor: str | None, as_json: bool) -> None:
    """Queue a failed or cancelled job's work again, as a new job; its facts go back to pending.

    \b
    Example:
        kbctl retry 12 --wait
    """
    queued = waited(state, state.service.retry(state.model, job_id, actor=actor_of(actor)), wait, timeout, as_json)
    emit(as_json, {"retry_of": job_id, **queued.as_dict()}, f"job {job_id} queued again as job {queued.job_id}"
         + (f"; version {queued.outcome.version}" if queued.outcome else ""))


@cli.command()
@click.argument("version", type=int)
@actor_option
@json_option
@model_option
@pass_state
def promote(state: State, version: int, actor: str | None, as_json: bool) -> None:
    """Make a held batch version the head despite its broken canaries.

    \b
    Example:
        kbctl promote 7
    """
    result = state.service.promote(state.model, version, actor=actor_of(actor))
    emit(as_json, result.as_dict(), f"version {result.version} is now the head")


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--sync", is_flag=True, help="Also retract ingested facts that are absent from SOURCE.")
@click.option("--wait", is_flag=True, help="Block until the batch is applied (progress on stderr).")
@click.option("--timeout", type=float, default=3600.0, show_default=True)
@actor_option
@json_option
@model_option
@pass_state
def ingest(state: State, source: str, sync: bool, wait: bool, timeout: float, actor: str | None,
           as_json: bool) -> None:
    """Compare SOURCE (JSON Lines/CSV file or folder) with the ledger and queue one batch.

    New facts are added, facts whose answer changed supersede the old one, unchanged ones are
    skipped (running the same file twice queues nothing). One malformed line rejects the whole
    source, naming the file and line.

    With --wait, a batch held by the model's canary gate exits with status 3 (its version is
    recorded; `kbctl promote V` makes it the head).

    \b
    Example:
        kbctl ingest facts/ --sync --wait
    """
    result = state.service.ingest(state.model, source, sync=sync, actor=actor_of(actor))
    if result.job_id is not None and wait:
        result = replace(result, outcome=wait_for_job(state, result.job_id, timeout, as_json))
    text = (f"{result.new} new, {result.changed} changed, "
            + (f"{result.retried} failed before and queued again, " if result.retried else "")
            + f"{result.unchanged} unchanged, "
            + (f"{len(result.skipped)} skipped (removed by a retract or rollback), " if result.skipped else "")
            + f"{result.retract} to retract" + (f" from {result.source}" if sync else "") + "; "
            + (f"batch job {result.job_id}" if result.job_id else "nothing to do"))
    outcome = result.outcome
    if outcome is not None and outcome.held:
        text += f"; version {outcome.version} HELD: canaries changed ({(outcome.canaries or {}).get('changed')})"
    elif outcome is not None:
        text += f"; version {outcome.version}"

    def lines() -> None:
        from kb_daemon.service import conflict_phrase

        echo(text)
        for item in result.skipped:
            echo(f"  skipped {item['where']}: fact {item['fact_id']} {item['reason']}")
        for item in outcome.conflicts if outcome is not None else []:
            for conflict in item["conflicts"]:
                echo(f"  {item['fact_id']} ({item['answer']!r}) {conflict_phrase(conflict)}")
            if item["total"] > len(item["conflicts"]):
                echo(f"  {item['fact_id']} ({item['answer']!r}) and {item['total'] - len(item['conflicts'])} "
                     "more conflicts (not kept)")

    emit(as_json, result.as_dict(), lines)
    if outcome is not None and outcome.held:
        raise click.exceptions.Exit(EXIT_HELD)


# ----- inspection -----------------------------------------------------------------------------
@cli.command()
@click.argument("fact_id")
@model_option
@json_option
@pass_state
def fact(state: State, fact_id: str, as_json: bool) -> None:
    """Show one fact: what was asked, its status and versions, and the report of its edit.

    The report gives the unedited answer, the radius and whether it fell back, the distances of the
    rephrasings and negatives to the fact's key, and the optimisation steps; warnings name
    negatives inside the radius and rephrasings outside it.

    \b
    Example:
        kbctl fact f-1a2b3c4d5e6f7a8b
    """
    detail = state.service.fact(state.model, fact_id)

    def text() -> None:
        echo(f"fact {detail.fact_id}: {detail.status}"
                   + (f" (entered v{detail.entered_version}" if detail.entered_version is not None else "")
                   + (f", left v{detail.left_version})" if detail.left_version is not None
                      else (")" if detail.entered_version is not None else "")))
        echo(f"  question: {detail.question!r}")
        echo(f"  answer:   {detail.answer!r}")
        for rephrase in detail.rephrases:
            echo(f"  rephrase: {rephrase!r}")
        echo(f"  negatives: {len(detail.negatives)}; key: {detail.key}; by {detail.actor} via {detail.source}, "
                   f"{detail.submitted_at}")
        if detail.supersedes:
            echo(f"  submitted to supersede {detail.supersedes}")
        if detail.superseded_by:
            echo(f"  superseded by {detail.superseded_by}")
        if detail.error:
            echo(f"  error: {detail.error}")
        report = detail.report
        if report is not None:
            echo(f"  edit: unedited answer {report['original_answer']!r}; radius {report['radius']:.4g}"
                       + (f" (fallback: {report['radius_fallback']})" if report.get("radius_fallback") else "")
                       + f"; {report['steps']} steps, {'converged' if report['converged'] else 'not converged'}")
            echo("  positives at " + _distances(report["positive_distances"])
                       + "; negatives at " + _distances(report["negative_distances"]))
        for warning in detail.warnings:
            echo(f"  warning: {warning}")

    emit(as_json, detail.as_dict(), text)


def _distances(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values) if values else "none"


@cli.command()
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--follow", is_flag=True, help="List again on every change until no job is queued or running.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between looks with --follow.")
@json_option
@model_option
@pass_state
def jobs(state: State, limit: int, follow: bool, interval: float, as_json: bool) -> None:
    """List the model's most recent jobs, with progress (facts done/total) and errors.

    \b
    Example:
        kbctl jobs --limit 5
        kbctl jobs --follow
    """
    import time

    last: list[tuple[Any, ...]] | None = None
    while True:
        rows = state.service.jobs(state.model, limit)
        seen = [(j.id, j.status, j.progress, j.error) for j in rows]
        if seen != last:
            last = seen
            emit(as_json, [j.as_dict() for j in rows], lambda rows=rows: _job_table(rows))
        if not follow or all(not j.unfinished for j in rows):
            return
        time.sleep(interval)


def _job_table(rows: list[Any]) -> None:
    for j in rows:
        extra = f" v{j.version}" if j.version is not None else ""
        done, total = j.progress
        progress = f"{done}/{total}" if total else "-"
        error = f"  {j.error}" if j.error else ""
        echo(f"#{j.id:<5} {j.kind:<9} {j.status:<9} {progress:>9}{extra}{error}")


@cli.command()
@json_option
@model_option
@pass_state
def status(state: State, as_json: bool) -> None:
    """Head version, queue depth, the running job (age, progress, lease) and the last worker seen.

    A running job whose lease lapsed means its worker died or hangs: status says so and when the
    reaper hands the job out again.

    \b
    Example:
        kbctl status
    """
    result = state.service.status(state.model)
    lines = [f"model: {result.model}", f"head version: {result.head_version}", f"queue depth: {result.queue_depth}"]
    if result.running_job is None:
        lines.append("running: nothing")
    else:
        done, total = result.running_progress or (0, 0)
        lines.append(f"running: job {result.running_job} for {result.running_seconds} s"
                     + (f", {done}/{total} facts" if total else "") + f", held by {result.lease_owner}")
        if result.worker_lost and result.retry_at is not None:
            lines.append(f"worker lost: its lease lapsed {-(result.lease_expires_in_seconds or 0)} s ago; "
                         f"the job will be retried at {result.retry_at.astimezone().strftime('%H:%M:%S')}")
        else:
            lines.append(f"lease: renewed, expires in {result.lease_expires_in_seconds} s")
    seen = result.last_worker_seen_seconds_ago
    lines.append(f"last worker: {result.last_worker or 'none yet'}"
                 + (f", seen {seen} s ago" if seen is not None else ""))
    emit(as_json, result.as_dict(), "\n".join(lines))


@cli.command()
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
@model_option
@pass_state
def history(state: State, limit: int, as_json: bool) -> None:
    """List the model's versions, newest first, with who made each and from where.

    \b
    Example:
        kbctl history --json
    """
    head, rows = state.service.history(state.model, limit)

    def table() -> None:
        for v in rows:
            mark = "*" if v.version == head else ("H" if v.held else " ")
            change = ", ".join([f"+{f}" for f in v.added] + [f"-{f}" for f in v.removed])
            parent = f"<- v{v.parent}" if v.parent is not None else ""
            gate = " HELD" if v.held else (f" held, promoted by {v.promoted_by}" if v.promoted_by else "")
            echo(f"{mark} v{v.version:<5} {parent:<8} {v.kind:<9} {v.entries:>5} entries  "
                       f"{v.actor} via {v.source}{gate}  {change}")

    emit(as_json, [v.as_dict() for v in rows], table)


@cli.command()
@click.argument("version", type=int)
@json_option
@model_option
@pass_state
def show(state: State, version: int, as_json: bool) -> None:
    """Show one version: its metadata and the facts it holds.

    \b
    Example:
        kbctl show 4
    """
    detail = state.service.show(state.model, version)

    def text() -> None:
        v = detail.info
        echo(f"version {v.version} ({v.kind}, parent {v.parent}, by {v.actor} via {v.source}, {v.created_at})")
        if v.held:
            echo(f"  held by the canary gate: `kbctl promote {v.version}` makes it the head")
        elif v.promoted_by:
            echo(f"  was held by the canary gate; promoted by {v.promoted_by}")
        for f in detail.facts:
            echo(f"  {f.fact_id}  {f.question!r} -> {f.answer!r}")

    emit(as_json, detail.as_dict(), text)


@cli.command()
@click.argument("first", type=int)
@click.argument("second", type=int)
@json_option
@model_option
@pass_state
def diff(state: State, first: int, second: int, as_json: bool) -> None:
    """Facts added and removed between two versions, and radii that changed.

    \b
    Example:
        kbctl diff 2 5
    """
    result = state.service.diff(state.model, first, second)

    def text() -> None:
        if result.identical:
            echo(f"versions {first} and {second} hold the same facts with the same radii")
        for f in result.added:
            echo(f"+ {f}")
        for f in result.removed:
            echo(f"- {f}")
        for change in result.radii_changed:
            echo(f"~ {change.fact_id} radius {change.before:.4g} -> {change.after:.4g}")

    emit(as_json, result.as_dict(), text)


@cli.command()
@click.argument("version", type=int)
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@model_option
@pass_state
def export(state: State, version: int, directory: str, as_json: bool) -> None:
    """Write VERSION's codebook and metadata to DIRECTORY, loadable by `editor` anywhere.

    Load it with: Editor(load_backbone(PATH), codebook=Codebook.from_bytes(open(...).read())).

    \b
    Example:
        kbctl export 5 ./export-v5
    """
    bundle = state.service.export(state.model, version)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    (target / "codebook.safetensors").write_bytes(bundle.codebook)
    (target / "metadata.json").write_text(json.dumps(bundle.metadata, indent=2, default=str))
    data = {"directory": str(target), "bytes": len(bundle.codebook), "entries": bundle.entries}
    emit(as_json, data, f"exported version {version} ({bundle.entries} entries, {len(bundle.codebook):,} bytes) "
                        f"to {target}")


# ----- daemon ---------------------------------------------------------------------------------
def exec_workers(state: State, *args: str) -> None:
    """Replace this process by the worker entry point (`python -m workers ...`), with the settings
    of this command line in its environment: the same PID, output and signals."""
    environ = {**HF_DEFAULTS, **state.environ}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "workers", *args], environ)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@model_option
@pass_state
def worker(state: State, loglevel: str) -> None:
    """Run the worker of --model in the foreground (solo pool: one process, model loaded once).

    The worker loads the model and its head codebook when it starts. Once it has applied
    KB_WORKER_RESTART_FACTS facts (default 1000; 0: never) it restarts itself in place after the
    job that reached the count: same PID and command line, a fresh process without the memory
    its edits left behind in the allocators.

    \b
    Example:
        kbctl --model demo worker
    """
    exec_workers(state, "worker", "--model", state.model, "--loglevel", loglevel)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@pass_state
def beat(state: State, loglevel: str) -> None:
    """Run Celery beat (the reaper and the nightly ingestion). Run exactly one.

    \b
    Example:
        kbctl beat
    """
    exec_workers(state, "beat", "--loglevel", loglevel)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--serve", "with_server", is_flag=True,
              help="Also run `kbctl serve` for --model on 127.0.0.1 (stops with the worker).")
@click.option("--port", default=8700, show_default=True, help="The server's port, with --serve.")
@model_option
@pass_state
def up(state: State, loglevel: str, with_server: bool, port: int) -> None:
    """The embedded daemon: the worker of --model with beat, in the foreground.

    With --serve, the HTTP server of --model runs beside them (its log goes to the same stderr):
    one command for the one-machine case. Ctrl-C or SIGTERM to the process group stops all.

    \b
    Example:
        kbctl init && kbctl up
        kbctl token create me --role admin && kbctl up --serve --port 8700
    """
    if with_server:
        import subprocess

        command = [sys.executable, "-m", "kb_daemon.cli", "serve", "--model", state.model, "--port", str(port),
                   "--loglevel", loglevel, "--stop-with-parent"]
        subprocess.Popen(command, env={**HF_DEFAULTS, **state.environ})
    exec_workers(state, "worker", "--model", state.model, "--beat", "--loglevel", loglevel)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Other than loopback only once a token exists.")
@click.option("--port", default=8700, show_default=True, help="Port to listen on.")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Registered model to serve (repeatable; default: kbctl's --model).")
@click.option("--max-batch", default=16, show_default=True,
              help="Most requests answered by one generate() call (concurrent requests are batched).")
@click.option("--poll-seconds", default=0.5, show_default=True,
              help="How often each model's head is read (PostgreSQL also notifies at once).")
@click.option("--cached-versions", default=4, show_default=True,
              help="Pinned versions (NAME@V) kept loaded besides the head.")
@click.option("--max-body-mb", default=64, show_default=True, help="Larger request bodies are refused (413).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--stop-with-parent", is_flag=True, hidden=True)
@pass_state
def serve(state: State, host: str, port: int, models: tuple[str, ...], max_batch: int, poll_seconds: float,
          cached_versions: int, max_body_mb: int, loglevel: str, stop_with_parent: bool) -> None:
    """Serve the edited models over HTTP, each answering from its head version as it moves.

    Loads each model once, then answers OpenAI-compatible chat requests (`POST
    /v1/chat/completions`, model "NAME" or "NAME@V" for a pinned version) and offers the admin API
    (facts, retract, rollback, promote, ingest, export, jobs, versions). When a worker commits a
    new version the server swaps it in within 2 s, without a restart. Every route but
    /healthz needs `Authorization: Bearer TOKEN` (`kbctl token create`); the token's name is the
    actor recorded for what it changes. Several servers may share one PostgreSQL database behind
    a load balancer: each follows the head by itself.

    \b
    Example:
        kbctl token create app --role reader
        kbctl serve --port 8700 &
        curl -s localhost:8700/v1/models -H "Authorization: Bearer $TOKEN"
    """
    from kb_daemon.server.main import serve as run

    logging.getLogger().setLevel(loglevel.upper())
    if max_batch < 1 or cached_versions < 0 or poll_seconds <= 0 or max_body_mb < 1:
        raise click.UsageError("--max-batch and --max-body-mb must be >= 1, --cached-versions >= 0, "
                               "--poll-seconds > 0")
    run(state.settings, tuple(dict.fromkeys(models)) or (state.model,), host=host, port=port, loglevel=loglevel,
        stop_with_parent=stop_with_parent, max_batch=max_batch, poll_seconds=poll_seconds,
        cached_versions=cached_versions, max_body_bytes=max_body_mb * 1024 * 1024)


@cli.command()
@click.option("--answer", "new_name", default="oblong box", show_default=True,
              help="The new name given to the edited image's shape.")
def demo(new_name: str) -> None:
    """Apply one fact to the shipped demo model in process and show what changed.

    No database or worker: picks easy-VQA training images, renames the shape in one of them,
    and prints the answers before and after for the edited image, a rephrased question, another
    image of the same shape, a different shape, and a different question.

    \b
    Example:
        kbctl demo --answer "oblong box"
    """
    from kb_daemon.demo import run_demo

    run_demo(click.echo, new_name)


cli.add_command(eval_command)
cli.add_command(eval_stream_command)

EXIT_HELD = 3  # `ingest --wait`: the batch's version was held by the canary gate

# Offline by default: nothing may download weights or data at run time.
HF_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def main() -> None:
    """The `kbctl` entry point: the process's environment gets the offline defaults first."""
    for key, value in HF_DEFAULTS.items():
        os.environ.setdefault(key, value)
    cli(prog_name="kbctl")


if __name__ == "__main__":
    main()
