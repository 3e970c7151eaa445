"""The audit trail: every change records who made it and from where, `kbctl history` shows it, and
no kbctl command can edit or delete what is already recorded.

The command set is enumerated from the Click group, so a new command or option fails
`test_kbctl_offers_no_way_to_edit_or_delete_history` until it is reviewed and added to COMMANDS.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import click
import pytest
import sqlalchemy as sa
from daemon_harness import Daemon
from server_harness import Server, make_token
from tiny_models import image, save

from kb_daemon.cli import cli

Q = "what shape is it?"
FAST = ("--hparam", "max_steps=3", "--hparam", "max_new_tokens=8", "--hparam", "max_answer_tokens=8")

# Every kbctl command with its options and what it may do to the database. "writes" commands only
# ever add rows (facts, jobs, versions, a model) or move the head; "daemon" commands run the worker
# that turns queued jobs into new versions, or beat, which schedules the reaper and the nightly
# ingestion (the test below starts each and checks what it did); "reads" commands change nothing.
MODEL = {"--model"}  # model-scoped commands take --model after the command name too
COMMANDS: dict[str, tuple[str, set[str]]] = {
    "init": ("writes", {"--json"}),
    "db upgrade": ("writes", {"--json"}),
    "model add": ("writes", {"--actor", "--canary", "--canary-max-changed", "--hparam", "--ingest-source",
                             "--json", "--layer", "--reference-pool"}),
    "model set": ("writes", {"--actor", "--canary", "--canary-max-changed", "--hparam", "--ingest-source",
                             "--json", "--reference-pool"}),
    "submit-fact": ("writes", {"--actor", "--answer", "--image", "--json", "--negative-image",
                               "--negative-question", "--question", "--rephrase", "--supersedes", "--timeout",
                               "--wait", *MODEL}),
    "retract": ("writes", {"--actor", "--json", "--timeout", "--wait", *MODEL}),
    "rollback": ("writes", {"--actor", "--json", "--timeout", "--wait", *MODEL}),
    "promote": ("writes", {"--actor", "--json", *MODEL}),
    "cancel": ("writes", {"--actor", "--json", "--timeout", "--wait", *MODEL}),
    "retry": ("writes", {"--actor", "--json", "--timeout", "--wait", *MODEL}),
    "ingest": ("writes", {"--actor", "--json", "--sync", "--timeout", "--wait", *MODEL}),
    # API tokens: a token's row is added, and revoking sets when and by whom; the row stays.
    "token create": ("writes", {"--actor", "--json", "--role"}),
    "token revoke": ("writes", {"--actor", "--json"}),
    "worker": ("daemon", {"--loglevel", *MODEL}),
    "up": ("daemon", {"--loglevel", "--port", "--serve", *MODEL}),
    # Changes only through the service methods the commands above use, as its tokens' names.
    "serve": ("daemon", {"--cached-versions", "--host", "--loglevel", "--max-batch", "--max-body-mb", "--model",
                         "--poll-seconds", "--port", "--stop-with-parent"}),
    "beat": ("daemon", {"--loglevel"}),
    "model list": ("reads", {"--json"}),
    "ask": ("reads", {"--image", "--json", "--question", "--version", *MODEL}),
    "jobs": ("reads", {"--follow", "--interval", "--json", "--limit", *MODEL}),
    "wait": ("reads", {"--json", "--timeout"}),
    "status": ("reads", {"--json", *MODEL}),
    "history": ("reads", {"--json", "--limit", *MODEL}),
    "show": ("reads", {"--json", *MODEL}),
    "fact": ("reads", {"--json", *MODEL}),
    "diff": ("reads", {"--json", *MODEL}),
    "export": ("reads", {"--json", *MODEL}),  # writes files outside the database
    "token list": ("reads", {"--json"}),
    # No database at all: an in-process demo, and the benchmark evaluation.
    "demo": ("none", {"--answer"}),
    "eval": ("none", {"--curve-every", "--hparam", "--json", "--limit", "--method", "--model", "--plot",
                      "--pool", "--sequential"}),
    "eval-stream": ("none", {"--hparam", "--json", "--model", "--plot", "--pool"}),
}
GLOBAL_OPTIONS = {"--broker-url", "--database-url", "--debug", "--home", "--model", "--verbose", "--version",
                  "-v"}
# Words that would name a way to rewrite the record.
FORBIDDEN = ("edit", "delete", "remove", "purge", "prune", "drop", "truncate", "amend", "squash", "rewrite",
             "vacuum", "gc", "rename")


def kbctl_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every leaf command of kbctl, by its full name ("model add")."""
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(kbctl_commands(command, (*prefix, name)))
        else:
            found[" ".join((*prefix, name))] = command
    return found


