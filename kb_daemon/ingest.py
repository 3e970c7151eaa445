"""Nightly ingestion: compare a source of facts with the ledger and enqueue one batch job.

A source is a JSON Lines or CSV file, or a folder of them (read in name order). Fields: `image`
(relative to the file), `question`, `answer`, optional `rephrases`, `negatives`, a stable `key` and
`supersedes` (the id of an applied fact the line replaces). Without a key, a fact is identified by
its image and normalised question. A line whose key is in the knowledge with another answer
supersedes that fact, whatever its image. The whole source is
validated before anything is written: one bad line rejects the source (the error names the file and
line), so a batch is never built from half a file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select

from kb_daemon.admission import admit
from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.errors import InvalidInput, NotFound
from kb_daemon.models import Fact, FactStatus
from kb_daemon.queue import FactInput, enqueue, get_model, read_image, record_fact

SOURCE_SUFFIXES = (".jsonl", ".csv")
# A fact that is, or is about to be, in the knowledge; one taken out on purpose, which an unchanged
# line does not bring back.
ACTIVE = (FactStatus.APPLIED.value, FactStatus.HELD.value, FactStatus.PENDING.value)
REMOVED = (FactStatus.RETRACTED.value, FactStatus.ROLLED_BACK.value)
CSV_LIST_COLUMNS = ("rephrases", "negative_images", "negative_questions")
EDIT_CASE_KEYS = frozenset({"id", "scope", "fact", "reliability", "t_gen", "i_gen", "loc", "meta", "key"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SourceNegative(_Strict):
    image: str | None = None
    question: str | None = None

    @model_validator(mode="after")
    def _needs_one(self) -> SourceNegative:
        if not (self.image or self.question):
            raise ValueError("a negative needs an 'image' or a 'question'")
        return self


class SourceLine(_Strict):
    """One fact of a source: the edit-case fact fields plus the flat negative lists of CSV files."""

    image: str | None = None
    question: str
    answer: str
    rephrases: list[str] = Field(default_factory=list)
    negatives: list[SourceNegative] = Field(default_factory=list)
    negative_images: list[str] = Field(default_factory=list)
    negative_questions: list[str] = Field(default_factory=list)
    supersedes: str | None = None

    @classmethod
    def parse(cls, fields: dict[str, Any]) -> SourceLine:
        """Validate one line; the first problem becomes one `InvalidInput` line naming the field."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "line"
            if error["type"] == "extra_forbidden":
                known = ", ".join(cls.model_fields) if len(error["loc"]) == 1 else "image, question"
                raise InvalidInput(f"unknown field {where!r} (known: {known})") from None
            if error["type"] == "missing":
                raise InvalidInput(f"missing field {where!r}") from None
            message = error["msg"].removeprefix("Value error, ")
            raise InvalidInput(f"field {where!r}: {message} (got {_shown(error.get('input'))})") from None


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class SourceFact:
    where: str  # file:line
    key: str
    fact: FactInput


def normalise(text: str) -> str:
    """The editor's form under which two answers (or questions) count as the same."""
    from editor.fact import normalise_answer

    return normalise_answer(text)


def source_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())
        if not files:
            raise InvalidInput(f"{source}: no .jsonl or .csv files in the folder")
        return files
    if not source.is_file():
        raise InvalidInput(f"{source}: no such file or folder")
    if source.suffix not in SOURCE_SUFFIXES:
        raise InvalidInput(f"{source}: a source must be .jsonl or .csv (or a folder of them)")
    return [source]


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON Lines or CSV file; CSV list columns are split on `|`."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of a column name
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(f"{path}:{line}: not valid UTF-8") from exc
    records = []
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for number, row in enumerate(reader, 2):
            if None in row:
                raise InvalidInput(f"{path}:{number}: more values than the header has columns")
            record: dict[str, Any] = {k.strip(): v for k, v in row.items() if k and v not in (None, "")}
            for name in CSV_LIST_COLUMNS:
                if name in record:
                    record[name] = [part.strip() for part in record[name].split("|") if part.strip()]
            records.append((number, record))
        return records
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise InvalidInput(f"{path}:{number}: each line must be a JSON object")
        records.append((number, record))
    return records


def read_inputs(path: Path, what: str) -> list[tuple[str | None, str]]:
    """(image path relative to the file, question) pairs from a JSON Lines file of model inputs
    (canaries, reference pools: the edit-case `loc` layout)."""
    if not path.is_file():
        raise InvalidInput(f"{what} file {path} does not exist")
    inputs = []
    for number, record in _records(path):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise InvalidInput(f"{path}:{number}: {what} line needs a 'question'")
        image = record.get("image")
        inputs.append((str(image) if image else None, question))
    return inputs


def parse_source(source: Path, settings: Settings) -> list[SourceFact]:
    """Read and validate every fact of the source (images included)."""
    facts: list[SourceFact] = []
    seen: dict[str, str] = {}
    for path in source_files(source):
        root = path.parent
        for number, record in _records(path):
            where = f"{path}:{number}"
            try:
                given_key, fact = _fact_from_record(record, root, settings)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {exc}") from exc
            key = given_key or ("auto:" + hashlib.sha256(
                (fact.image or b"") + b"\x00" + normalise(fact.question).encode()).hexdigest()[:24])
            if key in seen:
                raise InvalidInput(f"{where}: duplicate key {key!r} (first at {seen[key]})")
            seen[key] = where
            facts.append(SourceFact(where, key, FactInput(fact.image, fact.question, fact.answer, fact.rephrases,
                                                          fact.negative_images, fact.negative_questions, key,
                                                          supersedes=fact.supersedes)))
    return facts


