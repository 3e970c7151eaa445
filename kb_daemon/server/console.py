"""The operator console at /ui: server-rendered pages over the same service and tokens as the API.

Log in with an API token; the session is an HTTP-only, SameSite=Strict cookie signed with the
server's secret that holds the token's SHA-256 (never the token) and a CSRF value every form
carries back. Each request checks the token again, so revoking it ends its sessions. Buttons a
role may not use are not shown, and their routes refuse them anyway. No JavaScript is needed; a
page with running jobs refreshes itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from kb_daemon.config import Settings
from kb_daemon.errors import InvalidInput, KbError
from kb_daemon.models import Role, as_utc
from kb_daemon.queue import FactInput
from kb_daemon.server.auth import Forbidden, Unauthorized, require
from kb_daemon.server.inputs import open_image, question_text, read_form
from kb_daemon.tokens import Identity, digest

if TYPE_CHECKING:
    from kb_daemon.server.app import Server

HERE = Path(__file__).resolve().parent
COOKIE = "kb_session"
LOGIN_COOKIE = "kb_login_csrf"
SESSION_SECONDS = 12 * 3600
PAGE_SIZE = 50
THUMBNAIL_PIXELS = 96
SHOWN_FACTS = 200  # a version page lists at most this many added (and removed) facts


@dataclass(frozen=True)
class ConsoleSession:
    key: str  # the token's SHA-256
    csrf: str
    expires: float


class Sessions:
    """Signed session cookies: base64(JSON) + "." + HMAC-SHA256 over it."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def issue(self, key: str) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            {"k": key, "c": secrets.token_urlsafe(24), "e": time.time() + SESSION_SECONDS}).encode()).decode()
        return f"{payload}.{self._sign(payload)}"

    def read(self, value: str | None) -> ConsoleSession | None:
        if not value or "." not in value:
            return None
        payload, signature = value.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode()))
            session = ConsoleSession(str(data["k"]), str(data["c"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()


def session_secret(settings: Settings) -> bytes:
    """KB_SESSION_SECRET, else a random secret kept (mode 0600) in $KB_HOME/session-secret."""
    if settings.session_secret:
        return settings.session_secret.encode()
    path = settings.home / "session-secret"
    if not path.exists():
        settings.home.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another server made it first
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class LoginRequired(Exception):
    """No valid session: the page redirects to the login form."""


@dataclass(frozen=True)
class Viewer:
    identity: Identity
    csrf: str

    def may(self, role: str) -> bool:
        return self.identity.role.allows(Role(role))


def console_router(server: Server) -> APIRouter:
    router = APIRouter(prefix="/ui")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(chart=line_chart, when=_when, quote=quote)
    sessions = Sessions(session_secret(server.settings))
    service = server.service

    def viewer(request: Request) -> Viewer:
        session = sessions.read(request.cookies.get(COOKIE))
        if session is None:
            raise LoginRequired
        try:
            identity = server.auth.identify_digest(session.key)
        except Unauthorized as exc:
            raise LoginRequired from exc
        return Viewer(identity, session.csrf)

    async def form_of(request: Request, who: Viewer) -> Any:
        form = await read_form(request, server.settings)
        if not hmac.compare_digest(str(form.get("csrf", "")), who.csrf):
            raise Forbidden("the form's CSRF token does not match this session; reload the page and try again")
        return form

    def page(request: Request, template: str, who: Viewer | None, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, template, {"who": who, "models": server.hosts, **context},
                                          status_code=status)

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    # ----- login ------------------------------------------------------------------------------
    @router.get("/login")
    async def login_form(request: Request) -> HTMLResponse:
        csrf = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, csrf=csrf, error=None)
        response.set_cookie(LOGIN_COOKIE, csrf, httponly=True, samesite="strict", max_age=600, path="/ui")
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=4)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(str(form.get("csrf", "")), expected):
            raise Forbidden("the login form expired; reload it and try again")
        token = str(form.get("token", "")).strip()
        try:
            await call(server.auth.identify, f"Bearer {token}")
        except Unauthorized:
            csrf = secrets.token_urlsafe(24)
            response = page(request, "login.html", None, 401, csrf=csrf, error="unknown or revoked token")
            response.set_cookie(LOGIN_COOKIE, csrf, httponly=True, samesite="strict", max_age=600, path="/ui")
            return response
        done = RedirectResponse("/ui/", status_code=303)
        done.set_cookie(COOKIE, sessions.issue(digest(token)), httponly=True, samesite="strict",
                        max_age=SESSION_SECONDS, path="/ui", secure=request.url.scheme == "https")
        done.delete_cookie(LOGIN_COOKIE, path="/ui")
        return done

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        await form_of(request, viewer(request))
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # ----- pages ------------------------------------------------------------------------------
    @router.get("/")
    async def models(request: Request) -> HTMLResponse:
        who = viewer(request)

        def gather() -> list[dict[str, Any]]:
            rows = []
            for info in service.list_models():
                host = server.hosts.get(info.name)
                rows.append({"info": info, "status": service.status(info.name),
                             "served": host.state() if host else None,
                             "held": service.held_versions(info.name)})
            return rows

        return page(request, "models.html", who, rows=await call(gather))

    @router.get("/models/{name}/versions")
    async def timeline(request: Request, name: str, before: int | None = None, at: str | None = None) -> HTMLResponse:
        who = viewer(request)
        head, versions = await call(service.history, name, PAGE_SIZE, before)
        live = None
        if at:
            live = await call(service.head_at, name, _parse_time(at))
        _head, recent = await call(service.history, name, 500)
        jobs = await call(service.jobs, name, 200)
        charts = {
            "entries": [(v.created_at.timestamp(), v.entries) for v in reversed(recent)],
            "seconds": [(j.finished_at.timestamp(), (j.finished_at - j.started_at).total_seconds())
                        for j in reversed(jobs) if j.kind == "edit" and j.finished_at and j.started_at],
            "queue": _queue_depth(jobs),
        }
        older = versions[-1].version if versions and versions[-1].version > 0 else None
        return page(request, "timeline.html", who, name=name, head=head, versions=versions, older=older,
                    at=at, live=live, charts=charts)

    @router.get("/models/{name}/versions/{number}")
    async def version(request: Request, name: str, number: int, against: int | None = None) -> HTMLResponse:
        who = viewer(request)
        detail = await call(service.version, name, number)
        base = against if against is not None else detail.info.parent
        diff = await call(service.diff, name, base, number) if base is not None else None
        added_ids = diff.added if diff is not None else detail.info.added
        added = await call(service.fact_cards, name, added_ids[:SHOWN_FACTS])
        left = await call(service.fact_cards, name, diff.removed[:SHOWN_FACTS]) if diff is not None else []
        head, _ = await call(service.history, name, 1)
        return page(request, "version.html", who, name=name, detail=detail, diff=diff, base=base, added=added,
                    left=left, added_total=len(added_ids), head=head, shown=SHOWN_FACTS)

    @router.get("/models/{name}/facts/{fact_id}")
    async def fact(request: Request, name: str, fact_id: str) -> HTMLResponse:
        who = viewer(request)
        detail = await call(service.fact, name, fact_id)
        radius = await call(service.radius_at, name, fact_id)
        return page(request, "fact.html", who, name=name, fact=detail, radius=radius)

    @router.get("/models/{name}/jobs")
    async def jobs(request: Request, name: str) -> HTMLResponse:
        who = viewer(request)
        rows = await call(service.jobs, name, 50)
        return page(request, "jobs.html", who, name=name, jobs=rows, live=any(j.unfinished for j in rows))

    @router.get("/models/{name}/jobs/{job_id}")
    async def job(request: Request, name: str, job_id: int) -> HTMLResponse:
        who = viewer(request)
        info = await call(service.job, name, job_id)
        return page(request, "job.html", who, name=name, job=info, live=info.unfinished)

    @router.get("/models/{name}/images/{sha}")
    async def image(request: Request, name: str, sha: str, size: int = THUMBNAIL_PIXELS) -> Response:
        viewer(request)
        data = await call(service.image, name, sha)
        return Response(await call(_thumbnail, data, max(16, min(size, 1024))), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=86400"})

    @router.get("/eval")
    async def eval_reports(request: Request) -> HTMLResponse:
        """The metric curves of the `kbctl eval --json` reports kept in $KB_HOME/eval/."""
        who = viewer(request)
        reports = await call(_eval_reports, server.settings.home / "eval")
        return page(request, "eval.html", who, reports=reports, folder=server.settings.home / "eval")

    # ----- try it -----------------------------------------------------------------------------
    @router.get("/models/{name}/try")
    async def try_form(request: Request, name: str, fact: str | None = None,
                       version: int | None = None) -> HTMLResponse:
        who = viewer(request)
        server.host(name)
        chosen = await call(service.fact, name, fact) if fact else None
        return page(request, "try.html", who, name=name, chosen=chosen, version=version, result=None,
                    question=chosen.question if chosen else "")

    @router.post("/models/{name}/try")
    async def try_it(request: Request, name: str) -> HTMLResponse:
        who = viewer(request)
        host = server.host(name)
        form = await form_of(request, who)
        question = question_text(form.get("question"))
        version_text = str(form.get("version") or "").strip()
        if version_text and not version_text.isdigit():
            raise InvalidInput(f"version must be a version number, got {version_text!r}")
        version = int(version_text) if version_text else None
        upload, fact_id = form.get("image"), str(form.get("fact") or "")
        chosen = await call(service.fact, name, fact_id) if fact_id else None
        data = None
        if isinstance(upload, UploadFile) and upload.filename:
            data = await upload.read(server.settings.max_image_bytes + 1)
        elif chosen is not None and chosen.image_sha256:
            data = await call(service.image, name, chosen.image_sha256)
        picture = await call(open_image, data, "image", server.settings) if data else None
        edited = await call(lambda: host.submit(picture, question, version).result(timeout=120))
        unedited = await call(lambda: host.submit(picture, question, version, edited=False).result(timeout=120))
        return page(request, "try.html", who, name=name, chosen=chosen, version=version, question=question,
                    result={"edited": edited, "unedited": unedited,
                            "image": base64.b64encode(_thumbnail(data, 160)).decode() if data else None})

    # ----- submit -----------------------------------------------------------------------------
    @router.get("/models/{name}/submit")
    async def submit_form(request: Request, name: str) -> HTMLResponse:
        who = viewer(request)
        require(who.identity, Role.EDITOR, "submitting a fact")
        return page(request, "submit.html", who, name=name)

    @router.post("/models/{name}/submit")
    async def submit(request: Request, name: str) -> Response:
        who = viewer(request)
        require(who.identity, Role.EDITOR, "submitting a fact")
        form = await form_of(request, who)
        upload = form.get("image")
        image = await upload.read(server.settings.max_image_bytes + 1) if isinstance(upload, UploadFile) \
            and upload.filename else None
        negatives = [await f.read(server.settings.max_image_bytes + 1) for f in form.getlist("negative_image")
                     if isinstance(f, UploadFile) and f.filename]
        for i, data in enumerate([image, *negatives]):
            if data is not None:
                await call(open_image, data, "image" if i == 0 else f"negative image {i}", server.settings)
        rephrases = [line.strip() for line in str(form.get("rephrases", "")).splitlines() if line.strip()]
        fact = FactInput(image, str(form.get("question", "")), str(form.get("answer", "")), tuple(rephrases),
                         tuple(negatives), supersedes=str(form.get("supersedes", "")).strip() or None)
        queued = await call(service.submit_fact, name, fact, actor=who.identity.name, source="ui")
        return RedirectResponse(f"/ui/models/{quote(name)}/jobs/{queued.job_id}", status_code=303)

    # ----- guarded actions --------------------------------------------------------------------
    async def confirm(request: Request, name: str, action: str, target: int, post: str,
                      fields: dict[str, Any]) -> HTMLResponse:
        """The confirmation of making version `target`'s content the head: what leaves, what comes back."""
        who = viewer(request)
        require(who.identity, Role.ADMIN, "rolling back" if action == "rollback" else "promoting")
        head, _ = await call(service.history, name, 1)
        diff = await call(service.diff, name, head, target)
        return page(request, "confirm.html", who, name=name, action=action, target=target, head=head,
                    leave=diff.removed, back=diff.added, post=post, fields=fields)

    @router.get("/models/{name}/rollback")
    async def rollback_confirm(request: Request, name: str, version: int) -> HTMLResponse:
        return await confirm(request, name, "rollback", version, f"/ui/models/{quote(name)}/rollback",
                             {"version": version})

    @router.post("/models/{name}/rollback")
    async def rollback(request: Request, name: str) -> Response:
        who = viewer(request)
        require(who.identity, Role.ADMIN, "rolling back")
        form = await form_of(request, who)
        version = str(form.get("version", ""))
        if not version.isdigit():
            raise InvalidInput("version must be a version number")
        queued = await call(service.rollback, name, int(version), actor=who.identity.name, source="ui:rollback")
        return RedirectResponse(f"/ui/models/{quote(name)}/jobs/{queued.job_id}", status_code=303)

    @router.get("/models/{name}/facts/{fact_id}/retract")
    async def retract_confirm(request: Request, name: str, fact_id: str) -> HTMLResponse:
        who = viewer(request)
        require(who.identity, Role.EDITOR, "retracting a fact")
        head, _ = await call(service.history, name, 1)
        return page(request, "confirm.html", who, name=name, action="retract", target=fact_id, head=head,
                    leave=[fact_id], back=[], post=f"/ui/models/{quote(name)}/facts/{quote(fact_id)}/retract",
                    fields={})

    @router.post("/models/{name}/facts/{fact_id}/retract")
    async def retract(request: Request, name: str, fact_id: str) -> Response:
        who = viewer(request)
        require(who.identity, Role.EDITOR, "retracting a fact")
        await form_of(request, who)
        queued = await call(service.retract, name, fact_id, actor=who.identity.name, source="ui")
        return RedirectResponse(f"/ui/models/{quote(name)}/jobs/{queued.job_id}", status_code=303)

    @router.get("/models/{name}/versions/{number}/promote")
    async def promote_confirm(request: Request, name: str, number: int) -> HTMLResponse:
        return await confirm(request, name, "promote", number,
                             f"/ui/models/{quote(name)}/versions/{number}/promote", {})

    @router.post("/models/{name}/versions/{number}/promote")
    async def promote(request: Request, name: str, number: int) -> Response:
        who = viewer(request)
        require(who.identity, Role.ADMIN, "promoting")
        await form_of(request, who)
        await call(service.promote, name, number, actor=who.identity.name)
        return RedirectResponse(f"/ui/models/{quote(name)}/versions/{number}", status_code=303)

    return router


def console_error(request: Request, exc: Exception, status: int) -> Response | None:
    """The console's own rendering of an error (a page, or the login form); None outside /ui."""
    if not request.url.path.startswith("/ui"):
        return None
    if isinstance(exc, LoginRequired):
        return RedirectResponse("/ui/login", status_code=303)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if status >= 500 and not isinstance(exc, KbError):
        message = "internal error; the server log has the details"
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    return templates.TemplateResponse(request, "error.html", {"who": None, "message": message, "status": status},
                                      status_code=status)


# ----- helpers ------------------------------------------------------------------------------------
EVAL_SERIES = (("acc", "Acc"), ("t_gen", "T-Gen"), ("i_gen", "I-Gen"), ("loc", "Loc"), ("hm", "HM"))
MAX_EVAL_REPORTS = 50


def _eval_reports(folder: Path) -> list[dict[str, Any]]:
    """Each readable report in `folder` (newest first): its name, method, mode, totals and one
    exact-match curve per metric; a file that is not a report is listed with why."""
    found = []
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in paths[:MAX_EVAL_REPORTS]:
        try:
            report = json.loads(path.read_text())
            curve = report["curve"]
            series = {label: [(float(point["edits"]), float(point["exact"][key])) for point in curve
                              if point["exact"].get(key) is not None] for key, label in EVAL_SERIES}
            found.append({"name": path.name, "method": report.get("hparams", {}).get("method", "?"),
                          "mode": report.get("mode"), "cases": report.get("num_cases"),
                          "totals": report.get("exact", {}), "series": series, "error": None})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            found.append({"name": path.name, "error": f"not a kbctl eval report ({type(exc).__name__})"})
    return found


def _thumbnail(data: bytes, pixels: int) -> bytes:
    from PIL import Image

    picture = Image.open(io.BytesIO(data)).convert("RGB")
    picture.thumbnail((pixels, pixels))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"'live at' must be a date and time like 2026-12-07T14:30, got {text!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    return (as_utc(value) or value).strftime("%Y-%m-%d %H:%M:%S UTC")


def _queue_depth(jobs: list[Any]) -> list[tuple[float, float]]:
    """Jobs waiting or running at 40 moments spread over the span of `jobs`."""
    spans = []
    now = time.time()
    for job in jobs:
        start = (as_utc(job.created_at) or job.created_at).timestamp()
        end = job.finished_at or job.started_at
        spans.append((start, (as_utc(end) or end).timestamp() if end else now))
    if not spans:
        return []
    first, last = min(s for s, _e in spans), max(max(e for _s, e in spans), now)
    moments = [first + (last - first) * i / 39 for i in range(40)]
    return [(t, float(sum(1 for s, e in spans if s <= t < e))) for t in moments]


def line_chart(points: list[tuple[float, float]], title: str, unit: str, width: int = 420, height: int = 120,
               x_unit: str | None = None) -> Markup:
    """A small SVG line chart of (x, y) points; x is a Unix time, or a count of `x_unit` when given.
    Readable without colour: one series per chart, and the axis ranges are written out."""
    if len(points) < 2:
        return Markup(f'<p class="muted">{Markup.escape(title)}: not enough data yet</p>')
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y1 = min(xs), max(xs), max(max(ys), 1e-9)
    pad = 28

    def sx(x: float) -> float:
        return pad + (width - 2 * pad) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def sy(y: float) -> float:
        return height - pad - (height - 2 * pad) * (y / y1)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    if x_unit is None:
        start = datetime.fromtimestamp(x0, timezone.utc).strftime("%m-%d %H:%M")
        end = datetime.fromtimestamp(x1, timezone.utc).strftime("%m-%d %H:%M") + " UTC"
    else:
        start, end = f"{x0:g}", f"{x1:g} {Markup.escape(x_unit)}"
    return Markup(
        f'<figure class="chart"><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{Markup.escape(title)}, from 0 to {y1:g} {Markup.escape(unit)}">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>'
        f'<polyline points="{line}" class="series"/>'
        f'<text x="{pad}" y="{pad - 8}">{y1:g} {Markup.escape(unit)}</text>'
        f'<text x="{pad}" y="{height - 8}">{start}</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{end}</text>'
        f'</svg><figcaption>{Markup.escape(title)}</figcaption></figure>')
