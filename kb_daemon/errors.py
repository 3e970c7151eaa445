"""Errors of the service core. The CLI shows each as one line on stderr and exits non-zero."""

from __future__ import annotations


class KbError(Exception):
    """Base class of every error kb-daemon raises on purpose."""


class NotFound(KbError):
    """A model, fact, version or job that does not exist."""


class InvalidInput(KbError):
    """A value from a user or a file that cannot be used as given."""


class Conflict(KbError):
    """The operation clashes with the current state (e.g. a newer head)."""
