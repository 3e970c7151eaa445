"""The console's rules in process (the ASGI app, a tiny model, no worker): sessions, CSRF on every
form, role gates on every action, escaping of stored text, and images only of the model's facts."""

from __future__ import annotations

import re

import pytest
from daemon_harness import registered_daemon
from server_harness import make_token

FAST = ("--hparam", "max_steps=3", "--hparam", "max_new_tokens=8", "--hparam", "max_answer_tokens=8")
Q = "what shape is it?"


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_assets):
    from fastapi.testclient import TestClient

    from kb_daemon.config import Settings
    from kb_daemon.server.app import ServerConfig, create_app

    d = registered_daemon(tmp_path_factory.mktemp("console-pages") / "home", None, tiny_assets / "tiny", *FAST)
    tokens = {role: make_token(d, f"{role}-pages", role) for role in ("reader", "editor", "admin")}
    evil = d.kbctl("submit-fact", "--image", str(tiny_assets / "red.png"), "--question", "<script>alert(1)</script>?",
                   "--answer", "box", "--json")
    app = create_app(Settings.from_env(d.env), ServerConfig(models=("tiny",)))
    with TestClient(app) as client:
        yield d, client, tokens, evil, app


def log_in(client, token: str) -> str:
    """Log `client` in; return the session's CSRF value."""
    client.cookies.clear()
    form = client.get("/ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    response = client.post("/ui/login", data={"token": token, "csrf": csrf}, follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/ui/"), response.text
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and token not in cookie
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/").text).group(1)


def test_sessions(console):
    d, client, tokens, _evil, _app = console
    client.cookies.clear()
    assert client.get("/ui/models/tiny/versions", follow_redirects=False).headers["location"] == "/ui/login"
    form = client.get("/ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    refused = client.post("/ui/login", data={"token": "kb_wrong", "csrf": csrf})
    assert refused.status_code == 401 and "unknown or revoked token" in refused.text
    no_csrf = client.post("/ui/login", data={"token": tokens["reader"], "csrf": "x"})
    assert no_csrf.status_code == 403
    log_in(client, tokens["reader"])
    assert client.get("/ui/").status_code == 200
    value = client.cookies.get("kb_session")
    client.cookies.clear()
    client.cookies.set("kb_session", value[:-1] + ("0" if value[-1] != "0" else "1"))
    assert client.get("/ui/", follow_redirects=False).status_code == 303  # a tampered cookie is no session
    csrf = log_in(client, tokens["reader"])
    assert client.post("/ui/logout", data={"csrf": "forged"}).status_code == 403
    assert client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False).headers["location"] == "/ui/login"
    temporary = make_token(d, "short-lived", "reader")
    log_in(client, temporary)
    d.kbctl("token", "revoke", "short-lived")
    assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui/login"  # revoking ends it


def test_pages_escape_and_show_what_a_role_may_do(console, tiny_assets):
    _d, client, tokens, evil, _app = console
    pages = ["/ui/", "/ui/models/tiny/versions", "/ui/models/tiny/versions/0", "/ui/models/tiny/jobs",
             f"/ui/models/tiny/jobs/{evil['job_id']}", f"/ui/models/tiny/facts/{evil['fact_id']}",
             "/ui/models/tiny/try", f"/ui/models/tiny/try?fact={evil['fact_id']}"]
    for role, actions in (("reader", set()), ("editor", {"Submit a fact"}), ("admin", {"Submit a fact"})):
        log_in(client, tokens[role])
        for path in pages:
            response = client.get(path)
            assert response.status_code == 200, (role, path, response.text[-300:])
            assert "<script>alert" not in response.text
            assert tokens[role] not in response.text
            assert ("Submit a fact" in response.text) == ("Submit a fact" in actions) or path == "/ui/"
        fact = client.get(f"/ui/models/tiny/facts/{evil['fact_id']}").text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;?" in fact
        image = re.search(r"images/([0-9a-f]{64})", fact).group(1)
        assert client.get(f"/ui/models/tiny/images/{image}").headers["content-type"] == "image/png"
        assert client.get(f"/ui/models/tiny/images/{'0' * 64}").status_code == 404


@pytest.mark.parametrize("path, role", [
    ("/ui/models/tiny/submit", "editor"),
    ("/ui/models/tiny/rollback?version=0", "admin"),
    ("/ui/models/tiny/versions/0/promote", "admin"),
])
def test_action_pages_are_role_gated(console, path, role):
    _d, client, tokens, _evil, _app = console
    log_in(client, tokens["reader"])
    response = client.get(path)
    assert response.status_code == 403 and f"needs {role}" in response.text
    if role == "admin":
        log_in(client, tokens["editor"])
        assert client.get(path).status_code == 403


