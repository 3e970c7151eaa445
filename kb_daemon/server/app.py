"""The HTTP front door: OpenAI-compatible answers from the live head, and the admin API.

Routes are thin: they read the request, check the token's role, call the same `Service` methods
as `kbctl` (the token's name is the actor) or a `ModelHost`, and return the result's `as_dict()`.
Every failure is a 4xx/5xx with `{"error": {"type", "message"}}`, one line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from kb_daemon.config import Settings
from kb_daemon.db import DatabaseUnavailable
from kb_daemon.errors import Conflict, InvalidInput, KbError, NotFound
from kb_daemon.models import Role
from kb_daemon.queue import FactInput
from kb_daemon.server.auth import Authenticator, Forbidden, Unauthorized, Unavailable, require
from kb_daemon.server.console import LoginRequired, console_error, console_router
from kb_daemon.server.hosting import ModelHost, NotReady, Reply
from kb_daemon.server.inputs import (
    TooLarge,
    chat_input,
    decode_base64,
    model_reference,
    open_image,
    question_text,
    read_form,
    unpack_archive,
    upload_name,
)
from kb_daemon.server.listener import HeadListener
from kb_daemon.server.metrics import CONTENT_TYPE, ServerMetrics
from kb_daemon.service import Service
from kb_daemon.tokens import Identity

logger = logging.getLogger(__name__)

ERROR_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (TooLarge, 413, "too_large"),
    (NotReady, 503, "not_ready"),
    (Unavailable, 503, "unavailable"),
    (DatabaseUnavailable, 503, "unavailable"),
    (InvalidInput, 400, "invalid_input"),
    (KbError, 400, "invalid_request"),
]
ANSWER_TIMEOUT_SECONDS = 120.0
INLINE_IMAGE_BYTES = 64 * 1024
MAX_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[str, ...]
    poll_seconds: float = 0.5  # how often each model's head is read (PostgreSQL also notifies)
    max_batch: int = 16  # requests answered by one generate() call
    cached_versions: int = 4  # pinned (name@V) versions kept loaded besides the head
    max_body_bytes: int = 64 * 1024 * 1024  # larger request bodies get 413 before they are read


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": " ".join(message.split())}}


def _classify(exc: Exception) -> tuple[int, str]:
    for cls, status, kind in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, kind
    if isinstance(exc, SQLAlchemyError):
        return 503, "unavailable"
    return 500, "internal"


class BodyLimit:
    """Refuse request bodies over `limit` bytes: by Content-Length before reading, else while read."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(f"request body over {self.limit:,} bytes")
            return message

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        body = json.dumps(error_body("too_large", f"request body over {self.limit:,} bytes "
                                                  "(kbctl serve --max-body-mb)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Measured:
    """Count and time each request by route template and model (a plain ASGI wrapper: Starlette's
    `@app.middleware("http")` streams every response through an extra task)."""

    def __init__(self, app: Any, metrics: ServerMetrics, models: dict[str, Any]) -> None:
        self.app, self.metrics, self.models = app, metrics, models

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sent(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            model = str(scope.get("path_params", {}).get("name") or scope.get("state", {}).get("kb_model", ""))
            self.metrics.observe(path, model if model in self.models or not model else "other", status,
                                 time.perf_counter() - start)


class Server:
    """What the routes share: settings, the service, the hosts, the token check, the metrics."""

    def __init__(self, settings: Settings, config: ServerConfig) -> None:
        self.settings, self.config = settings, config
        self.service = Service(settings)
        self.db = self.service.checked_db()
        self.hosts = {name: ModelHost(self.db, name, poll_seconds=config.poll_seconds, max_batch=config.max_batch,
                                      cached_versions=config.cached_versions) for name in config.models}
        self.auth = Authenticator(self.db)
        self.metrics = ServerMetrics(self.hosts)
        self.listener: HeadListener | None = None

    def start(self) -> None:
        for host in self.hosts.values():
            host.start()
        if not self.settings.is_sqlite:
            self.listener = HeadListener(self.settings.database_url, self._notified)
            self.listener.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        for host in self.hosts.values():
            host.stop()
        self.service.close()

    def _notified(self, model: str) -> None:
        host = self.hosts.get(model)
        if host is not None:
            host.wake()

    def host(self, name: str) -> ModelHost:
        host = self.hosts.get(name)
        if host is None:
            served = ", ".join(sorted(self.hosts))
            raise NotFound(f"model {name!r} is not served here (served: {served})")
        return host


def create_app(settings: Settings, config: ServerConfig) -> FastAPI:
    """The ASGI app; its lifespan loads every served model before the first request is accepted."""
    server = Server(settings, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(server.start)
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    # No unauthenticated schema or docs pages: every route but /healthz needs a token.
    app = FastAPI(title="kb-daemon", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        status, kind = _classify(exc)
        page = console_error(request, exc, status)
        if page is not None:
            if status == 500 and not isinstance(exc, LoginRequired):
                logger.exception("%s %s failed", request.method, request.url.path)
            return page
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if status == 500:
            logger.exception("%s %s failed", request.method, request.url.path)
            message = "internal error; the server log has the details"
        elif isinstance(exc, (SQLAlchemyError, DatabaseUnavailable)):  # its text names the database
            message = "the database cannot be reached; retry later"
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(kind, message), status_code=status, headers=headers)

    for handled in (KbError, SQLAlchemyError, LoginRequired):
        app.add_exception_handler(handled, on_error)  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg"))
        return JSONResponse(error_body("invalid_input", f"{where}: {message}" if where else message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        page = console_error(request, StarletteHTTPException(exc.status_code, message), exc.status_code)
        return page or JSONResponse(error_body(kind, message), status_code=exc.status_code)

    app.add_middleware(Measured, metrics=server.metrics, models=server.hosts)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)  # type: ignore[arg-type]
    # The console: its pages need a session (from a token); its login form and stylesheet cannot.
    app.include_router(console_router(server))
    app.mount("/ui/static", StaticFiles(directory=str(Path(__file__).resolve().parent / "static")), name="static")

    def caller(request: Request, role: Role, action: str) -> Identity:
        identity = server.auth.identify(request.headers.get("authorization"))
        require(identity, role, action)
        return identity

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    # ----- operations -----------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        caller(request, Role.READER, "readiness")
        states = [host.state() for host in server.hosts.values()]
        ready = all(s.loaded_version is not None and s.database_ok for s in states)
        body = {"ready": ready, "models": {
            s.name: {"loaded_version": s.loaded_version, "head_version": s.head_version,
                     "lag_versions": s.lag_versions, "lag_seconds": round(s.lag_seconds, 3),
                     "database_ok": s.database_ok,
                     "staleness_seconds": None if s.staleness_seconds is None else round(s.staleness_seconds, 3),
                     "error": s.last_error} for s in states}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        caller(request, Role.READER, "metrics")
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    # ----- answers --------------------------------------------------------------------------
    async def answer(request: Request, name: str, version: int | None, image: bytes | None,
                     question: str) -> Reply:
        request.state.kb_model = name
        host = server.host(name)
        # Small images are decoded on the event loop (a 64x64 PNG takes well under a millisecond);
        # large ones, and a pinned version that may have to be loaded, go to the thread pool.
        if image is None:
            picture = None
        elif len(image) <= INLINE_IMAGE_BYTES:
            picture = open_image(image, "image", settings)
        else:
            picture = await call(open_image, image, "image", settings)
        if version is None or host.is_loaded(version):
            future = host.submit(picture, question, version)
        else:
            future = await call(host.submit, picture, question, version)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), ANSWER_TIMEOUT_SECONDS)
        except asyncio.TimeoutError as exc:
            raise Unavailable(f"no answer within {ANSWER_TIMEOUT_SECONDS:.0f} s; the server is overloaded") from exc

    def kb_fields(reply: Reply) -> dict[str, Any]:
        return {"version": reply.version, "fact_id": reply.fact_id, "distance": reply.distance}

    @app.get("/v1/models")
    async def list_served(request: Request) -> dict[str, Any]:
        caller(request, Role.READER, "listing models")
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "kb-daemon",
             "kb": {"loaded_version": host.head_number, "head_version": host.state().head_version}}
            for name, host in server.hosts.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        caller(request, Role.READER, "asking")
        body = await json_body(request)
        name, version = model_reference(body.get("model"))
        server.host(name)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise InvalidInput("messages must be a list of chat messages")
        query = chat_input(messages)
        reply = await answer(request, name, version, query.image, query.question)
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        headers = {"X-KB-Version": str(reply.version)}
        if body.get("stream"):
            return StreamingResponse(_stream(ident, created, body["model"], reply, kb_fields(reply)),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "kb": kb_fields(reply),
        }, headers=headers)

    @app.post("/v1/models/{name}/answer")
    async def answer_route(request: Request, name: str) -> JSONResponse:
        caller(request, Role.READER, "asking")
        fields, files = await read_body(request)
        image = await one_image(files, fields, "image")
        version = fields.get("version")
        if version is not None and not str(version).isdigit():
            raise InvalidInput(f"version must be a version number, got {version!r}")
        reply = await answer(request, name, int(version) if version is not None else None, image,
                             question_text(fields.get("question")))
        return JSONResponse({"answer": reply.text, "model": name, **kb_fields(reply)},
                            headers={"X-KB-Version": str(reply.version)})

    # ----- reading ----------------------------------------------------------------------------
    @app.get("/v1/models/{name}/status")
    async def status(request: Request, name: str) -> dict[str, Any]:
        caller(request, Role.READER, "reading")
        result = (await call(server.service.status, name)).as_dict()
        return {**result, "served": _served(server, name)}

    @app.get("/v1/models/{name}/versions")
    async def versions(request: Request, name: str, limit: int = 50) -> dict[str, Any]:
        caller(request, Role.READER, "reading")
        head, rows = await call(server.service.history, name, max(1, min(limit, 1000)))
        return {"model": name, "head": head, "versions": [v.as_dict() for v in rows]}

    @app.get("/v1/models/{name}/versions/{version}")
    async def show(request: Request, name: str, version: int) -> dict[str, Any]:
        caller(request, Role.READER, "reading")
        return (await call(server.service.show, name, version)).as_dict()

    @app.get("/v1/models/{name}/diff")
    async def diff(request: Request, name: str, first: int, second: int) -> dict[str, Any]:
        caller(request, Role.READER, "reading")
        return (await call(server.service.diff, name, first, second)).as_dict()

    @app.get("/v1/models/{name}/facts/{fact_id}")
    async def fact(request: Request, name: str, fact_id: str) -> dict[str, Any]:
        caller(request, Role.READER, "reading")
        return (await call(server.service.fact, name, fact_id)).as_dict()

    @app.get("/v1/models/{name}/jobs")
    async def jobs(request: Request, name: str, limit: int = 20) -> dict[str, Any]:
        caller(request, Role.READER, "reading")
        return {"model": name, "jobs": [j.as_dict() for j in await call(server.service.jobs, name,
                                                                          max(1, min(limit, 1000)))]}

    @app.get("/v1/jobs/{job_id}")
    async def job(request: Request, job_id: int, wait: float = 0.0) -> dict[str, Any]:
        """The job; `?wait=S` waits up to S seconds (at most 60) for it to end."""
        caller(request, Role.READER, "reading")
        name, info = await call(server.service.find_job, job_id)
        if wait > 0 and info.unfinished:
            try:
                info = await call(server.service.wait_ended, name, job_id, min(wait, MAX_WAIT_SECONDS))
            except KbError:
                info = (await call(server.service.find_job, job_id))[1]  # still running: report it as it is
        return {**info.as_dict(), "model": name}

    # ----- changes ----------------------------------------------------------------------------
    @app.post("/v1/models/{name}/facts")
    async def submit(request: Request, name: str) -> JSONResponse:
        who = caller(request, Role.EDITOR, "submitting a fact")
        fields, files = await read_body(request)
        image = await one_image(files, fields, "image")
        negatives = [await read_upload(f, settings.max_image_bytes) for f in files.get("negative_image", [])]
        negatives += [decode_base64(t, "negative_images_base64[]") for t in _strings(fields, "negative_images_base64")]
        for i, data in enumerate(negatives):
            await call(open_image, data, f"negative image {i + 1}", settings)
        if image is not None:
            await call(open_image, image, "image", settings)
        fact = FactInput(image, _string(fields, "question"), _string(fields, "answer"),
                         tuple(_strings(fields, "rephrase", "rephrases")), tuple(negatives),
                         tuple(_strings(fields, "negative_question", "negative_questions")),
                         supersedes=_optional_string(fields, "supersedes"))
        queued = await call(server.service.submit_fact, name, fact, actor=who.name, source="http")
        return JSONResponse(queued.as_dict(), status_code=202)

    @app.post("/v1/models/{name}/facts/{fact_id}/retract")
    async def retract(request: Request, name: str, fact_id: str) -> JSONResponse:
        who = caller(request, Role.EDITOR, "retracting a fact")
        queued = await call(server.service.retract, name, fact_id, actor=who.name, source="http")
        return JSONResponse(queued.as_dict(), status_code=202)

    @app.post("/v1/models/{name}/rollback")
    async def rollback(request: Request, name: str) -> JSONResponse:
        who = caller(request, Role.ADMIN, "rolling back")
        body = await json_body(request)
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidInput("version must be a version number, e.g. {\"version\": 3}")
        queued = await call(server.service.rollback, name, version, actor=who.name, source="http:rollback")
        return JSONResponse(queued.as_dict(), status_code=202)

    @app.post("/v1/models/{name}/versions/{version}/promote")
    async def promote(request: Request, name: str, version: int) -> dict[str, Any]:
        who = caller(request, Role.ADMIN, "promoting")
        return (await call(server.service.promote, name, version, actor=who.name)).as_dict()

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: int) -> dict[str, Any]:
        who = caller(request, Role.ADMIN, "cancelling a job")
        name, _info = await call(server.service.find_job, job_id)
        return (await call(server.service.cancel, name, job_id, actor=who.name)).as_dict()

    @app.post("/v1/jobs/{job_id}/retry")
    async def retry(request: Request, job_id: int) -> JSONResponse:
        who = caller(request, Role.ADMIN, "retrying a job")
        name, _info = await call(server.service.find_job, job_id)
        queued = await call(server.service.retry, name, job_id, actor=who.name)
        return JSONResponse(queued.as_dict(), status_code=202)

    @app.post("/v1/models/{name}/ingest")
    async def ingest(request: Request, name: str) -> JSONResponse:
        """multipart: `source` (.jsonl or .csv), optional `images` (.zip or .tar[.gz]), optional `sync`."""
        who = caller(request, Role.ADMIN, "ingesting")
        fields, files = await read_body(request)
        sources = files.get("source", [])
        if len(sources) != 1:
            raise InvalidInput("send the facts as one multipart file field named 'source' (.jsonl or .csv)")
        filename = upload_name(sources[0].filename, (".jsonl", ".csv"), "source")
        source_bytes = await read_upload(sources[0], config.max_body_bytes)
        archive = files.get("images", [])
        archive_bytes = await read_upload(archive[0], config.max_body_bytes) if archive else None
        sync = str(fields.get("sync", "false")).lower() in ("1", "true", "yes", "on")

        def run() -> Any:
            with tempfile.TemporaryDirectory(prefix="kb-ingest-") as folder:
                root = Path(folder)
                if archive_bytes is not None:
                    unpack_archive(archive_bytes, archive[0].filename or "images", root)
                (root / filename).write_bytes(source_bytes)
                return server.service.ingest(name, root / filename, sync=sync, actor=who.name, origin="http",
                                             name=f"upload:{filename}")

        result = await call(run)
        return JSONResponse(result.as_dict(), status_code=202 if result.job_id is not None else 200)

    @app.get("/v1/models/{name}/versions/{version}/export")
    async def export(request: Request, name: str, version: int) -> Response:
        caller(request, Role.ADMIN, "exporting")
        bundle = await call(server.service.export, name, version)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("codebook.safetensors", bundle.codebook)
            archive.writestr("metadata.json", json.dumps(bundle.metadata, indent=2, default=str))
        filename = f"{name}-v{version}.zip"
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    # ----- request bodies ------------------------------------------------------------------
    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the request body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise InvalidInput("the request body must be a JSON object")
        return body

    async def read_body(request: Request) -> tuple[dict[str, Any], dict[str, list[UploadFile]]]:
        """(fields, files) of a JSON object or a multipart form (repeated fields become lists)."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await read_form(request, settings)
            fields: dict[str, Any] = {}
            files: dict[str, list[UploadFile]] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.setdefault(key, []).append(value)
                elif key in fields:
                    fields[key] = [*fields[key], value] if isinstance(fields[key], list) else [fields[key], value]
                else:
                    fields[key] = value
            return fields, files
        return await json_body(request), {}

    async def one_image(files: dict[str, list[UploadFile]], fields: dict[str, Any], field: str) -> bytes | None:
        uploads = files.get(field, [])
        if len(uploads) > 1:
            raise InvalidInput(f"{len(uploads)} files named {field!r}; send one")
        if uploads:
            return await read_upload(uploads[0], settings.max_image_bytes)
        text = fields.get(f"{field}_base64")
        if text is None:
            return None
        if not isinstance(text, str):
            raise InvalidInput(f"{field}_base64 must be a string")
        return decode_base64(text, f"{field}_base64")

    async def read_upload(upload: UploadFile, limit: int) -> bytes:
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"file {upload.filename!r} is over {limit:,} bytes")
        return data

    return app


def _served(server: Server, name: str) -> dict[str, Any] | None:
    host = server.hosts.get(name)
    if host is None:
        return None
    state = host.state()
    return {"loaded_version": state.loaded_version, "lag_versions": state.lag_versions,
            "lag_seconds": round(state.lag_seconds, 3), "database_ok": state.database_ok}


def _string(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise InvalidInput(f"{name} is missing (a string field)")
    return value


def _optional_string(fields: dict[str, Any], name: str) -> str | None:
    return None if fields.get(name) in (None, "") else _string(fields, name)


def _strings(fields: dict[str, Any], *names: str) -> list[str]:
    """A repeated field (multipart) or a JSON list, under any of `names`."""
    found: list[str] = []
    for name in names:
        value = fields.get(name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"{name} must hold strings")
        found.extend(values)
    return found


async def _stream(ident: str, created: int, model: str, reply: Reply, kb: dict[str, Any]) -> AsyncIterator[bytes]:
    """The answer as OpenAI's server-sent chunks: the whole text in one chunk, then the stop."""
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": reply.text},
                              "finish_reason": None}], "kb": kb},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"
