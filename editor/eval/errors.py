"""Errors of the evaluation harness. Each message names the offending value and the fix."""

from __future__ import annotations

from pathlib import Path

from editor.errors import EditorError


class EvalError(EditorError):
    """Base class of every error the harness raises on purpose."""


class CaseFileError(EvalError):
    """A case (or reference-pool) file cannot be used as given: the message starts `file:line:`."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = message
        super().__init__(f"{self.path}:{line}: {message}")


class UnknownMethodError(EvalError):
    """The method name is not one the harness knows."""


class HparamError(EvalError):
    """A `KEY=VALUE` hyperparameter is malformed, unknown to the method, or out of range."""
