"""Where positives and negatives come from when the caller gives none.

Positives: rephrasings of the question from a pluggable paraphraser. The default,
`TemplateParaphraser`, works offline with a few meaning-preserving rewrites of English questions.
Negatives: altered images (a black image) and hard negatives mined from a reference pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


class Paraphraser(Protocol):
    def __call__(self, question: str, count: int) -> list[str]:
        """Up to `count` rephrasings of `question`, never the question itself."""
        ...


# Word-level rewrites only: they keep the question's shape, so a model that answers the question
# also recognises the rephrasing. Frames that add words around the question ("can you tell me
# ...") move a small model's key far away and would only make the radius infeasible.
_REWRITES: tuple[tuple[str, str], ...] = (
    (r"\bin the image\b", "in the picture"),
    (r"\bin the picture\b", "in the image"),
    (r"\bin this image\b", "in this picture"),
    (r"\bin the photo\b", "in the image"),
    (r"\bimage\b", "picture"),
    (r"^what (\w+)\b", r"which \1"),
    (r"\bwhat is\b", "what's"),
    (r"\bwhat's\b", "what is"),
    (r"\bwhat color\b", "what colour"),
    (r"\bwhat colour\b", "what color"),
    (r"\bcolor\b", "colour"),
    (r"\bcolour\b", "color"),
    (r"\bis present\b", "is there"),
    (r"\bdoes the image contain\b", "does the picture contain"),
)


class TemplateParaphraser:
    """Deterministic word-level rewrites (synonyms) of an English question, offline."""

    def __call__(self, question: str, count: int) -> list[str]:
        seen = {question.casefold()}
        result: list[str] = []
        for pattern, replacement in _REWRITES:
            if re.search(pattern, question, flags=re.IGNORECASE):
                text = " ".join(re.sub(pattern, replacement, question, count=1, flags=re.IGNORECASE).split())
                if text.casefold() not in seen:
                    seen.add(text.casefold())
                    result.append(text)
        return result[:count]


def black_image(like: Image.Image) -> Image.Image:
    """The altered image of BalancEdit's negative sample: same size, all black."""
    return Image.new("RGB", like.size, (0, 0, 0))


@dataclass(frozen=True)
class ReferenceItem:
    """One typical input of the model's traffic, for hard-negative mining."""

    image: Image.Image | None
    question: str


def distinct_questions(items: Sequence[ReferenceItem]) -> list[str]:
    """The pool's questions, most frequent first (ties in order of first appearance)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.question] = counts.get(item.question, 0) + 1
    return sorted(counts, key=lambda q: -counts[q])
