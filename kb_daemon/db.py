"""Engine, sessions and migrations. One `Database` per process; sessions opened at the boundary."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from kb_daemon.config import Settings, redact
from kb_daemon.errors import KbError

logger = logging.getLogger(__name__)


def _migrations_dir() -> Path:
    """The Alembic scripts: the repository's migrations/, which a wheel installs as kb_daemon/migrations.

    An installed wheel holds them inside the package; a source checkout or an editable install
    keeps them at the top of the repository, beside the package.
    """
    package = Path(__file__).resolve().parent
    installed = package / "migrations"
    return installed if installed.is_dir() else package.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()


class SchemaOutOfDate(KbError):
    pass


class DatabaseUnavailable(KbError):
    pass


def include_name(name: str | None, type_: str, _parent: object) -> bool:
    """Alembic filter: Celery's broker and result tables share the database but are not ours."""
    return not (type_ == "table" and name and name.startswith(("kombu_", "celery_")))


class JSONItems:
    """A JSON array held as its items' JSON texts, written into a JSON column without decoding them.

    A nightly batch keeps each fact's report until the job commits. As JSON text a report is one
    block of memory rather than about 30 small Python objects, and the commit does not rebuild them.
    """

    __slots__ = ("texts",)

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts


def dump_json(value: Any) -> str:
    """`json.dumps` for the JSON columns, writing each `JSONItems` as the array of its texts."""
    token = uuid.uuid4().hex  # a placeholder no stored text can contain by chance
    held: list[JSONItems] = []

    def placeholder(obj: Any) -> str:
        if not isinstance(obj, JSONItems):
            raise TypeError(f"{type(obj).__name__} is not JSON serializable")
        held.append(obj)
        return f"{token}-{len(held) - 1}"

    text = json.dumps(value, default=placeholder)
    for i, items in enumerate(held):
        text = text.replace(f'"{token}-{i}"', "[" + ",".join(items.texts) + "]", 1)
    return text


def make_engine(url: str, sqlite_busy_seconds: float = 30.0) -> Engine:
    if url.startswith("sqlite"):
        busy_ms = int(sqlite_busy_seconds * 1000)
        engine = create_engine(url, connect_args={"timeout": sqlite_busy_seconds}, json_serializer=dump_json)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" below issue BEGIN IMMEDIATE: every transaction takes the
            # write lock up front, so two writers never deadlock upgrading a read lock.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, json_serializer=dump_json)


# The migration this code's models match; tests/test_foundation.py checks it is migrations/' head.
SCHEMA_REVISION = "0006"


class Database:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.is_sqlite:
            settings.home.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.database_url, settings.sqlite_busy_seconds)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any error."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except OperationalError as exc:
                session.rollback()
                raise DatabaseUnavailable(
                    f"database {redact(self.settings.database_url)} is unavailable: "
                    f"{str(exc.orig).splitlines()[0] if exc.orig else exc}"
                ) from exc
            except BaseException:
                session.rollback()
                raise

    def alembic_config(self) -> Any:
        """Alembic configured from code, on this database's engine: no alembic.ini at run time."""
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["engine"] = self.engine
        return config

    def upgrade(self) -> None:
        from alembic import command

        command.upgrade(self.alembic_config(), "head")

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as connection:
                return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError) as exc:
            message = str(exc.orig).lower() if exc.orig else ""
            if "no such table" in message or "does not exist" in message:
                return None
            raise DatabaseUnavailable(
                f"database {redact(self.settings.database_url)} is unavailable: {str(exc.orig).splitlines()[0]}"
            ) from exc

    def head_revision(self) -> str:
        """The newest migration, read from migrations/ (alembic's script parser: ~0.2 s)."""
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.alembic_config()).get_current_head()
        assert head is not None
        return head

    def check_schema(self) -> None:
        """Refuse to run against a database whose schema is not the one this code expects.

        Compares with SCHEMA_REVISION, not with migrations/ (a test keeps the two equal), so that
        every kbctl command does not pay for importing and parsing the migration scripts.
        """
        current, head = self.current_revision(), SCHEMA_REVISION
        if current is None:
            raise SchemaOutOfDate(
                f"database {redact(self.settings.database_url)} has no kb-daemon schema; run `kbctl init`"
            )
        if current != head:
            raise SchemaOutOfDate(
                f"database schema is at revision {current}, this code needs {head}; run `kbctl db upgrade`"
            )

    def dispose(self) -> None:
        self.engine.dispose()


def exists(session: Session, statement: Any) -> bool:
    return session.execute(select(statement.exists())).scalar() is True
