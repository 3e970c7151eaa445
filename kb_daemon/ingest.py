"""Nightly ingestion: compare a source of facts with the ledger and enqueue one batch job.

A source is a JSON Lines or CSV file, or a folder of them (read in name order). Fields: `image`
(relative to the file), `question`, `answer`, optional `rephrases`, `negatives` and a stable `key`.
Without a key, a fact is identified by its image and normalised question. The whole source is
validated before anything is written: one bad line rejects the source (the error names the file and
line), so a batch is never built from half a file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.errors import InvalidInput
from kb_daemon.models import Fact
from kb_daemon.queue import FactInput, enqueue, get_model, read_image, record_fact

SOURCE_SUFFIXES = (".jsonl", ".csv")
ACTIVE = ("applied", "held", "pending")


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
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InvalidInput(f"{path}:{line}: not valid UTF-8") from exc
    records = []
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for number, row in enumerate(reader, 2):
            record: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
            for name in ("rephrases", "negative_images", "negative_questions"):
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
                fact = _fact_from_record(record, root, settings)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {exc}") from exc
            key = str(record.get("key") or "auto:" + hashlib.sha256(
                (fact.image or b"") + b"\x00" + normalise(fact.question).encode()).hexdigest()[:24])
            if key in seen:
                raise InvalidInput(f"{where}: duplicate key {key!r} (first at {seen[key]})")
            seen[key] = where
            facts.append(SourceFact(where, key, FactInput(fact.image, fact.question, fact.answer, fact.rephrases,
                                                          fact.negative_images, fact.negative_questions, key)))
    return facts


def _fact_from_record(record: dict[str, Any], root: Path, settings: Settings) -> FactInput:
    fact = record.get("fact", record)  # an edit-case line carries the fields under "fact"
    for name in ("question", "answer"):
        if not isinstance(fact.get(name), str):
            raise InvalidInput(f"missing or non-text field {name!r}")
    image = read_image(fact["image"], settings, root=root) if fact.get("image") else None
    rephrases = fact.get("rephrases") or []
    if not isinstance(rephrases, list) or not all(isinstance(q, str) for q in rephrases):
        raise InvalidInput("'rephrases' must be a list of strings")
    negative_images: list[bytes] = [read_image(p, settings, root=root) for p in fact.get("negative_images", [])]
    negative_questions: list[str] = list(fact.get("negative_questions", []))
    for negative in fact.get("negatives") or []:
        if not isinstance(negative, dict) or not (negative.get("image") or negative.get("question")):
            raise InvalidInput("each negative needs an 'image' or a 'question'")
        if negative.get("image"):
            negative_images.append(read_image(negative["image"], settings, root=root))
        elif negative.get("question"):
            negative_questions.append(str(negative["question"]))
    return FactInput(image, fact["question"], fact["answer"], tuple(rephrases), tuple(negative_images),
                     tuple(negative_questions)).cleaned()


def ingest_source(db: Database, settings: Settings, model_name: str, source: str | Path, *, sync: bool,
                  actor: str, origin: str = "cli") -> dict[str, Any]:
    """Compare the source with the ledger and enqueue one batch (or nothing when nothing changed)."""
    path = Path(source).expanduser().resolve()
    parsed = parse_source(path, settings)
    label = f"ingest:{path}"
    with db.session() as session:
        model = get_model(session, model_name)
        ledger: dict[str, Fact] = {}
        for fact in session.execute(
            select(Fact).where(Fact.model_id == model.id, Fact.key.is_not(None), Fact.status.in_(ACTIVE))
            .order_by(Fact.submitted_at)
        ).scalars():
            ledger[fact.key] = fact  # the latest active fact per key
        new, changed, unchanged = [], [], 0
        for item in parsed:
            known = ledger.get(item.key)
            if known is None:
                new.append(item)
            elif normalise(known.answer) != normalise(item.fact.answer):
                changed.append(item)
            else:
                unchanged += 1
        keys = {item.key for item in parsed}
        retract = [f.id for k, f in ledger.items()
                   if sync and k not in keys and f.status == "applied" and f.source.startswith("ingest:")]
        fact_ids = [record_fact(session, model, item.fact, actor=actor, source=label).id
                    for item in new + changed]
        job_id = None
        if fact_ids or retract:
            job = enqueue(session, model, "batch", {"facts": fact_ids, "retract": retract, "source": str(path)},
                          actor=actor, source=f"{origin}:{path}")
            job_id = job.id
    return {"model": model_name, "job_id": job_id, "new": len(new), "changed": len(changed),
            "unchanged": unchanged, "retract": len(retract)}
