"""Alembic environment: URL from kb-daemon settings, batch mode on SQLite, broker tables ignored."""

from __future__ import annotations

from alembic import context

from kb_daemon.db import include_name
from kb_daemon.models import Base

config = context.config


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:  # the `alembic` command line; kb-daemon passes its own engine
        from kb_daemon.config import Settings
        from kb_daemon.db import Database

        engine = Database(Settings.from_env()).engine  # creates KB_HOME for a SQLite database
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            include_name=include_name,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
