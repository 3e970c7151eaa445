"""Admission: what can be checked about a fact before it is queued is checked before it is queued.

A fact that passes `admit` does not fail in the worker for its shape: the per-fact caps, an image
where the model needs one (and none where it takes none), and the answer's length in the model's
own tokens against the model's pinned `max_answer_tokens`. Only the model's tokenizer is read
(no weights, no torch: `editor.text_side`), once per model directory per process, so validating a
source of 10,000 lines reads it once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from kb_daemon.config import Settings
from kb_daemon.errors import InvalidInput
from kb_daemon.models import Model
from kb_daemon.queue import FactInput, check_fact_limits

if TYPE_CHECKING:
    from editor.text_side import InputRules


def admit(settings: Settings, model: Model, fact: FactInput) -> None:
    """Refuse, with one line, a fact that `model`'s worker would refuse.

    `fact` is cleaned (`FactInput.cleaned()`), so its answer is the one the worker edits.
    """
    check_fact_limits(fact, settings)
    side = text_side(model.name, model.path)
    if side.needs_image and fact.image is None:
        raise InvalidInput(f"model {model.name} answers about images: the fact needs an image (--image)")
    if not side.needs_image and (fact.image is not None or fact.negative_images):
        raise InvalidInput(f"model {model.name} is a text-only model: the fact takes no image")
    from editor.config import EditConfig  # a dataclass module: no torch

    limit = EditConfig.from_dict(dict(model.hparams or {})).max_answer_tokens
    length = side.count_answer_tokens(fact.answer)
    if length > limit:
        raise InvalidInput(
            f"answer is {length} tokens long; model {model.name} allows {limit} (max_answer_tokens; change it "
            f"with `kbctl model set {model.name} --hparam max_answer_tokens=N`)"
        )


def text_side(name: str, path: str) -> InputRules:
    """The model directory's tokenizer side (loaded once per path), or one line saying why not."""
    from editor.errors import EditorError

    try:
        return _load_text_side(path)
    except (EditorError, OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInput(f"model {name}: cannot read the tokenizer of {path!r} ({first_line})") from exc


@lru_cache(maxsize=16)
def _load_text_side(path: str) -> InputRules:
    from editor.text_side import read_text_side

    return read_text_side(path)
