"""The reaper and the nightly ingestion, run by Celery beat through the maintenance queue."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import create_engine, select, text

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.models import Model
from kb_daemon.notify import signal_model
from kb_daemon.queue import models_needing_work

logger = logging.getLogger(__name__)


def reap_once(db: Database, settings: Settings) -> list[str]:
    """Re-signal models with waiting or orphaned jobs; delete consumed broker messages."""
    with db.session() as session:
        names = models_needing_work(session)
    for name in names:
        signal_model(settings, name)
    delete_consumed_messages(settings)
    return names


def delete_consumed_messages(settings: Settings) -> int:
    if not settings.broker_url.startswith("sqla+"):
        return 0
    engine = create_engine(settings.broker_url[len("sqla+"):])
    try:
        with engine.begin() as connection:
            result = connection.execute(text("DELETE FROM kombu_message WHERE visible = :no"), {"no": False})
            return int(result.rowcount or 0)
    except Exception as exc:  # noqa: BLE001  (no table yet, or the broker is down: try next time)
        logger.info("could not delete consumed broker messages: %s", type(exc).__name__)
        return 0
    finally:
        engine.dispose()


def ingest_all(db: Database, settings: Settings) -> list[dict[str, Any]]:
    """Ingest every model's configured source (the nightly batch)."""
    from kb_daemon.ingest import ingest_source

    results = []
    with db.session() as session:
        models = [(m.name, m.ingest_source) for m in session.execute(select(Model)).scalars() if m.ingest_source]
    for name, source in models:
        try:
            result = ingest_source(db, settings, name, source, sync=False, actor="nightly", origin="nightly")
            results.append(result)
            if result.get("job_id"):
                signal_model(settings, name)
        except Exception as exc:  # noqa: BLE001  (one model's bad source must not stop the others)
            logger.error("nightly ingestion of %s from %s failed: %s", name, source, exc)
            results.append({"model": name, "error": str(exc)})
    return results
