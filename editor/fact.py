"""What a caller hands the editor (`Fact`, `Negative`) and what it gets back (`EditReport`)."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from editor.errors import InvalidFactError

ImageInput = Image.Image | str | Path | None

MAX_QUESTION_CHARS = 2_000
MAX_ANSWER_CHARS = 500
# Bidirectional embeddings, overrides (U+202A-U+202E) and isolates (U+2066-U+2069).
_BIDIRECTIONAL_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))


def normalise_answer(answer: str) -> str:
    """The form under which two answers count as the same: NFC, case-folded, single-spaced."""
    text = unicodedata.normalize("NFC", answer)
    return " ".join(text.casefold().split())


def clean_text(value: str, what: str, max_chars: int) -> str:
    """The one cleaning of a question, answer or rephrasing, for the editor and the daemon alike.

    NFC-normalises, collapses each run of white space to one space and strips the ends; refuses
    an empty result, a result over `max_chars` characters, and text holding characters that a
    prompt must not carry: control characters (C0, DEL, C1; the white-space ones such as tab
    and newline are collapsed, not refused), bidirectional overrides and isolates (which can make
    the displayed text differ from the text the model reads) and lone surrogates (which cannot be
    encoded as UTF-8). Raises `InvalidFactError` naming `what`, the problem and, for a refused
    character, its position (0-based) in `value` as given.
    """
    if not isinstance(value, str):
        raise InvalidFactError(f"{what} must be a string, got {type(value).__name__}")
    text = " ".join(unicodedata.normalize("NFC", value).split())
    if not text:
        raise InvalidFactError(f"{what} is empty; give a non-blank {what}")
    if len(text) > max_chars:
        raise InvalidFactError(
            f"{what} is {len(text):,} characters long; the limit is {max_chars:,}"
        )
    for position, char in enumerate(value):
        kind = _refused_kind(char)
        if kind is not None:
            raise InvalidFactError(
                f"{what} contains the {kind} U+{ord(char):04X} at position {position}; remove it"
            )
    return text


def _refused_kind(char: str) -> str | None:
    """What `clean_text` calls a character it refuses, or None for one it keeps."""
    if char in _BIDIRECTIONAL_CONTROLS:
        return "bidirectional control character"
    if "\ud800" <= char <= "\udfff":
        return "lone surrogate"
    if unicodedata.category(char) == "Cc" and not char.isspace():
        return "control character"
    return None


@dataclass(frozen=True)
class Negative:
    """An input the fact must NOT cover: another image, another question, or both.

    A missing part is taken from the fact: ``Negative(image=x)`` means "the fact's question about
    image x", ``Negative(question=q)`` means "question q about the fact's image".
    """

    image: ImageInput = None
    question: str | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.question is None:
            raise InvalidFactError("a negative needs an image, a question, or both")


@dataclass(frozen=True)
class Fact:
    """One piece of knowledge: on (image, question) the model must now answer `answer`.

    `rephrases` are other phrasings of the question that the fact must cover (positives);
    `negatives` are inputs it must not cover. `image` is None for text-only models.
    """

    image: ImageInput
    question: str
    answer: str
    rephrases: tuple[str, ...] = ()
    negatives: tuple[Negative, ...] = ()
    fact_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "question", clean_text(self.question, "question", MAX_QUESTION_CHARS))
        object.__setattr__(self, "answer", clean_text(self.answer, "answer", MAX_ANSWER_CHARS))
        rephrases = tuple(
            clean_text(q, "rephrase", MAX_QUESTION_CHARS) for q in tuple(self.rephrases)
        )
        object.__setattr__(self, "rephrases", rephrases)
        negatives = tuple(
            n if isinstance(n, Negative) else Negative(**n) for n in tuple(self.negatives)
        )
        object.__setattr__(self, "negatives", negatives)


@dataclass(frozen=True)
class EditReport:
    """What one `Editor.apply` did, for logs, the daemon's ledger and benchmarks."""

    fact_id: str
    answer: str
    original_answer: str
    radius: float
    positive_distances: tuple[float, ...]
    negative_distances: tuple[float, ...]
    radius_fallback: str | None
    steps: int
    converged: bool
    seconds: float
    superseded: tuple[str, ...] = ()
    split_with: tuple[str, ...] = ()
    num_hard_negatives: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    # Existing facts this edit collides with (another answer on overlapping inputs); see `Conflict`.
    conflicts: tuple[Conflict, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "fact_id": self.fact_id,
            "answer": self.answer,
            "original_answer": self.original_answer,
            "radius": self.radius,
            "positive_distances": list(self.positive_distances),
            "negative_distances": list(self.negative_distances),
            "radius_fallback": self.radius_fallback,
            "steps": self.steps,
            "converged": self.converged,
            "seconds": self.seconds,
            "superseded": list(self.superseded),
            "split_with": list(self.split_with),
            "num_hard_negatives": self.num_hard_negatives,
            "timings": dict(self.timings),
            "conflicts": [c.to_dict() for c in self.conflicts],
        }


@dataclass(frozen=True)
class Conflict:
    """An existing fact whose entry collides with a new one that gives another answer.

    `kind` is "fires_on_new_input" when the new fact's own input already fired the existing entry
    (it answered `answer` there before the edit), or "overlaps" when the two entries' balls
    overlapped and the overlap rule cut one or both radii. `now_answers` is what the existing
    fact's own input answers after the edit: the answer of the entry that fires at its key, or
    None when none does (the unedited model answers).
    """

    fact_id: str
    answer: str
    kind: str
    radius_before: float
    radius_after: float
    now_answers: str | None

    def to_dict(self) -> dict[str, object]:
        return {"fact_id": self.fact_id, "answer": self.answer, "kind": self.kind,
                "radius_before": self.radius_before, "radius_after": self.radius_after,
                "now_answers": self.now_answers}


def input_fingerprint(image_bytes: bytes | None, question: str) -> str:
    """Identity of an (image, question) input: a new fact on the same input supersedes the old."""
    digest = hashlib.sha256()
    digest.update(image_bytes or b"<no image>")
    digest.update(b"\x00")
    digest.update(" ".join(question.casefold().split()).encode())
    return digest.hexdigest()