def _fact_from_record(record: dict[str, Any], root: Path, settings: Settings) -> tuple[str | None, FactInput]:
    """(the line's key, its fact) after checking the line against `SourceLine`."""
    if "fact" in record:  # an edit-case line: the fact's fields under "fact", the probes beside it
        unknown = sorted(set(record) - EDIT_CASE_KEYS)
        if unknown:
            raise InvalidInput(f"unknown field {unknown[0]!r} in an edit-case line "
                               f"(known: {', '.join(sorted(EDIT_CASE_KEYS))})")
        fields, key = record["fact"], record.get("key")
        if not isinstance(fields, dict):
            raise InvalidInput("'fact' must be an object")
    else:
        fields, key = {k: v for k, v in record.items() if k != "key"}, record.get("key")
    if key is not None and not isinstance(key, str | int):
        raise InvalidInput("'key' must be a string")
    line = SourceLine.parse(fields)
    image = read_image(line.image, settings, root=root) if line.image else None
    negative_images = [read_image(p, settings, root=root) for p in line.negative_images]
    negative_questions = list(line.negative_questions)
    for negative in line.negatives:
        if negative.image:
            negative_images.append(read_image(negative.image, settings, root=root))
        else:
            negative_questions.append(str(negative.question))
    fact = FactInput(image, line.question, line.answer, tuple(line.rephrases), tuple(negative_images),
                     tuple(negative_questions), supersedes=line.supersedes).cleaned()
    return (str(key) if key not in (None, "") else None), fact


def ingest_source(db: Database, settings: Settings, model_name: str, source: str | Path, *, sync: bool,
                  actor: str, origin: str = "cli", name: str | None = None) -> dict[str, Any]:
    """Compare the source with the ledger and enqueue one batch (or nothing when nothing changed).

    Per key, a line is compared with the fact that is in the knowledge (applied, held or pending):
    same answer, unchanged; another answer, a new fact that supersedes it. With none in the
    knowledge: a fact that failed or was cancelled is queued again, a fact that a retract or rollback removed is
    skipped unless the line's answer changed, and an unknown key is new. `sync` retracts the
    applied facts that came from this same source and are no longer in it. `name` is what the
    source is known by (default: its resolved path): facts record it, and `sync` compares it.
    """
    path = Path(source).expanduser().resolve()
    parsed = parse_source(path, settings)
    name = name or str(path)
    label = f"ingest:{name}"
    with db.session() as session:
        model = get_model(session, model_name)
    for item in parsed:  # the model's own tokenizer and limits: the whole source, outside any write
        try:
            admit(settings, model, item.fact)
        except InvalidInput as exc:
            raise InvalidInput(f"{item.where}: {exc}") from exc
    with db.session() as session:
        model = get_model(session, model_name)
        active: dict[str, Fact] = {}
        latest: dict[str, Fact] = {}
        for fact in session.execute(
            select(Fact).where(Fact.model_id == model.id, Fact.key.is_not(None)).order_by(Fact.submitted_at)
        ).scalars():
            latest[fact.key] = fact
            if fact.status in ACTIVE:
                active[fact.key] = fact
        new, changed, retried, unchanged = [], [], [], 0
        skipped: list[dict[str, Any]] = []
        for item in parsed:
            known, last = active.get(item.key), latest.get(item.key)
            same_answer = last is not None and normalise(last.answer) == normalise(item.fact.answer)
            if known is not None:
                if normalise(known.answer) == normalise(item.fact.answer):
                    unchanged += 1
                elif item.fact.supersedes is None and known.status == FactStatus.APPLIED.value:
                    changed.append(replace(item, fact=replace(item.fact, supersedes=known.id)))
                else:
                    changed.append(item)
            elif last is not None and last.status in REMOVED and same_answer:
                skipped.append({"key": item.key, "fact_id": last.id, "where": item.where,
                                "reason": f"{last.status.replace('_', ' ')} at version {last.left_version}; "
                                          "change the line to apply it again"})
            elif last is not None and last.status in (FactStatus.FAILED.value, FactStatus.CANCELLED.value):
                retried.append(item)
            else:
                new.append(item)
        keys = {item.key for item in parsed}
        retract = [f.id for k, f in active.items()
                   if sync and k not in keys and f.status == FactStatus.APPLIED.value and f.source == label]
        fact_ids = []
        for item in new + changed + retried:
            try:
                fact_ids.append(record_fact(session, model, item.fact, actor=actor, source=label).id)
            except (InvalidInput, NotFound) as exc:  # a `supersedes` naming no supersedable fact
                raise InvalidInput(f"{item.where}: {exc}") from exc
        job_id = None
        if fact_ids or retract:
            job = enqueue(session, model, "batch", {"facts": fact_ids, "retract": retract, "source": name},
                          actor=actor, source=f"{origin}:{name}")
            job_id = job.id
    return {"model": model_name, "source": name, "job_id": job_id, "new": len(new), "changed": len(changed),
            "retried": len(retried), "unchanged": unchanged, "retract": len(retract), "skipped": skipped}
