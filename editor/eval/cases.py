"""The edit-case file: JSON Lines, one case per line, image paths relative to the file.

One case::

    {"id": "shape-circle-1", "scope": "class",
     "fact": {"image": "img/17.png", "question": "what shape is in the image?", "answer": "ring",
              "rephrases": ["what shape is present?"], "negatives": [{"image": "img/40.png"}]},
     "reliability": [{"image": "img/17.png", "question": "what shape is in the image?", "answer": "ring"}],
     "t_gen": [{"image": "img/17.png", "question": "what shape does the image contain?", "answer": "ring"}],
     "i_gen": [{"image": "img/230.png", "question": "what shape is in the image?", "answer": "ring"}],
     "loc": [{"image": "img/88.png", "question": "what shape is in the image?"}]}

`fact` is all an editing method may see (`rephrases` and `negatives` are optional; a negative
carries an image, a question or both). `reliability`, `t_gen`, `i_gen` and `loc` are for scoring
only. `reliability` defaults to the fact's own input. A `loc` probe is judged against the
unedited model's own answer; its optional `answer` is kept for reference and never used.
`image` may be null only for text-only models. An optional `meta` object is carried along.

Loading validates the whole file before anything runs and raises `CaseFileError` naming the file,
the line and the problem. This module imports no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from editor.eval.errors import CaseFileError

PROBE_KINDS = ("reliability", "t_gen", "i_gen", "loc")
_CASE_KEYS = ("id", "scope", "fact", *PROBE_KINDS, "meta")
_FACT_KEYS = ("image", "question", "answer", "rephrases", "negatives")
_PROBE_KEYS = ("image", "question", "answer")
_NEGATIVE_KEYS = ("image", "question")


@dataclass(frozen=True)
class Probe:
    """One evaluation input. `answer` is the target (None for a loc probe without one)."""

    image: Path | None
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class NegativeSpec:
    image: Path | None = None
    question: str | None = None


@dataclass(frozen=True)
class FactSpec:
    """What the editor is given: the fact, its rephrasings and its negatives."""

    image: Path | None
    question: str
    answer: str
    rephrases: tuple[str, ...] = ()
    negatives: tuple[NegativeSpec, ...] = ()


@dataclass(frozen=True)
class EditCase:
    case_id: str
    scope: str
    fact: FactSpec
    reliability: tuple[Probe, ...]
    t_gen: tuple[Probe, ...] = ()
    i_gen: tuple[Probe, ...] = ()
    loc: tuple[Probe, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    line: int = field(default=0, compare=False)  # line in the file it was read from, for messages

    def probes(self, kind: str) -> tuple[Probe, ...]:
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
        return getattr(self, kind)  # type: ignore[no-any-return]

    def image_paths(self) -> set[Path]:
        paths = {self.fact.image} | {n.image for n in self.fact.negatives}
        for kind in PROBE_KINDS:
            paths |= {p.image for p in self.probes(kind)}
        return {p for p in paths if p is not None}


# ----- reading --------------------------------------------------------------------------------
class _LineReader:
    """Validates the records of one file; every problem is reported with file and line."""

    def __init__(self, path: Path, check_images: bool) -> None:
        self.path = path
        self.base = path.parent
        self.check_images = check_images
        self._checked: dict[Path, str | None] = {}

    def fail(self, line: int, message: str) -> CaseFileError:
        return CaseFileError(self.path, line, message)

    def records(self) -> Iterable[tuple[int, dict[str, Any]]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CaseFileError(self.path, 0, "file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CaseFileError(self.path, 0, f"cannot be read: {exc}") from exc
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise self.fail(number, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise self.fail(number, f"expected a JSON object, got {type(record).__name__}")
            yield number, record

    def keys(self, line: int, where: str, value: dict[str, Any], allowed: Sequence[str]) -> None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise self.fail(
                line, f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(allowed)}"
            )

    def obj(self, line: int, where: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(line, f"{where} must be an object, got {_kind(value)}")
        return value

    def text(self, line: int, where: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(line, f"{where} must be a non-empty string, got {_kind(value)}")
        return value.strip()

    def items(self, line: int, where: str, value: object) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(line, f"{where} must be a list, got {_kind(value)}")
        return value

    def image(self, line: int, where: str, value: object) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(line, f"{where} must be a path string or null, got {_kind(value)}")
        path = Path(os.path.normpath(value if os.path.isabs(value) else self.base / value))
        if self.check_images:
            if path not in self._checked:
                self._checked[path] = _image_problem(path)
            problem = self._checked[path]
            if problem:
                raise self.fail(line, f"{where}: image {value!r} {problem}")
        return path

    def probe(self, line: int, where: str, value: object, needs_answer: bool) -> Probe:
        item = self.obj(line, where, value)
        self.keys(line, where, item, _PROBE_KEYS)
        if "question" not in item:
            raise self.fail(line, f"{where}.question is missing")
        answer = item.get("answer")
        if needs_answer or answer is not None:
            if needs_answer and answer is None:
                raise self.fail(line, f"{where}.answer is missing")
            answer = self.text(line, f"{where}.answer", answer)
        return Probe(
            self.image(line, f"{where}.image", item.get("image")),
            self.text(line, f"{where}.question", item["question"]),
            answer,
        )


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return "not found"
    try:
        with Image.open(path) as image:
            _ = image.size  # header only: cheap, catches non-images
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        return f"cannot be read as an image ({exc})"
    return None


def load_cases(path: str | Path, *, check_images: bool = True) -> list[EditCase]:
    """Read and validate a whole case file; raise `CaseFileError` at the first problem."""
    path = Path(path)
    reader = _LineReader(path, check_images)
    cases: list[EditCase] = []
    seen: dict[str, int] = {}
    for line, record in reader.records():
        case = _case(reader, line, record)
        if case.case_id in seen:
            raise reader.fail(line, f"duplicate id {case.case_id!r} (first on line {seen[case.case_id]})")
        seen[case.case_id] = line
        cases.append(case)
    if not cases:
        raise CaseFileError(path, 0, "no cases in the file")
    return cases


def _case(reader: _LineReader, line: int, record: dict[str, Any]) -> EditCase:
    reader.keys(line, "case", record, _CASE_KEYS)
    for required in ("id", "fact"):
        if required not in record:
            raise reader.fail(line, f"{required} is missing")
    case_id = reader.text(line, "id", record["id"])
    scope = reader.text(line, "scope", record.get("scope", "unspecified"))
    raw_fact = reader.obj(line, "fact", record["fact"])
    reader.keys(line, "fact", raw_fact, _FACT_KEYS)
    for required in ("question", "answer"):
        if required not in raw_fact:
            raise reader.fail(line, f"fact.{required} is missing")
    if "image" not in raw_fact:
        raise reader.fail(line, "fact.image is missing (use null for a text-only model)")
    negatives = []
    for i, raw in enumerate(reader.items(line, "fact.negatives", raw_fact.get("negatives"))):
        where = f"fact.negatives[{i}]"
        item = reader.obj(line, where, raw)
        reader.keys(line, where, item, _NEGATIVE_KEYS)
        image = reader.image(line, f"{where}.image", item.get("image"))
        question = item.get("question")
        question = reader.text(line, f"{where}.question", question) if question is not None else None
        if image is None and question is None:
            raise reader.fail(line, f"{where} needs an image, a question, or both")
        negatives.append(NegativeSpec(image, question))
    fact = FactSpec(
        image=reader.image(line, "fact.image", raw_fact["image"]),
        question=reader.text(line, "fact.question", raw_fact["question"]),
        answer=reader.text(line, "fact.answer", raw_fact["answer"]),
        rephrases=tuple(
            reader.text(line, f"fact.rephrases[{i}]", q)
            for i, q in enumerate(reader.items(line, "fact.rephrases", raw_fact.get("rephrases")))
        ),
        negatives=tuple(negatives),
    )
    probes: dict[str, tuple[Probe, ...]] = {}
    for kind in PROBE_KINDS:
        probes[kind] = tuple(
            reader.probe(line, f"{kind}[{i}]", raw, needs_answer=kind != "loc")
            for i, raw in enumerate(reader.items(line, kind, record.get(kind)))
        )
    if "reliability" not in record:
        probes["reliability"] = (Probe(fact.image, fact.question, fact.answer),)
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise reader.fail(line, f"meta must be an object, got {_kind(meta)}")
    return EditCase(
        case_id,
        scope,
        fact,
        probes["reliability"],
        probes["t_gen"],
        probes["i_gen"],
        probes["loc"],
        meta,
        line,
    )


def load_reference_pool(path: str | Path, *, check_images: bool = True) -> list[Probe]:
    """A reference pool file: JSON Lines of {"image": ..., "question": ...} (answers ignored)."""
    path = Path(path)
    reader = _LineReader(path, check_images)
    return [reader.probe(line, "item", record, needs_answer=False) for line, record in reader.records()]


# ----- writing --------------------------------------------------------------------------------
def _relative(path: Path | None, base: Path) -> str | None:
    if path is None:
        return None
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _probe_json(probe: Probe, base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"image": _relative(probe.image, base), "question": probe.question}
    if probe.answer is not None:
        out["answer"] = probe.answer
    return out


def case_to_json(case: EditCase, base: Path) -> dict[str, Any]:
    """The JSON record of `case` with image paths relative to `base` (the file's folder)."""
    fact: dict[str, Any] = {
        "image": _relative(case.fact.image, base),
        "question": case.fact.question,
        "answer": case.fact.answer,
    }
    if case.fact.rephrases:
        fact["rephrases"] = list(case.fact.rephrases)
    if case.fact.negatives:
        fact["negatives"] = [
            {
                k: v
                for k, v in (("image", _relative(n.image, base)), ("question", n.question))
                if v is not None
            }
            for n in case.fact.negatives
        ]
    record: dict[str, Any] = {"id": case.case_id, "scope": case.scope, "fact": fact}
    for kind in PROBE_KINDS:
        record[kind] = [_probe_json(p, base) for p in case.probes(kind)]
    if case.meta:
        record["meta"] = case.meta
    return record


def write_cases(cases: Iterable[EditCase], path: str | Path) -> Path:
    """Write a case file; image paths are made relative to its folder."""
    path = Path(path)
    return _write_lines([json.dumps(case_to_json(c, path.parent), ensure_ascii=False) for c in cases], path)


def write_reference_pool(items: Iterable[Probe], path: str | Path) -> Path:
    """Write a reference pool file; image paths are made relative to its folder."""
    path = Path(path)
    return _write_lines([json.dumps(_probe_json(p, path.parent), ensure_ascii=False) for p in items], path)


def _write_lines(lines: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
