"""API tokens: who may call the HTTP server (`kbctl serve`) and with which role.

A token is "kb_" followed by 43 URL-safe characters (256 random bits). The database keeps only its
SHA-256, so neither a copy of the database nor a log line can be replayed as a credential; the
text is returned once, by `create_token`. The token's name is the actor the audit records for
everything done with it, so a name is never reused, not even once its token is revoked.

Every function takes a `Database` and owns its unit of work (one transaction), so the CLI and the
server call them without touching SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kb_daemon.db import Database, exists
from kb_daemon.errors import Conflict, InvalidInput, NotFound
from kb_daemon.models import ApiToken, Role, as_utc, utcnow

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "kb_"  # marks the text as a kb-daemon token (secret scanners, a glance at a config file)
TOKEN_RANDOM_BYTES = 32
NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,100}")
# The longest text `authenticate` hashes: a real token is 46 characters; anything far longer is refused
# without hashing it.
MAX_TOKEN_CHARS = 200
# `last_used_at` moves at most this often, so that a busy token does not cost a write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Identity:
    """The caller a valid token stands for: its name (the audit's actor) and its role."""

    name: str
    role: Role


@dataclass(frozen=True)
class TokenCreated:
    """A new token, its text included: the only time the text exists outside the caller's hands."""

    name: str
    role: str
    token: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenInfo:
    """What `kbctl token list` shows of a token: never its text, never its hash."""

    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    revoked_by: str | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(row.name, row.role, as_utc(row.created_at) or row.created_at, row.created_by,
                   as_utc(row.revoked_at), row.revoked_by, as_utc(row.last_used_at))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.active}


def parse_role(value: str | Role) -> Role:
    """The Role named `value`; InvalidInput naming the valid roles otherwise."""
    try:
        return Role(value)
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise InvalidInput(f"role must be one of {names}, got {value!r}") from None


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"token name must be 1 to 100 letters, digits or . _ @ - (it becomes the actor "
                           f"in the audit), got {name!r}")
    return name


def digest(token: str) -> str:
    """The stored form of a token: SHA-256 of its UTF-8 text, as 64 hex digits."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _find(session: Session, name: str) -> ApiToken | None:
    return session.execute(select(ApiToken).where(ApiToken.name == name)).scalar_one_or_none()


def _name_taken(name: str, row: ApiToken) -> Conflict:
    if row.revoked_at is None:
        return Conflict(f"a token named {name!r} already exists (created by {row.created_by}); "
                        "choose another name")
    return Conflict(f"the name {name!r} belongs to a token revoked by {row.revoked_by}; a name is the audit's "
                    "actor and is never reused, so choose another name")


def create_token(db: Database, name: str, role: str | Role, *, actor: str) -> TokenCreated:
    """Create a token NAME with `role`; return its text, which nothing stores.

    Refuses (Conflict) a name that any token, revoked or not, already has.
    """
    check_name(name)
    role = parse_role(role)
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)
    with db.session() as session:
        existing = _find(session, name)
        if existing is not None:
            raise _name_taken(name, existing)
        row = ApiToken(name=name, role=role.value, token_sha256=digest(token), created_by=actor)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:  # created by a concurrent `kbctl token create` since the look-up
            raise Conflict(f"a token named {name!r} already exists; choose another name") from None
        created_at = as_utc(row.created_at) or row.created_at
    logger.info("token %s (%s) created by %s", name, role.value, actor)
    return TokenCreated(name, role.value, token, created_at)


def list_tokens(db: Database) -> list[TokenInfo]:
    """Every token, revoked ones included, oldest first."""
    with db.session() as session:
        rows = session.execute(select(ApiToken).order_by(ApiToken.id)).scalars().all()
        return [TokenInfo.of(row) for row in rows]


def revoke_token(db: Database, name: str, *, actor: str) -> TokenInfo:
    """Revoke token NAME: from the commit on, `authenticate` refuses it. Its row stays, name included.

    Idempotent: revoking a revoked token changes nothing and returns when and by whom it was revoked,
    so that a script revoking a leaked token can safely run twice.
    """
    with db.session() as session:
        row = _find(session, name)
        if row is None:
            raise NotFound(f"no token named {name!r}; `kbctl token list` shows the tokens")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            row.revoked_by = actor
            logger.info("token %s revoked by %s", name, actor)
        return TokenInfo.of(row)


def authenticate(db: Database, token: str | None) -> Identity | None:
    """The identity of an active token; None for an empty, unknown or revoked one.

    One indexed look-up by the token's hash. Revoked tokens are refused by the same query.
    """
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return authenticate_digest(db, digest(token))


def authenticate_digest(db: Database, wanted: str) -> Identity | None:
    """`authenticate` for a token known by its digest only (the console's signed session cookie
    holds the digest, never the token)."""
    with db.session() as session:
        row = session.execute(
            select(ApiToken).where(ApiToken.token_sha256 == wanted, ApiToken.revoked_at.is_(None))
        ).scalar_one_or_none()
        if row is None or not hmac.compare_digest(row.token_sha256, wanted):
            return None
        now = utcnow()
        last_used = as_utc(row.last_used_at)
        if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
            row.last_used_at = now
        return Identity(row.name, Role(row.role))


def has_active_tokens(db: Database) -> bool:
    """Whether any token is unrevoked, i.e. whether anyone can authenticate at all."""
    with db.session() as session:
        return exists(session, select(ApiToken.id).where(ApiToken.revoked_at.is_(None)))
