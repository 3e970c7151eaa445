"""`kbctl serve` on a tiny model: tokens and roles, the audit's actor, and every bad input refused
with one line and nothing recorded. A real uvicorn process on a loopback port."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest
import sqlalchemy as sa
from daemon_harness import KBCTL, Daemon, registered_daemon
from server_harness import Server, all_logs, chat_body, data_url, make_token

FAST = ("--hparam", "max_steps=3", "--hparam", "max_new_tokens=8", "--hparam", "max_answer_tokens=8")
Q = "what shape is it?"


def counts(d: Daemon) -> dict[str, int]:
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        found = {table: connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                 for table in ("facts", "jobs", "versions", "blobs")}
    engine.dispose()
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_assets):
    """A tiny model's installation with three tokens and a server (1 MiB body limit)."""
    home = tmp_path_factory.mktemp("served")
    d = registered_daemon(home, None, tiny_assets / "tiny", *FAST)
    refused = d.kbctl_process("serve", "--host", "0.0.0.0", "--port", "1")
    tokens = {role: make_token(d, f"{role}-bot", role) for role in ("reader", "editor", "admin")}
    server = Server(d, "--model", "tiny", "--max-body-mb", "1")
    try:
        server.start()
        yield d, server, tokens, refused
    finally:
        if server.process is not None:
            server.stop()


def test_no_token_means_no_listening_beyond_loopback(served):
    _d, _server, _tokens, refused = served
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: refusing to listen on 0.0.0.0: no API token exists yet, so no one could use the server; "
        "create one first with `kbctl token create NAME --role admin`"]