def options_of(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)
            if opt.startswith("-")}


def test_kbctl_offers_no_way_to_edit_or_delete_history():
    commands = kbctl_commands()
    # A new command (or option) must be reviewed here: can it rewrite versions or the ledger?
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        assert options_of(command) == COMMANDS[name][1], f"options of kbctl {name} changed; review them"
        words = [name, *options_of(command)]
        assert not [w for w in words for bad in FORBIDDEN if bad in w.split(" ")[-1].strip("-").split("-")]
    assert options_of(cli) == GLOBAL_OPTIONS


def audit_rows(url: str) -> dict[str, dict]:
    """The recorded history, column for column: versions, facts' provenance, entries, spans, jobs."""
    engine = sa.create_engine(url)
    queries = {
        "versions": "SELECT id, model_id, number, parent, kind, summary, content_sha256, num_entries, held, "
                    "actor, source, job_id, created_at FROM versions",
        "facts": "SELECT id, model_id, key, image_sha256, question, answer, rephrases, negatives, source, "
                 "actor, submitted_at FROM facts",
        "entries": "SELECT id, model_id, fact_id, blob_sha256, answer, input_id, base_radius FROM entries",
        # A later version may close a span (set to_version); where it opened never changes.
        "spans": "SELECT id, model_id, entry_id, from_version FROM entry_spans",
        "jobs": "SELECT id, model_id, seq, kind, payload, actor, source, created_at FROM jobs",
        "blobs": "SELECT sha256, kind, size, data FROM blobs",
    }
    with engine.connect() as connection:
        rows = {name: {row[0]: tuple(row) for row in connection.execute(sa.text(sql))}
                for name, sql in queries.items()}
    engine.dispose()
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    save("llava-llama", root / "model")
    for i in range(4):
        image((40 * i, 220 - 40 * i, 80), "circle" if i % 2 else "square").save(root / f"img{i}.png")
    return root


