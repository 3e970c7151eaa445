"""`kbctl serve`: checks before listening, then uvicorn in the foreground."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kb_daemon.config import Settings, redact
from kb_daemon.errors import InvalidInput

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_address(host: str, has_tokens: bool) -> None:
    """Refuse to listen beyond this machine while nobody could authenticate (no active token)."""
    if not is_loopback(host) and not has_tokens:
        raise InvalidInput(f"refusing to listen on {host}: no API token exists yet, so no one could use the "
                           "server; create one first with `kbctl token create NAME --role admin`")


def serve(settings: Settings, models: tuple[str, ...], *, host: str, port: int, loglevel: str,
          stop_with_parent: bool = False, **options: Any) -> None:
    """Load `models`, listen on host:port and answer until SIGINT/SIGTERM. `options` go to ServerConfig."""
    import uvicorn

    from kb_daemon.server.app import ServerConfig, create_app
    from kb_daemon.service import Service
    from kb_daemon.tokens import has_active_tokens

    service = Service(settings)
    try:
        db = service.checked_db()
        check_listen_address(host, has_active_tokens(db))
        for name in models:
            service.status(name)  # an unknown model is refused before anything loads
    finally:
        service.close()
    if stop_with_parent:
        _stop_when_orphaned()
    logger.info("serving %s on http://%s:%d (database %s)", ", ".join(models), host, port,
                redact(settings.database_url))
    app = create_app(settings, ServerConfig(models=models, **options))
    config = uvicorn.Config(app, host=host, port=port, log_level=loglevel.lower(), access_log=True,
                            server_header=False, log_config=None)
    _Server(config).run()


class _Server:
    """uvicorn's server, but SIGINT/SIGTERM end it with exit status 0 after the graceful shutdown
    (uvicorn re-raises the signal, so the process would die of it); a second signal forces exit."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextmanager
            def capture_signals(self) -> Iterator[None]:
                def stop(_signum: int, _frame: Any) -> None:
                    self.force_exit = self.should_exit
                    self.should_exit = True

                previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self.server = Quiet(config)

    def run(self) -> None:
        self.server.run()


def _stop_when_orphaned() -> None:
    """Stop (as on SIGTERM) once the parent process is gone: `kbctl up --serve` starts the server
    beside its worker, and a worker killed alone must not leave the server behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        logger.warning("the process that started this server (%d) has gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kb-serve-parent", daemon=True).start()
