"""PostgreSQL `LISTEN kb_head`: wakes a model's host as soon as a commit moves its head.

Only a shortcut: hosts poll the head anyway, so a lost connection or notification delays a swap
by one poll at most. The connection reconnects with a growing pause while the server runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kb_daemon.config import redact
from kb_daemon.snapshots import HEAD_CHANNEL

logger = logging.getLogger(__name__)


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL as psycopg's connection string (the driver suffix dropped)."""
    from sqlalchemy.engine import make_url

    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class HeadListener:
    def __init__(self, database_url: str, on_notify: Callable[[str], None]) -> None:
        self.database_url, self.on_notify = database_url, on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kb-serve-listen", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        pause = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(libpq_url(self.database_url), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {HEAD_CHANNEL}")
                    self.connected.set()
                    pause = 0.5
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self.on_notify(notice.payload)
            except Exception as exc:  # noqa: BLE001  (polling goes on; reconnect after a pause)
                self.connected.clear()
                logger.warning("LISTEN %s on %s failed (%s); retrying in %.1f s", HEAD_CHANNEL,
                               redact(self.database_url), type(exc).__name__, pause)
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)
