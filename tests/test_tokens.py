"""API tokens (`kbctl token`, kb_daemon.tokens) on SQLite and PostgreSQL: created once and shown once,
stored only as a hash, listed without their text, revoked for good; roles ordered reader < editor <
admin; migration 0004 adds the table to an existing database."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa
from daemon_harness import Daemon

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.models import Role
from kb_daemon.queue import default_actor

TOKEN_SHAPE = re.compile(r"kb_[A-Za-z0-9_-]{43}")  # "kb_" + token_urlsafe(32)
SHOWN_ONCE = ("token {name} ({role}) created; it is shown only this once: store it in a secret manager and "
              "send it as `Authorization: Bearer <token>`\n")


@pytest.fixture
def daemon(tmp_path, database_url):
    d = Daemon(tmp_path / "home", database_url)
    d.kbctl("init")
    return d


@pytest.fixture
def db(daemon):
    database = Database(Settings.from_env(daemon.env))
    yield database
    database.dispose()


def token_rows(d: Daemon) -> list[dict]:
    """Every column of every api_tokens row, as stored."""
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        rows = [dict(r) for r in connection.execute(sa.text("SELECT * FROM api_tokens ORDER BY id")).mappings()]
    engine.dispose()
    return rows


def test_create_list_revoke_through_kbctl(daemon, db):
    from kb_daemon.tokens import Identity, authenticate, has_active_tokens

    d = daemon
    assert d.kbctl("token", "list", "--json") == []
    assert not has_active_tokens(db)

    # Text output: the token alone on stdout, the note on stderr.
    result = d.kbctl("token", "create", "ci-bot", "--role", "editor", "--actor", "alice")
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and TOKEN_SHAPE.fullmatch(token), result.stdout
    assert result.stderr == SHOWN_ONCE.format(name="ci-bot", role="editor")
    assert authenticate(db, token) == Identity("ci-bot", Role.EDITOR)
    assert has_active_tokens(db)

    created = d.kbctl("token", "create", "ops@example.org", "--role", "admin", "--json")
    assert set(created) == {"name", "role", "token", "created_at"}
    assert (created["name"], created["role"]) == ("ops@example.org", "admin")
    assert TOKEN_SHAPE.fullmatch(created["token"]) and created["token"] != token
    assert authenticate(db, created["token"]) == Identity("ops@example.org", Role.ADMIN)

    listed = d.kbctl("token", "list", "--json")
    assert [(t["name"], t["role"], t["created_by"], t["active"], t["revoked_at"]) for t in listed] == [
        ("ci-bot", "editor", "alice", True, None), ("ops@example.org", "admin", default_actor(), True, None)]
    assert all(set(t) == {"name", "role", "created_at", "created_by", "revoked_at", "revoked_by",
                          "last_used_at", "active"} for t in listed)
    text = d.kbctl("token", "list").stdout
    for shown in (json.dumps(listed), text):
        assert token not in shown and created["token"] not in shown
    assert [line.split()[:3] for line in text.splitlines()] == [["ci-bot", "editor", "active"],
                                                                ["ops@example.org", "admin", "active"]]

    revoked = d.kbctl("token", "revoke", "ci-bot", "--actor", "bob", "--json")
    assert (revoked["name"], revoked["active"], revoked["revoked_by"]) == ("ci-bot", False, "bob")
    assert authenticate(db, token) is None
    assert authenticate(db, created["token"]) == Identity("ops@example.org", Role.ADMIN)
    # Revoking again changes nothing and says who revoked it first.
    again = d.kbctl("token", "revoke", "ci-bot", "--actor", "carol", "--json")
    assert again == revoked
    assert d.kbctl("token", "revoke", "ci-bot").stdout.startswith("token ci-bot revoked ")
    assert d.kbctl("token", "revoke", "ci-bot").stdout.rstrip().endswith(" by bob")
    assert [t["active"] for t in d.kbctl("token", "list", "--json")] == [False, True]
    assert "revoked" in d.kbctl("token", "list").stdout.splitlines()[0]

    d.kbctl("token", "revoke", "ops@example.org")
    assert not has_active_tokens(db)


@pytest.mark.parametrize(("args", "error"), [
    (("create", "ci-bot", "--role", "editor"),
     "a token named 'ci-bot' already exists (created by alice); choose another name"),
    (("create", "old-bot", "--role", "reader"),
     "the name 'old-bot' belongs to a token revoked by alice; a name is the audit's actor and is never "
     "reused, so choose another name"),
    (("create", "root-bot", "--role", "root"), "role must be one of reader, editor, admin, got 'root'"),
    (("create", "Editor-bot", "--role", "Editor"), "role must be one of reader, editor, admin, got 'Editor'"),
    (("create", "ci bot", "--role", "reader"),
     "token name must be 1 to 100 letters, digits or . _ @ - (it becomes the actor in the audit), got 'ci bot'"),
    (("create", "", "--role", "reader"),
     "token name must be 1 to 100 letters, digits or . _ @ - (it becomes the actor in the audit), got ''"),
    (("create", "x" * 101, "--role", "reader"),
     f"token name must be 1 to 100 letters, digits or . _ @ - (it becomes the actor in the audit), got '{'x' * 101}'"),
    (("revoke", "nobody"), "no token named 'nobody'; `kbctl token list` shows the tokens"),
])
def test_refusals_are_one_line_and_change_nothing(daemon, args, error):
    d = daemon
    d.kbctl("token", "create", "ci-bot", "--role", "editor", "--actor", "alice")
    d.kbctl("token", "create", "old-bot", "--role", "admin", "--actor", "alice")
    d.kbctl("token", "revoke", "old-bot", "--actor", "alice")
    before = token_rows(d)
    result = d.kbctl("token", *args, expect=1)
    assert (result.stdout, result.stderr) == ("", f"Error: {error}\n")
    assert token_rows(d) == before


def test_a_name_taken_between_look_up_and_insert_is_a_conflict(daemon, db, monkeypatch):
    """Two concurrent creates of one name: the unique constraint refuses the second one."""
    import kb_daemon.tokens
    from kb_daemon.errors import Conflict

    kb_daemon.tokens.create_token(db, "ci-bot", "reader", actor="alice")
    before = token_rows(daemon)
    monkeypatch.setattr(kb_daemon.tokens, "_find", lambda session, name: None)
    with pytest.raises(Conflict, match="^a token named 'ci-bot' already exists; choose another name$"):
        kb_daemon.tokens.create_token(db, "ci-bot", "admin", actor="mallory")
    assert token_rows(daemon) == before


def test_authenticate_accepts_only_an_active_tokens_exact_text(daemon, db):
    from kb_daemon.tokens import Identity, authenticate, create_token, revoke_token

    token = create_token(db, "reader-1", Role.READER, actor="alice").token
    revoked = create_token(db, "gone", "admin", actor="alice").token
    revoke_token(db, "gone", actor="alice")
    assert authenticate(db, token) == Identity("reader-1", Role.READER)
    assert authenticate(db, revoked) is None
    for wrong in ("", None, "kb_", token[:-1], token + "x", token.upper(), f" {token}", "x" * 10_000,
                  hashlib.sha256(token.encode()).hexdigest()):  # the stored hash is no credential either
        assert authenticate(db, wrong) is None, wrong


def test_last_used_moves_at_most_once_a_minute(daemon, db, monkeypatch):
    import kb_daemon.tokens
    from kb_daemon.tokens import authenticate, create_token

    token = create_token(db, "busy", "reader", actor="alice").token
    assert token_rows(daemon)[0]["last_used_at"] is None
    start = kb_daemon.tokens.utcnow()
    clock = iter([start, start + timedelta(seconds=59), start + timedelta(seconds=61)])
    monkeypatch.setattr(kb_daemon.tokens, "utcnow", lambda: next(clock))
    seen = []
    for _ in range(3):
        assert authenticate(db, token) is not None
        (info,) = kb_daemon.tokens.list_tokens(db)
        seen.append(info.last_used_at)
    assert seen == [start, start, start + timedelta(seconds=61)]


def test_the_database_holds_no_token_text(daemon, db):
    from kb_daemon.tokens import create_token, revoke_token

    tokens = [create_token(db, f"t{i}", role, actor="alice").token for i, role in enumerate(Role)]
    revoke_token(db, "t0", actor="alice")
    rows = token_rows(daemon)
    assert [r["token_sha256"] for r in rows] == [hashlib.sha256(t.encode()).hexdigest() for t in tokens]
    for row in rows:
        for column, value in row.items():
            for token in tokens:
                assert token not in str(value) and token[3:] not in str(value), column
    if daemon.env["KB_DATABASE_URL"].startswith("sqlite"):  # the file itself, write-ahead log included
        data = b"".join(p.read_bytes() for p in daemon.home.glob("kb.sqlite3*"))
        assert data and not [t for t in tokens if t[3:].encode() in data]


ORDER = [Role.READER, Role.EDITOR, Role.ADMIN]


@pytest.mark.parametrize("held", ORDER)
@pytest.mark.parametrize("needed", ORDER)
def test_role_allows_itself_and_every_role_below(held, needed):
    assert held.allows(needed) is (ORDER.index(held) >= ORDER.index(needed))
    assert held.allows(needed.value) is held.allows(needed)


def test_upgrade_from_0003_adds_the_token_table_and_keeps_the_data(daemon, db):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from kb_daemon.db import SCHEMA_REVISION, include_name
    from kb_daemon.models import Base

    d = daemon
    models_before = d.kbctl("model", "list", "--json")
    command.downgrade(db.alembic_config(), "0003")
    assert db.current_revision() == "0003"
    assert "api_tokens" not in sa.inspect(db.engine).get_table_names()
    assert d.kbctl("token", "list", expect=1).stderr == (
        f"Error: database schema is at revision 0003, this code needs {SCHEMA_REVISION}; run `kbctl db upgrade`\n")

    assert d.kbctl("db", "upgrade", "--json") == {"from": "0003", "to": SCHEMA_REVISION}
    assert d.kbctl("model", "list", "--json") == models_before
    created = d.kbctl("token", "create", "after-upgrade", "--role", "reader", "--json")
    assert [t["name"] for t in d.kbctl("token", "list", "--json")] == ["after-upgrade"]
    assert created["name"] == "after-upgrade"
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_name": include_name,
                                                               "compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