def test_every_form_needs_its_csrf_and_its_role(console, tiny_assets):
    d, client, tokens, evil, _app = console
    red = (tiny_assets / "red.png").read_bytes()
    before = len(d.kbctl("jobs", "--json", "--limit", "100"))
    posts = [
        ("/ui/models/tiny/submit", {"question": Q, "answer": "x"}, {"image": ("r.png", red, "image/png")}, "editor"),
        (f"/ui/models/tiny/facts/{evil['fact_id']}/retract", {}, None, "editor"),
        ("/ui/models/tiny/rollback", {"version": "0"}, None, "admin"),
        ("/ui/models/tiny/versions/0/promote", {}, None, "admin"),
    ]
    for path, data, files, role in posts:
        csrf = log_in(client, tokens["reader"])
        assert client.post(path, data={**data, "csrf": csrf}, files=files).status_code == 403, path  # the role
        csrf = log_in(client, tokens[role])
        assert client.post(path, data={**data, "csrf": "forged"}, files=files).status_code == 403, path  # CSRF
        assert client.post(path, data=data, files=files).status_code == 403, path  # no CSRF at all
    assert len(d.kbctl("jobs", "--json", "--limit", "100")) == before
    csrf = log_in(client, tokens["editor"])
    done = client.post("/ui/models/tiny/submit", data={"csrf": csrf, "question": Q, "answer": "box",
                                                       "rephrases": "which shape?\nshape?"},
                       files={"image": ("r.png", red, "image/png")}, follow_redirects=False)
    assert done.status_code == 303 and re.fullmatch(r"/ui/models/tiny/jobs/\d+", done.headers["location"])
    job = d.kbctl("jobs", "--json")[0]
    assert (job["actor"], job["source"]) == ("editor-pages", "ui")
    tried = client.post("/ui/models/tiny/try", data={"csrf": csrf, "question": Q},
                        files={"image": ("r.png", red, "image/png")})
    assert tried.status_code == 200 and 'id="answer"' in tried.text and 'id="unedited"' in tried.text


def test_eval_reports_are_charted(console):
    import json

    d, client, tokens, _evil, _app = console
    folder = d.home / "eval"
    folder.mkdir(exist_ok=True)
    curve = [{"edits": n, "exact": {"acc": 100.0, "t_gen": 90.0 - n, "i_gen": None, "loc": 95.0, "hm": 80.0 + n},
              "token": {}} for n in (2, 4, 8)]
    (folder / "balancedit.json").write_text(json.dumps({"mode": "sequential", "hparams": {"method": "balancedit"},
                                                        "num_cases": 8, "exact": {"hm": 88.0}, "curve": curve}))
    (folder / "notes.json").write_text("[1, 2]")
    log_in(client, tokens["reader"])
    page = client.get("/ui/eval").text
    assert "balancedit, sequential, 8 cases: hm 88.0" in page
    assert page.count("<svg") == 4  # Acc, T-Gen, Loc, HM: I-Gen has no points
    assert 'aria-label="T-Gen, from 0 to 88 %"' in page
    assert "notes.json" in page and "not a kbctl eval report" in page


def test_a_held_batch_shows_its_canaries_and_can_be_promoted(console):
    import sqlalchemy as sa

    from kb_daemon.models import Version

    d, client, tokens, _evil, _app = console
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with sa.orm.Session(engine) as session:
        model_id = session.execute(sa.text("SELECT id FROM models WHERE name = 'tiny'")).scalar_one()
        number = session.execute(sa.text("SELECT MAX(number) FROM versions WHERE model_id = :m"),
                                 {"m": model_id}).scalar_one() + 1
        canaries = {"total": 2, "changed": 1,
                    "broken": [{"image": "canary/red.png", "question": Q, "before": "square", "after": "box"}]}
        session.add(Version(model_id=model_id, number=number, parent=0, kind="batch", held=True,
                            summary={"added": [], "removed": [], "canaries": canaries}, content_sha256="0" * 64,
                            num_entries=0, actor="nightly", source="test"))
        session.commit()
    engine.dispose()
    log_in(client, tokens["admin"])
    assert f"v{number} (held)" in client.get("/ui/").text
    page = client.get(f"/ui/models/tiny/versions/{number}").text
    assert "Canary inputs whose answers change (1 of 2)" in page
    assert "<td>square</td><td>box</td>" in page
    assert f"Promote v{number}" in page
    log_in(client, tokens["editor"])
    assert "Promote v" not in client.get(f"/ui/models/tiny/versions/{number}").text


def test_the_console_and_the_api_take_forms_of_the_same_size(console, tiny_assets):
    from kb_daemon.config import Settings

    d, client, tokens, _evil, _app = console
    settings = Settings.from_env(d.env)
    limit = 4 + 2 * (settings.max_rephrases_per_fact + settings.max_negatives_per_fact)
    red = ("r.png", (tiny_assets / "red.png").read_bytes(), "image/png")
    fields = {"question": Q, "answer": "box", **{f"extra{i}": "x" for i in range(limit)}}  # limit + 2 fields
    before = len(d.kbctl("jobs", "--json", "--limit", "100"))
    csrf = log_in(client, tokens["editor"])
    page = client.post("/ui/models/tiny/submit", data={**fields, "csrf": csrf}, files={"image": red})
    assert page.status_code == 400 and f"Too many fields. Maximum number of fields is {limit}." in page.text
    api = client.post("/v1/models/tiny/facts", data=fields, files={"image": red},
                      headers={"Authorization": f"Bearer {tokens['editor']}"})
    assert api.status_code == 400, api.text
    assert api.json()["error"]["message"] == f"Too many fields. Maximum number of fields is {limit}."
    assert len(d.kbctl("jobs", "--json", "--limit", "100")) == before
