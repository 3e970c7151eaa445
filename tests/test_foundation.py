"""Project-level guarantees: the CLI boundary, the PostgreSQL test server, the schema revision.

The import direction has its own file, tests/test_import_direction.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kb_daemon.cli import cli


def all_commands(group=cli, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from all_commands(command, (*prefix, name))


def test_every_command_help_ends_with_an_example():
    names = list(all_commands())
    assert ("model", "add") in names and ("submit-fact",) in names
    for path in names:
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example:" in result.output, f"kbctl {' '.join(path)} --help has no Example: block"


def test_readme_documents_every_top_level_command():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in cli.commands:
        assert f"kbctl {name}" in readme, f"README does not mention kbctl {name}"


def test_domain_error_is_one_line_and_exit_1(monkeypatch):
    import kb_daemon.demo

    def fail(echo, new_name):
        from editor.errors import EditorError

        raise EditorError("the demo model is missing; reinstall kb-daemon")

    monkeypatch.setattr(kb_daemon.demo, "run_demo", fail)
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 1
    assert result.stderr == "Error: the demo model is missing; reinstall kb-daemon\n"


@pytest.mark.postgres
def test_postgres_server_answers(postgres_url):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("select 40 + 2")).scalar() == 42
    engine.dispose()


def test_schema_revision_is_the_newest_migration(tmp_path):
    from kb_daemon.config import Settings
    from kb_daemon.db import SCHEMA_REVISION, Database

    db = Database(Settings.from_env({"KB_HOME": str(tmp_path)}))
    try:
        assert db.head_revision() == SCHEMA_REVISION
        db.upgrade()
        db.check_schema()  # a freshly migrated database is accepted
        assert db.current_revision() == SCHEMA_REVISION
    finally:
        db.dispose()
