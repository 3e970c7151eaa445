"""Bearer tokens: who is calling, and whether their role allows the route.

Each request looks its token up in the database (one indexed row), so a revoked token stops
working at once. While the database cannot be reached, a token this server has already accepted
is accepted again with the role it had, so that answering goes on through an outage; a token
first seen during the outage is refused with 503.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from kb_daemon.db import DatabaseUnavailable
from kb_daemon.errors import KbError
from kb_daemon.models import Role
from kb_daemon.tokens import Identity, authenticate_digest, digest

if TYPE_CHECKING:
    from kb_daemon.db import Database


class Unauthorized(KbError):
    """No token, or one that is unknown or revoked (401)."""


class Forbidden(KbError):
    """A valid token whose role does not allow the route (403)."""


class Unavailable(KbError):
    """The database is needed and cannot be reached (503)."""


class Authenticator:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._accepted: dict[str, Identity] = {}  # token digest -> identity, for database outages
        self._lock = threading.Lock()

    def identify(self, authorization: str | None) -> Identity:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this route needs a token: send 'Authorization: Bearer <token>' "
                               "(create one with `kbctl token create NAME --role reader`)")
        return self.identify_digest(digest(token))

    def identify_digest(self, key: str) -> Identity:
        """The identity of the token whose digest is `key` (a console session's)."""
        try:
            identity = authenticate_digest(self.db, key)
        except (SQLAlchemyError, DatabaseUnavailable) as exc:
            with self._lock:
                known = self._accepted.get(key)
            if known is None:
                raise Unavailable("the database cannot be reached to check this token; retry later") from exc
            return known
        with self._lock:
            if identity is None:
                self._accepted.pop(key, None)
            else:
                self._accepted[key] = identity
        if identity is None:
            raise Unauthorized("unknown or revoked token")
        return identity


def require(identity: Identity, role: Role, action: str) -> None:
    if not identity.role.allows(role):
        raise Forbidden(f"token {identity.name!r} has role {identity.role.value}; {action} needs {role.value}")
