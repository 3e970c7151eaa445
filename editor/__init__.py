"""BalancEdit codebook editing for Hugging Face vision-language and causal language models.

The public API (names kept stable for the daemon, the workers and the evaluation harness)::

    backbone = editor.load_backbone("demo")          # or a path, or a loaded model
    ed = editor.Editor(backbone, method="balancedit", alpha=0.1)
    report = ed.apply(editor.Fact(image, "what shape is in the image?", "ring"))
    ed.answer(image, "what shape is in the image?")  # -> "ring"
    blob = ed.codebook.to_bytes(); editor.Codebook.from_bytes(blob)

Attributes load lazily so that ``import editor`` stays cheap; torch and transformers are
imported on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_backbone": "editor.backbones",
    "Backbone": "editor.backbones",
    "Editor": "editor.editor",
    "EditConfig": "editor.config",
    "Codebook": "editor.codebook",
    "IndexSettings": "editor.ann",
    "Fact": "editor.fact",
    "Negative": "editor.fact",
    "EditReport": "editor.fact",
    "EditorError": "editor.errors",
    "UnsupportedBackboneError": "editor.errors",
    "IncompatibleCodebookError": "editor.errors",
    "InvalidFactError": "editor.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'editor' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