def write_source(folder: Path, assets: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        (folder / row["image"]).write_bytes((assets / row["image"]).read_bytes())
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def consumed_messages(d: Daemon) -> set[int]:
    """Ids of the broker messages a worker has taken (kept, invisible, until the reaper deletes them)."""
    engine = sa.create_engine(d.env["KB_BROKER_URL"].removeprefix("sqla+"))
    with engine.connect() as connection:
        ids = {row[0] for row in connection.execute(sa.text("SELECT id FROM kombu_message WHERE NOT visible"))}
    engine.dispose()
    return ids


@pytest.mark.slow
def test_every_state_changing_command_leaves_recorded_history_untouched(tmp_path, assets):
    d = Daemon(tmp_path / "home")
    # Model gated runs under `kbctl up` (worker and embedded beat) from a home of its own, so that its
    # beat's schedule file is not the one `kbctl beat` of model tiny keeps; database and broker are shared.
    gated = Daemon(tmp_path / "gated-home", model="gated")
    gated.env.update(KB_DATABASE_URL=d.env["KB_DATABASE_URL"], KB_BROKER_URL=d.env["KB_BROKER_URL"])
    url = d.env["KB_DATABASE_URL"]
    exercised: set[str] = set()

    def run(daemon: Daemon, *args: str, expect: int = 0):
        name = args[0] if args[0] not in ("model", "db", "token") else " ".join(args[:2])
        exercised.add(name)
        return daemon.kbctl(*args, expect=expect)

    def start(daemon: Daemon, command: str) -> None:
        exercised.add(command)
        daemon.start_worker(command)

    run(d, "init")
    run(d, "model", "add", "tiny", str(assets / "model"), *FAST, "--actor", "alice")
    start(d, "worker")  # no beat yet
    try:
        # Some history to protect: two edits, a batch.
        first = run(d, "submit-fact", "--image", str(assets / "img0.png"), "--question", Q, "--answer", "a0",
                    "--actor", "alice", "--wait", "--json")
        run(d, "submit-fact", "--image", str(assets / "img1.png"), "--question", Q, "--answer", "a1",
            "--wait", "--json")
        source = write_source(tmp_path / "nightly", assets, [
            {"key": "k2", "image": "img2.png", "question": Q, "answer": "a2"},
            {"key": "k3", "image": "img3.png", "question": Q, "answer": "a3"}])
        run(d, "ingest", str(source), "--actor", "nightly-bot", "--wait", "--json")

        # `kbctl beat` schedules the reaper, which the worker runs from the maintenance queue: the
        # signals the worker has consumed so far are deleted from the broker.
        taken = consumed_messages(d)
        assert taken, "the worker consumed signals for three jobs; nothing has deleted them yet"
        start(d, "beat")
        d.wait_for(lambda: not taken & consumed_messages(d), timeout=60,
                   what="the reaper scheduled by `kbctl beat` to delete the consumed broker messages")
        assert list(d.home.glob("celerybeat-schedule*")), "beat keeps its schedule in KB_HOME"
        history_before = d.kbctl("history", "--json")
        before = audit_rows(url)

        # Who and from where, as `kbctl history` shows them.
        assert [(v["version"], v["kind"], v["actor"], v["source"]) for v in reversed(history_before)] == [
            (0, "init", "alice", "cli"), (1, "edit", "alice", "cli"), (2, "edit", getpass.getuser(), "cli"),
            (3, "batch", "nightly-bot", f"cli:{source.resolve()}")]
        assert all(v["created_at"] and len(v["content_sha256"]) == 64 for v in history_before)
        text = d.kbctl("history").output
        assert "alice via cli" in text and "nightly-bot via cli:" in text

        # Every command that writes, each with its own actor.
        run(d, "init")
        run(d, "db", "upgrade")
        (tmp_path / "canary").mkdir()
        (tmp_path / "canary" / "img0.png").write_bytes((assets / "img0.png").read_bytes())
        canary = tmp_path / "canary" / "canary.jsonl"
        canary.write_text(json.dumps({"image": "img0.png", "question": Q}) + "\n")
        run(d, "model", "add", "gated", str(assets / "model"), "--hparam", "max_steps=300", "--hparam",
            "max_new_tokens=16", "--hparam", "max_answer_tokens=16", "--canary", str(canary),
            "--canary-max-changed", "0", "--actor", "carol")
        submitted = run(d, "submit-fact", "--image", str(assets / "img1.png"), "--question", "and now?",
                        "--answer", "a4", "--actor", "dave", "--wait", "--json")
        run(d, "retract", first["fact_id"], "--actor", "erin", "--wait", "--json")
        run(d, "rollback", "2", "--actor", "frank", "--wait", "--json")
        source2 = write_source(tmp_path / "nightly2", assets, [
            {"key": "k2", "image": "img2.png", "question": Q, "answer": "a2 new"}])
        run(d, "ingest", str(source2), "--sync", "--actor", "nightly-bot", "--wait", "--json")
        run(d, "model", "set", "gated", "--hparam", "max_steps=250", "--actor", "carol", "--json")
        # A job cancelled before any worker ran it, then queued again.
        cancelled = run(gated, "submit-fact", "--image", str(assets / "img1.png"), "--question", Q,
                        "--answer", "a5", "--actor", "ivan", "--json")
        run(gated, "cancel", str(cancelled["job_id"]), "--actor", "ivan", "--json")
        run(gated, "retry", str(cancelled["job_id"]), "--actor", "ivan", "--json")
        start(gated, "up")
        held_result = run(gated, "ingest", str(write_source(tmp_path / "gated", assets, [
            {"key": "g0", "image": "img0.png", "question": Q, "answer": "gated answer"}])),
            "--actor", "gina", "--wait", "--json", expect=3)  # 3: the canary gate held the batch
        held = json.loads(held_result.stdout)
        assert held["status"] == "held", held
        held_before = audit_rows(url)["versions"]
        run(gated, "promote", str(held["version"]), "--actor", "hank", "--json")
        created = run(d, "token", "create", "ci-bot", "--role", "editor", "--actor", "ivan", "--json")
        assert (created["name"], created["role"]) == ("ci-bot", "editor")
        revoked = run(d, "token", "revoke", "ci-bot", "--actor", "judy", "--json")
        assert (revoked["active"], revoked["revoked_by"]) == (False, "judy")
        # Read-only commands too, for good measure.
        for args in (("model", "list"), ("token", "list"), ("jobs",), ("status",), ("history",), ("show", "1"),
                     ("fact", first["fact_id"]), ("wait", str(submitted["job_id"])), ("diff", "1", "3"),
                     ("export", "3", str(tmp_path / "export"))):
            run(d, *args, "--json")
        run(d, "ask", "--image", str(assets / "img0.png"), "--question", Q, "--version", "1", "--json")
        exercised.add("serve")
        server = Server(d, "--model", "tiny").start()
        with server.client(make_token(d, "auditor", "reader")) as reader:
            served_head = reader.get("/v1/models/tiny/versions").json()["head"]
        assert (served_head, server.stop()) == (d.kbctl("status", "--json")["head_version"], 0)
    finally:
        # SIGTERM: every daemon process stops cleanly.
        exits = d.stop_workers() + gated.stop_workers()
    assert exits == [("worker", 0), ("beat", 0), ("up", 0)], f"{exits}\n{d.logs(tail=3000)}\n{gated.logs(tail=3000)}"
    after = audit_rows(url)
    history_after = d.kbctl("history", "--limit", "1000", "--json")

    assert exercised == {name for name, (kind, _) in COMMANDS.items() if kind != "none"}
    # Every row recorded before is still there, column for column (blob bytes included).
    for table, rows in before.items():
        changed = {key: (row, after[table].get(key))
                   for key, row in rows.items() if after[table].get(key) != row}
        assert not changed, f"{table} rows were rewritten: {changed}"
    # History only grows, and its old part reads as before.
    assert history_after[-len(history_before):] == history_before
    assert [v["version"] for v in history_after] == list(range(len(history_after) - 1, -1, -1))
    newer = {v["version"]: v for v in history_after[: len(history_after) - len(history_before)]}
    assert [(newer[n]["kind"], newer[n]["actor"], newer[n]["source"]) for n in sorted(newer)] == [
        ("edit", "dave", "cli"), ("retract", "erin", "cli"), ("rollback", "frank", "rollback"),
        ("batch", "nightly-bot", f"cli:{source2.resolve()}")]
    assert submitted["version"] == 4
    # The one update of an existing version row: promote clears `held` and records who promoted.
    held_row, promoted_row = held_before[max(held_before)], after["versions"][max(held_before)]
    columns = ("id", "model_id", "number", "parent", "kind", "summary", "content_sha256", "num_entries",
               "held", "actor", "source", "job_id", "created_at")
    differs = {c for c, a, b in zip(columns, held_row, promoted_row, strict=True) if a != b}
    assert differs == {"held", "summary"}
    summary = json.loads(promoted_row[5]) if isinstance(promoted_row[5], str) else promoted_row[5]
    held_summary = json.loads(held_row[5]) if isinstance(held_row[5], str) else held_row[5]
    assert summary == {**held_summary, "promoted_by": "hank"}
    gated_history = gated.kbctl("history", "--json")
    assert [(v["kind"], v["actor"], v["source"], v["held"]) for v in reversed(gated_history)] == [
        ("init", "carol", "cli", False), ("edit", "ivan", f"retry:{cancelled['job_id']}", False),
        ("batch", "gina", f"cli:{(tmp_path / 'gated').resolve()}", False)]