def test_roles_and_the_audit(served, tiny_assets):
    d, server, tokens, _ = served
    red = (tiny_assets / "red.png").read_bytes()
    with server.client(None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions"), ("GET", "/v1/models/tiny/versions")):
            response = anonymous.request(method, path)
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "unauthorized"
        assert anonymous.get("/v1/models", headers={"Authorization": "Bearer kb_not-a-token"}).status_code == 401
    before = counts(d)
    with server.client(tokens["reader"]) as reader:
        assert reader.get("/v1/models").json()["data"][0]["id"] == "tiny"
        response = reader.post("/v1/models/tiny/facts", files={"image": ("red.png", red, "image/png")},
                               data={"question": Q, "answer": "box"})
        assert response.status_code == 403
        assert response.json() == {"error": {"type": "forbidden", "message":
                                             "token 'reader-bot' has role reader; submitting a fact needs editor"}}
    with server.client(tokens["editor"]) as editor:
        response = editor.post("/v1/models/tiny/rollback", json={"version": 0})
        assert response.status_code == 403
        assert "rolling back needs admin" in response.json()["error"]["message"]
        assert counts(d) == before
        submitted = editor.post("/v1/models/tiny/facts", files={"image": ("red.png", red, "image/png")},
                                data={"question": Q, "answer": "box", "actor": "somebody-else"})
        assert submitted.status_code == 202, submitted.text
        fact_id = submitted.json()["fact_id"]
        job = editor.get(f"/v1/jobs/{submitted.json()['job_id']}").json()
        assert (job["status"], job["actor"], job["model"]) == ("queued", "editor-bot", "tiny")
        fact = editor.get(f"/v1/models/tiny/facts/{fact_id}").json()
        assert (fact["actor"], fact["source"]) == ("editor-bot", "http")  # the token's name, not a claimed one
        assert editor.post(f"/v1/jobs/{job['id']}/cancel").status_code == 403
    with server.client(tokens["admin"]) as admin:
        cancelled = admin.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.json() == {"job_id": job["id"], "status": "cancelled"}
        assert d.kbctl("jobs", "--json")[0]["error"] == "cancelled by admin-bot"
    d.kbctl("token", "revoke", "editor-bot")
    with server.client(tokens["editor"]) as revoked:
        response = revoked.get("/v1/models")
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "unknown or revoked token"
    text = all_logs(d.home) + json.dumps(d.kbctl("token", "list", "--json"))
    assert server.log()  # the server did log (startup, requests)
    for token in tokens.values():
        assert token not in text


def test_bad_inputs_are_one_line_and_record_nothing(served, tiny_assets):
    d, server, tokens, _ = served
    red = (tiny_assets / "red.png").read_bytes()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'
    big = b"\x89PNG" + b"0" * (1024 * 1024)
    before = counts(d)

    def chat(content):
        return {"model": "tiny", "messages": [{"role": "user", "content": content}]}

    text = {"type": "text", "text": Q}
    cases = [
        ("POST", "/v1/chat/completions", {"json": chat([text, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64,%%%"}}])}, 400, "content part 1 image_url is not valid base64"),
        ("POST", "/v1/chat/completions", {"json": chat([text, {"type": "image_url", "image_url": {
            "url": data_url(b"hello, not an image")}}])}, 400, "image 'image' is not a readable image"),
        ("POST", "/v1/chat/completions", {"json": chat([text, {"type": "image_url", "image_url": {
            "url": data_url(svg, "image/svg+xml")}}])}, 400,
         "content part 1 image_url is image/svg+xml; use image/png, image/jpeg, image/gif, image/webp or image/bmp"),
        ("POST", "/v1/chat/completions", {"json": chat([text, {"type": "image_url", "image_url": {
            "url": data_url(svg)}}])}, 400, "image 'image' is not a readable image"),
        ("POST", "/v1/chat/completions", {"json": chat([text, {"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}])}, 400, "content part 1 image_url must be a data URL"),
        ("POST", "/v1/chat/completions", {"json": chat([text] + [{"type": "image_url", "image_url": {
            "url": data_url(red)}}] * 2)}, 400, "2 images in one message; the model answers about one image"),
        ("POST", "/v1/chat/completions", {"json": chat_body("nosuch", Q, red)}, 404,
         "model 'nosuch' is not served here (served: tiny)"),
        ("POST", "/v1/chat/completions", {"json": chat_body("tiny@99", Q, red)}, 404,
         "model 'tiny' has no version 99 (versions 0..0)"),
        ("POST", "/v1/chat/completions", {"json": chat_body("tiny@x", Q, red)}, 400,
         "model 'tiny@x': the version after '@' must be a number"),
        ("POST", "/v1/chat/completions", {"json": chat([text])}, 400,
         "model 'tiny' answers questions about an image; send one"),
        ("POST", "/v1/chat/completions", {"content": b"{not json"}, 400, "the request body is not valid JSON"),
        ("POST", "/v1/chat/completions", {"content": big, "headers": {"Content-Type": "application/json"}}, 413,
         "request body over 1,048,576 bytes"),
        ("POST", "/v1/models/tiny/facts", {"files": {"image": ("x.png", b"GIF89a-broken", "image/png")},
                                           "data": {"question": Q, "answer": "box"}}, 400,
         "image 'image' is not a readable image"),
        ("POST", "/v1/models/tiny/facts", {"files": {"image": ("x.png", red, "image/png")},
                                           "data": {"question": Q, "answer": "a " * 40}}, 400,
         "answer is 80 tokens long; model tiny allows 8"),
        ("POST", "/v1/models/tiny/facts", {"files": {"image": ("x.png", red, "image/png")},
                                           "data": {"answer": "box"}}, 400, "question is missing"),
        ("POST", "/v1/models/tiny/facts", {"json": {"question": Q, "answer": "box", "image_base64": "@@"}}, 400,
         "image_base64 is not valid base64"),
        ("POST", "/v1/models/tiny/facts", {"files": {"image": ("x.png", red, "image/png"),
                                                     "negative_image": ("n.png", svg, "image/png")},
                                           "data": {"question": Q, "answer": "box"}}, 400,
         "image 'negative image 1' is not a readable image"),
        ("POST", "/v1/models/tiny/facts/f-nosuch/retract", {}, 404, "model 'tiny' has no fact 'f-nosuch'"),
        ("POST", "/v1/models/tiny/rollback", {"json": {"version": 99}}, 404, "model 'tiny' has no version 99"),
        ("POST", "/v1/models/tiny/rollback", {"json": {"version": "one"}}, 400, "version must be a version number"),
        ("POST", "/v1/models/tiny/ingest", {"files": {"source": ("facts.txt", b"{}", "text/plain")}}, 400,
         "source must be a file named *.jsonl or *.csv"),
        ("POST", "/v1/models/tiny/ingest", {"files": {"source": ("facts.jsonl", b'{"key": "k"}\n', "text/plain")}},
         400, "facts.jsonl:1"),
        ("POST", "/v1/models/tiny/ingest", {"files": {"source": ("facts.jsonl", b"", "text/plain"),
                                                      "images": ("i.zip", _zip({"../evil.png": red}), "x")}}, 400,
         "member path '../evil.png' leaves the archive's folder"),
        ("POST", "/v1/models/tiny/ingest", {"files": {"source": ("facts.jsonl", b"", "text/plain"),
                                                      "images": ("i.tar", _tar_with_link(), "x")}}, 400,
         "is a link or device"),
        ("GET", "/v1/jobs/999", {}, 404, "job 999"),
        ("GET", "/v1/nothing-here", {}, 404, "Not Found: GET /v1/nothing-here"),
    ]
    with server.client(tokens["admin"]) as admin:
        for method, path, kwargs, status, message in cases:
            response = admin.request(method, path, **kwargs)
            assert response.status_code == status, (path, message, response.text)
            error = response.json()["error"]
            assert message in error["message"], (message, error)
            assert "\n" not in error["message"]
    assert counts(d) == before


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar_with_link() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        link = tarfile.TarInfo("red.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


def test_kbctl_serve_help_teaches():
    import subprocess

    out = subprocess.run([*KBCTL, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Example:" in out and "Authorization: Bearer" in out and "--max-batch" in out


def test_every_admin_use_case_over_http(served, tiny_assets):
    """Ingest (an uploaded source and image archive), the native answer route, streaming chat, and
    the reading routes: each answers with the service's own JSON."""
    import openai

    d, server, tokens, _ = served
    red, green = ((tiny_assets / f"{name}.png").read_bytes() for name in ("red", "green"))
    source = "".join(json.dumps(line) + "\n" for line in (
        {"key": "k1", "image": "img/red.png", "question": Q, "answer": "box"},
        {"key": "k2", "image": "img/green.png", "question": Q, "answer": "disc"}))
    with server.client(tokens["admin"]) as admin:
        queued = admin.post("/v1/models/tiny/ingest", data={"sync": "true"},
                            files={"source": ("nightly.jsonl", source.encode(), "application/jsonl"),
                                   "images": ("images.zip", _zip({"img/red.png": red, "img/green.png": green}), "x")})
        assert queued.status_code == 202, queued.text
        result = queued.json()
        assert (result["new"], result["source"]) == (2, "upload:nightly.jsonl")
        job = admin.get(f"/v1/jobs/{result['job_id']}").json()
        assert (job["kind"], job["actor"], job["source"]) == ("batch", "admin-bot", "http:upload:nightly.jsonl")
        again = admin.post("/v1/models/tiny/ingest", files={
            "source": ("nightly.jsonl", source.encode(), "x"),
            "images": ("images.tar", _tar({"img/red.png": red, "img/green.png": green}), "x")}).json()
        assert (again["job_id"], again["new"], again["unchanged"]) == (None, 0, 2)  # pending facts are known
        assert admin.post(f"/v1/jobs/{result['job_id']}/cancel").json()["status"] == "cancelled"
        retried = admin.post(f"/v1/jobs/{result['job_id']}/retry")
        assert retried.status_code == 202 and retried.json()["job_id"] > result["job_id"]

        answered = admin.post("/v1/models/tiny/answer", json={"question": Q, "image_base64": _b64(red)})
        assert answered.status_code == 200, answered.text
        assert answered.json()["version"] == 0 and answered.headers["X-KB-Version"] == "0"
        pinned = admin.post("/v1/models/tiny/answer", data={"question": Q, "version": "0"},
                            files={"image": ("red.png", red, "image/png")}).json()
        assert pinned["answer"] == answered.json()["answer"]

        status = admin.get("/v1/models/tiny/status").json()
        assert status["queue_depth"] >= 1 and status["served"]["loaded_version"] == 0
        assert admin.get("/v1/models/tiny/versions/0").json()["kind"] == "init"
        assert admin.get("/v1/models/tiny/diff", params={"first": 0, "second": 0}).json()["added"] == []
        assert [j["kind"] for j in admin.get("/v1/models/tiny/jobs").json()["jobs"]][:2] == ["batch", "batch"]
        promoted = admin.post("/v1/models/tiny/versions/0/promote")
        assert promoted.status_code == 409 and "is not held" in promoted.json()["error"]["message"]
        exported = admin.get("/v1/models/tiny/versions/0/export")
        assert exported.headers["content-type"] == "application/zip", exported.text
        with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
            assert sorted(archive.namelist()) == ["codebook.safetensors", "metadata.json"]
            assert json.loads(archive.read("metadata.json"))["model"] == "tiny"
        metrics = admin.get("/metrics").text
        assert "kb_http_requests_total" in metrics and 'kb_batch_size_count{model="tiny"}' in metrics
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tokens["reader"], max_retries=0)
    body = chat_body("tiny", Q, red)
    chunks = list(client.chat.completions.create(model="tiny", messages=body["messages"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answered.json()["answer"]
    assert [m.id for m in client.models.list()] == ["tiny"]


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
