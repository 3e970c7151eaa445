"""Errors raised by the editing engine. Each message names the offending value and the fix."""

from __future__ import annotations


class EditorError(Exception):
    """Base class of every error the editor raises on purpose."""


class UnsupportedBackboneError(EditorError):
    """The model's architecture is not one the editor knows how to drive."""


class IncompatibleCodebookError(EditorError):
    """A codebook was built for another model, layer or format version."""


class InvalidFactError(EditorError):
    """A fact (or a question to answer) cannot be used as given."""


class ConfigError(EditorError):
    """A hyperparameter is unknown or out of range."""
