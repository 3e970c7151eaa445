"""Versioned codebook snapshots: content-addressed blobs, entries shared by versions, spans.

An entry's tensors are stored once (a blob named by its SHA-256) however many versions hold it.
Which entries a version holds is recorded as spans: entry e is in every version v with
from_version <= v < to_version. A new version only opens and closes spans for what changed, so
storage grows with the changes, not with the length of the history. A version's codebook is its
entries in creation order; each span also records the entry's effective radius in its versions
(migration 0002), so materialising reads the radii; spans without one are replayed by the editor.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from kb_daemon.errors import Conflict, KbError, NotFound
from kb_daemon.models import Blob, Entry, EntrySpan, Model, Version

if TYPE_CHECKING:  # pragma: no cover
    import editor


class CorruptBlob(KbError):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a version's rows and entries are built.

    Building N rows allocates a few objects per entry and frees none, so generational collections
    would rescan a growing heap for cycles that do not exist (about a third of materialising 10,000
    entries; docs/decisions.md). The collector resumes when the block ends. Also a decorator.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def put_blob(session: Session, data: bytes, kind: str) -> str:
    digest = sha256(data)
    if session.get(Blob, digest) is None:
        session.add(Blob(sha256=digest, kind=kind, size=len(data), data=data))
        session.flush()
    return digest


def get_blob(session: Session, digest: str, what: str) -> bytes:
    blob = session.get(Blob, digest)
    if blob is None:
        raise NotFound(f"{what}: blob {digest[:12]} is missing from the database")
    data = bytes(blob.data)
    if sha256(data) != digest:
        raise CorruptBlob(
                    f"{what}: stored blob {digest[:12]} fails its SHA-256 check (corrupted); "
                    "`kbctl rollback V` to an intact version restores service"
                )
    return data


def get_version(session: Session, model: Model, number: int) -> Version:
    version = session.execute(
        select(Version).where(Version.model_id == model.id, Version.number == number)
    ).scalar_one_or_none()
    if version is None:
        latest = latest_number(session, model)
        raise NotFound(f"model {model.name!r} has no version {number} (versions 0..{latest})")
    return version


def latest_number(session: Session, model: Model) -> int | None:
    """The highest version number of `model` (held versions included), None before the first.

    MAX() reads one index entry; an ORM `.first()` without LIMIT would fetch every version number.
    """
    return session.execute(select(func.max(Version.number)).where(Version.model_id == model.id)).scalar()


def entries_at(session: Session, model: Model, number: int) -> list[Entry]:
    """The entries of version `number`, in codebook order."""
    return [entry for entry, _radius in entries_and_radii_at(session, model, number)]


def entries_and_radii_at(session: Session, model: Model, number: int) -> list[tuple[Entry, float | None]]:
    """The entries of version `number` in codebook order, each with its effective radius there
    (None for spans recorded before radii were stored)."""
    rows = session.execute(
        select(Entry, EntrySpan.radius).join(EntrySpan, EntrySpan.entry_id == Entry.id)
        .where(*spans_at(model.id, number)).order_by(Entry.id)
    ).all()
    return [(entry, radius) for entry, radius in rows]


def radii_by_fact_at(session: Session, model: Model, number: int) -> dict[str, float | None]:
    """Fact id -> effective radius of each entry of version `number` (None for spans recorded before
    radii were stored), read as plain columns: no entity objects, no blob."""
    rows = session.execute(
        select(Entry.fact_id, EntrySpan.radius).join(EntrySpan, EntrySpan.entry_id == Entry.id)
        .where(*spans_at(model.id, number)).order_by(Entry.id)
    )
    return {fact_id: radius for fact_id, radius in rows}


def spans_at(model_id: int, number: int) -> tuple[Any, ...]:
    """The conditions that select the spans of `model_id`'s version `number`."""
    return (EntrySpan.model_id == model_id, EntrySpan.from_version <= number,
            or_(EntrySpan.to_version.is_(None), EntrySpan.to_version > number))


# Bound parameters per IN list: SQLite refuses a statement with more than 32,766 (or 250,000,
# depending on how it was built), and a codebook can hold a million entries.
IN_CHUNK = 10_000


def in_chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """`values` in slices of at most `size`, one IN list each."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


HASH_MODULUS = 1 << 256


def entry_hash(fact_id: str, blob_sha256: str, base_radius: float) -> int:
    """One entry's share of a version's content hash."""
    return int(sha256(json.dumps([fact_id, blob_sha256, base_radius]).encode()), 16)


def content_hash(entries: Sequence[Entry]) -> str:
    """Equal for versions with the same entries (a rollback and its target); a version's codebook
    order is its entries' row id order, so the set of entries decides it.

    The sum modulo 2**256 of each entry's SHA-256 (of its fact id, blob digest and base radius),
    as 64 hex digits: a version that adds and removes k entries gets its hash from its parent's
    in O(k) (`changed_hash`)."""
    return changed_hash(None, entries, ())


def changed_hash(parent: str | None, added: Sequence[Entry], removed: Sequence[Entry]) -> str:
    """The content hash of `parent`'s content (None: empty) with `added` and without `removed`."""
    total = int(parent, 16) if parent is not None else 0
    total += sum(entry_hash(e.fact_id, e.blob_sha256, e.base_radius) for e in added)
    total -= sum(entry_hash(e.fact_id, e.blob_sha256, e.base_radius) for e in removed)
    return f"{total % HASH_MODULUS:064x}"


@dataclass(frozen=True)
class NewVersion:
    number: int
    added: list[str]
    removed: list[str]


@collector_paused()  # it loads and writes a row per entry, as materialise does
def commit_version(
    session: Session,
    model: Model,
    *,
    parent: int,
    kind: str,
    entries: Sequence[Entry],
    radii: Sequence[float] | None = None,
    actor: str,
    source: str,
    job_id: int | None,
    summary: dict[str, Any],
    held: bool = False,
) -> Version:
    """Record the next version of `model` holding exactly `entries`; make it head unless held.

    `radii` are the entries' effective radii in this version (the editor's `Codebook.radii`, in
    the same order); they are stored on the spans, so that materialising needs no replay of the
    overlap rule. A span whose entry stays but whose radius changes is closed and a new one opened.
    The caller holds the model's lock (see queue.lock_model) and commits the session.
    """
    if radii is not None and len(radii) != len(entries):
        raise ValueError(f"{len(radii)} radii for {len(entries)} entries")
    number = (latest_number(session, model) or 0) + 1
    stored_radii: Sequence[float | None] = [None] * len(entries) if radii is None else [float(r) for r in radii]
    wanted = {e.id: radius for e, radius in zip(entries, stored_radii, strict=True)}
    open_spans = list(session.execute(
        select(EntrySpan).where(EntrySpan.model_id == model.id, EntrySpan.to_version.is_(None))
    ).scalars())
    open_ids = {span.entry_id for span in open_spans}
    for span in open_spans:
        if span.entry_id not in wanted or span.radius != wanted[span.entry_id]:
            span.to_version = number
    kept = {span.entry_id for span in open_spans if span.to_version is None}
    for entry_id in sorted(wanted.keys() - kept):
        session.add(EntrySpan(model_id=model.id, entry_id=entry_id, from_version=number, to_version=None,
                              radius=wanted[entry_id]))
    # The open spans are the entries of the latest version: no second scan when that is the parent.
    if parent == number - 1:
        parent_ids = set(open_ids)
    else:
        parent_ids = {e.id for e in entries_at(session, model, parent)} if parent >= 0 else set()
    fact_of = {e.id: e.fact_id for e in entries}
    gone = sorted(parent_ids - wanted.keys())
    removed_rows = [fact_id for chunk in in_chunks(gone) for fact_id in session.execute(
        select(Entry.fact_id).where(Entry.id.in_(chunk))).scalars()]
    summary = {
        "added": [fact_of[i] for i in sorted(wanted.keys() - parent_ids)],
        "removed": sorted(removed_rows),
        **summary,
    }
    version = Version(
        model_id=model.id, number=number, parent=parent, kind=kind, summary=summary,
        content_sha256=content_hash(entries),
        num_entries=len(entries), held=held, actor=actor, source=source, job_id=job_id,
    )
    return _record_version(session, model, version)


def commit_changes(
    session: Session,
    model: Model,
    *,
    parent: int,
    kind: str,
    arriving: Mapping[int, float],
    leaving: Sequence[int],
    actor: str,
    source: str,
    job_id: int | None,
    summary: dict[str, Any],
    held: bool = False,
) -> Version | None:
    """Record the next version of `model` as the changes to its parent, which must be the latest
    version (else None: the caller commits with `commit_version`): the open spans of `leaving`
    (entry row ids removed, or whose radius changes) close, and spans open for `arriving` (entry
    row id -> effective radius: entries added, or kept with a new radius). Rows read and written,
    and the content hash's work, are O(changes), not O(entries): a commit at a million entries
    costs what it costs at ten. The caller holds the model's lock and commits the session.
    """
    latest = latest_number(session, model)
    if latest is None or latest != parent:
        return None
    parent_version = get_version(session, model, parent)
    number = parent + 1
    closed = 0
    leaving_ids = sorted(set(leaving))
    for chunk in in_chunks(leaving_ids):
        for span in session.execute(select(EntrySpan).where(
                EntrySpan.model_id == model.id, EntrySpan.to_version.is_(None), EntrySpan.entry_id.in_(chunk))
        ).scalars():
            span.to_version = number
            closed += 1
    if closed != len(leaving_ids):
        raise KbError(f"model {model.name!r}: {len(leaving_ids) - closed} entries to remove are not in version "
                      f"{parent}; nothing was committed")
    for entry_id in sorted(arriving):
        session.add(EntrySpan(model_id=model.id, entry_id=entry_id, from_version=number, to_version=None,
                              radius=float(arriving[entry_id])))
    added_ids, removed_ids = sorted(arriving.keys() - set(leaving_ids)), sorted(set(leaving_ids) - arriving.keys())
    rows: dict[int, Entry] = {}
    wanted = added_ids + removed_ids
    for chunk in in_chunks(wanted):
        rows.update((e.id, e) for e in session.execute(
            select(Entry).where(Entry.model_id == model.id, Entry.id.in_(chunk))).scalars())
    if len(rows) != len(wanted):
        raise KbError(f"model {model.name!r}: entries {sorted(set(wanted) - rows.keys())[:5]} are not stored")
    added, removed = [rows[i] for i in added_ids], [rows[i] for i in removed_ids]
    version = Version(
        model_id=model.id, number=number, parent=parent, kind=kind,
        summary={"added": [e.fact_id for e in added], "removed": sorted(e.fact_id for e in removed), **summary},
        content_sha256=changed_hash(parent_version.content_sha256, added, removed),
        num_entries=parent_version.num_entries + len(added) - len(removed), held=held, actor=actor, source=source,
        job_id=job_id,
    )
    return _record_version(session, model, version)


def _record_version(session: Session, model: Model, version: Version) -> Version:
    """Add `version` and, unless it is held, make it the model's head (announced to servers)."""
    session.add(version)
    if not version.held:
        model.head_version = version.number
        announce_head(session, model)
    session.flush()
    return version


def create_initial_version(session: Session, model: Model, actor: str, source: str) -> Version:
    version = Version(
        model_id=model.id, number=0, parent=None, kind="init", summary={"added": [], "removed": []},
        content_sha256=content_hash([]), num_entries=0, held=False, actor=actor, source=source,
    )
    session.add(version)
    model.head_version = 0
    announce_head(session, model)
    session.flush()
    return version


HEAD_CHANNEL = "kb_head"


def announce_head(session: Session, model: Model) -> None:
    """On PostgreSQL, tell listening servers (`LISTEN kb_head`) that `model`'s head moved: the
    notification is delivered when the transaction commits, and never if it rolls back. Servers
    also poll the head, so on SQLite, or if a notification is lost, they follow within a poll."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :model)"), {"channel": HEAD_CHANNEL, "model": model.name})


def store_entry(session: Session, model: Model, entry: editor.codebook.Entry) -> Entry:
    """Persist one editor entry (tensors as a content-addressed blob) and return its row."""
    from editor.codebook import entry_tensors_to_bytes

    digest = put_blob(session, entry_tensors_to_bytes(entry), "entry")
    row = Entry(model_id=model.id, fact_id=entry.fact_id, blob_sha256=digest, answer=entry.answer,
                input_id=entry.input_id, base_radius=entry.base_radius)
    session.add(row)
    session.flush()
    return row


def entry_rows_for(session: Session, model: Model, fact_ids: Sequence[str]) -> list[Entry]:
    """The stored entry rows of `fact_ids`, in that order (NotFound names any missing)."""
    wanted = list(fact_ids)
    rows: dict[str, Entry] = {}
    for chunk in in_chunks(wanted):
        rows.update((e.fact_id, e) for e in session.execute(
            select(Entry).where(Entry.model_id == model.id, Entry.fact_id.in_(chunk))).scalars())
    missing = [f for f in fact_ids if f not in rows]
    if missing:
        raise NotFound(f"no stored entry for fact(s) {', '.join(missing)}")
    return [rows[f] for f in fact_ids]


def materialise(session: Session, model: Model, number: int) -> editor.Codebook:
    """The codebook of version `number`, every blob checked against its SHA-256.

    The radii come from the spans when every span of the version has one (linear in the size);
    otherwise the editor replays the overlap rule over the entries.
    """
    return materialise_from(session, model, number, {}).codebook


@dataclass(frozen=True)
class Materialised:
    codebook: editor.Codebook
    entry_ids: list[int]  # the entry row id of each codebook entry, in codebook order
    blobs_read: int  # entries whose tensors came from the database (the others were known)
    spans_read: int = 0  # span rows read from the database (0: none, e.g. a cache file)


def materialise_from(session: Session, model: Model, number: int,
                     known: Mapping[int, editor.codebook.Entry],
                     known_facts: Mapping[str, editor.codebook.Entry] | None = None) -> Materialised:
    """The codebook of version `number`, reading only the blobs of entries not in `known` (entry
    row id -> tensors this process loaded before): moving a loaded version to a neighbour reads
    the changed entries' blobs and every span's radius, not every blob.

    `known_facts` maps fact ids to tensors of a codebook that equals a stored version (a worker's
    after its commit, whose entry row ids it never read): a fact has one entry row, so its tensors
    are that row's."""
    get_version(session, model, number)
    with collector_paused():
        pairs = entries_and_radii_at(session, model, number)
        rows = [entry for entry, _radius in pairs]
        if known_facts:
            known = {**known, **{row.id: known_facts[row.fact_id] for row in rows
                                 if row.id not in known and row.fact_id in known_facts}}
        radii = [radius for _entry, radius in pairs]
        stored = None if not pairs or None in radii else cast("list[float]", radii)
        codebook = codebook_of(session, model, rows, f"version {number} of model {model.name!r}", radii=stored,
                               known=known)
        return Materialised(codebook, [row.id for row in rows], sum(1 for row in rows if row.id not in known),
                            len(rows))


@dataclass(frozen=True)
class VersionChanges:
    """What differs between two versions of a model, read from the spans with an end between them."""

    arriving: list[ManifestRow]  # entries of the target (with their radius there) the start lacks, by entry id
    leaving: set[int]  # entry ids of the start the target lacks (or holds with another radius)
    spans_read: int  # span rows read: the changes between the two version numbers, not the size


def _range_conditions(start: int, target: int) -> tuple[Any, Any]:
    low, high = min(start, target), max(start, target)
    return (and_(EntrySpan.from_version > low, EntrySpan.from_version <= high),
            and_(EntrySpan.to_version > low, EntrySpan.to_version <= high))


def count_changes_between(session: Session, model: Model, start: int, target: int) -> int:
    """An upper bound of the span rows `changes_between` reads (two index range counts)."""
    return sum(session.execute(select(func.count(EntrySpan.id)).where(EntrySpan.model_id == model.id, condition))
               .scalar_one() for condition in _range_conditions(start, target))


def changes_between(session: Session, model: Model, start: int, target: int) -> VersionChanges:
    """The span changes that turn version `start`'s codebook into version `target`'s.

    A span that is live in exactly one of the two versions has its start or its end in
    (min, max] of the two numbers; every other span is live in both or in neither. Two indexed
    range reads (`ix_entry_spans_model_versions`, `ix_entry_spans_model_to_version`) find them:
    the rows read grow with the changes committed between the two numbers, not with the codebook.
    """
    columns = (EntrySpan.id, Entry.id, Entry.fact_id, Entry.blob_sha256, Entry.answer, Entry.input_id,
               Entry.base_radius, EntrySpan.radius, EntrySpan.from_version, EntrySpan.to_version)
    spans: dict[int, tuple[Any, ...]] = {}
    for condition in _range_conditions(start, target):
        for row in session.execute(select(*columns).join(Entry, Entry.id == EntrySpan.entry_id)
                                   .where(EntrySpan.model_id == model.id, condition)):
            spans[row[0]] = tuple(row)

    def live(begin: int, end: int | None, number: int) -> bool:
        return begin <= number and (end is None or end > number)

    arriving: list[ManifestRow] = []
    leaving: set[int] = set()
    for _span_id, entry_id, fact_id, blob, answer, input_id, base, radius, begin, end in spans.values():
        at_start, at_target = live(begin, end, start), live(begin, end, target)
        if at_target and not at_start:
            arriving.append(ManifestRow(entry_id, fact_id, blob, answer, input_id, base, radius))
        elif at_start and not at_target:
            leaving.add(entry_id)
    arriving.sort(key=lambda row: row.entry_id)
    return VersionChanges(arriving, leaving, len(spans))


def materialise_changes(session: Session, model: Model, number: int, base: Materialised,
                        base_number: int, others: Sequence[Materialised] = ()) -> Materialised | None:
    """Version `number`'s codebook made from `base` (version `base_number`'s, with its entry row
    ids) by applying the span changes between them (`Codebook.spliced`): the blobs read are those
    of the arriving entries that neither `base` nor `others` (other loaded versions of the model)
    holds, the span rows read the changes between the two numbers.

    None when the changes cannot be applied that way (a span without a stored radius, or a result
    whose size is not the version's), or when more spans changed between the two numbers than the
    version holds entries (a rollback far back in a busy history): the caller then materialises
    the version in full."""
    import torch

    from editor.codebook import entry_from_bytes

    version = get_version(session, model, number)
    if count_changes_between(session, model, base_number, number) > max(version.num_entries, 64):
        return None
    with collector_paused():
        changes = changes_between(session, model, base_number, number)
        base_ids = torch.as_tensor(base.entry_ids, dtype=torch.int64)  # (N,) ascending
        if any(row.radius is None for row in changes.arriving) or bool((base_ids[1:] <= base_ids[:-1]).any()):
            return None  # no stored radius to splice in; a base not in entry order
        arriving_ids = torch.tensor([row.entry_id for row in changes.arriving], dtype=torch.int64)  # (k,)
        # An arriving entry that the base holds (its radius changed) keeps the base's tensors, and
        # one that another loaded version holds takes its tensors from there.
        codebook = base.codebook
        found: dict[int, editor.codebook.Entry] = {}
        for source in (base, *others):
            ids = torch.as_tensor(source.entry_ids, dtype=torch.int64)
            if not len(ids) or len(found) == len(arriving_ids):
                continue
            at = torch.searchsorted(ids, arriving_ids).clamp_max(len(ids) - 1)
            for k in torch.nonzero(ids[at] == arriving_ids).flatten().tolist():
                found.setdefault(k, source.codebook.entry(int(at[k])))
        fetch = [row for k, row in enumerate(changes.arriving) if k not in found]
        blobs = get_blobs(session, [row.blob_sha256 for row in fetch],
                          f"version {number} of model {model.name!r}") if fetch else {}
        arriving = [found[k] if k in found else
                    entry_from_bytes(blobs[row.blob_sha256], row.fact_id, row.answer, row.input_id, row.base_radius)
                    for k, row in enumerate(changes.arriving)]
        leaving = torch.tensor(sorted(changes.leaving), dtype=torch.int64)
        kept = torch.nonzero(~torch.isin(base_ids, leaving)).flatten()  # base rows that stay
        if len(kept) + len(arriving) != version.num_entries:
            return None
        # A version's codebook is in entry row id order: merge the kept rows and the arriving ones.
        ids = torch.cat([base_ids[kept], arriving_ids])
        sorted_ids, permutation = torch.sort(ids, stable=True)
        order = torch.cat([kept, -torch.arange(1, len(arriving) + 1, dtype=torch.int64)])[permutation]
        old = order >= 0
        radii = torch.empty(len(order), dtype=torch.float32)
        radii[old] = codebook.radii[order[old]]
        if arriving:
            arriving_radii = torch.tensor([float(row.radius) for row in changes.arriving])  # type: ignore[arg-type]
            radii[~old] = arriving_radii[-order[~old] - 1]
        spliced = codebook.spliced(order, arriving, radii)
        entry_ids = sorted_ids.tolist()
    return Materialised(spliced, entry_ids, len(fetch), changes.spans_read)


class ManifestRow(NamedTuple):
    """What a version's codebook needs of one entry besides its tensors, read as plain columns."""

    entry_id: int
    fact_id: str
    blob_sha256: str
    answer: str
    input_id: str
    base_radius: float
    radius: float | None  # the effective radius in the version; None on spans recorded before 0002


def manifest_at(session: Session, model: Model, number: int) -> list[ManifestRow]:
    """The entries of version `number` in codebook order as plain rows: no entity objects, no
    blob (a derived cache of the tensors is checked against the blob digests)."""
    get_version(session, model, number)
    rows = session.execute(
        select(Entry.id, Entry.fact_id, Entry.blob_sha256, Entry.answer, Entry.input_id, Entry.base_radius,
               EntrySpan.radius).join(EntrySpan, EntrySpan.entry_id == Entry.id)
        .where(*spans_at(model.id, number)).order_by(Entry.id)
    )
    return [ManifestRow(*row) for row in rows]


def codebook_of(session: Session, model: Model, rows: Sequence[Entry], what: str,
                radii: Sequence[float] | None = None,
                known: Mapping[int, editor.codebook.Entry] | None = None) -> editor.Codebook:
    """A codebook of stored entries, in the given order, every blob read checked; `radii`, when
    given, are the entries' effective radii (else they are replayed). `known` maps entry row ids
    to tensors already loaded (and checked) by this process: their blobs are not read again."""
    from editor.codebook import Codebook, CodebookSpec, entry_from_bytes

    if model.spec is None:
        raise KbError(f"model {model.name!r} has never been loaded by a worker; start `kbctl worker`")
    known = known or {}
    blobs = get_blobs(session, [row.blob_sha256 for row in rows if row.id not in known], what)
    entries = [known[row.id] if row.id in known else
               entry_from_bytes(blobs[row.blob_sha256], row.fact_id, row.answer, row.input_id, row.base_radius)
               for row in rows]
    spec, hparams = CodebookSpec(**model.spec), dict(model.hparams)
    if radii is not None:
        return Codebook.with_radii(spec, hparams, entries, radii)
    return Codebook(spec, hparams, entries)


def get_blobs(session: Session, digests: Sequence[str], what: str) -> dict[str, bytes]:
    """Many blobs in one query, each checked against its SHA-256."""
    found: dict[str, bytes] = {}
    unique = list(dict.fromkeys(digests))
    for chunk in in_chunks(unique, 500):
        for digest, data in session.execute(select(Blob.sha256, Blob.data).where(Blob.sha256.in_(chunk))):
            data = bytes(data)
            if sha256(data) != digest:
                raise CorruptBlob(
                    f"{what}: stored blob {digest[:12]} fails its SHA-256 check (corrupted); "
                    "`kbctl rollback V` to an intact version restores service"
                )
            found[digest] = data
    missing = [d for d in unique if d not in found]
    if missing:
        raise NotFound(f"{what}: blob {missing[0][:12]} is missing from the database")
    return found


def set_spec(session: Session, model: Model, spec: dict[str, Any]) -> None:
    """Record the codebook spec the first time a worker loads the model; refuse a changed model."""
    if model.spec is None:
        session.execute(update(Model).where(and_(Model.id == model.id, Model.spec.is_(None)))
                        .values(spec=spec))
        model.spec = spec
        return
    from editor.codebook import CodebookSpec

    stored = dataclasses.asdict(CodebookSpec(**model.spec))  # fields added since it was stored: their defaults
    if stored != spec:
        changed = [k for k in spec if stored.get(k) != spec[k]]
        raise KbError(
            f"model {model.name!r} at {model.path} no longer matches its stored codebooks "
            f"({', '.join(changed)} changed); register the new weights as another model"
        )


def promote_version(session: Session, model: Model, number: int, actor: str) -> Version:
    """Make a held version the head (the caller holds the model lock)."""
    from kb_daemon.models import Fact, FactStatus, Job, JobStatus, change_status

    version = get_version(session, model, number)
    if not version.held:
        raise Conflict(f"version {number} of model {model.name!r} is not held; nothing to promote")
    if model.head_version != version.parent:
        raise Conflict(
            f"the head moved to version {model.head_version} after version {number} was held; "
            f"use `kbctl rollback {number}` to make its content the head"
        )
    version.held = False
    version.summary = {**version.summary, "promoted_by": actor}
    model.head_version = number
    announce_head(session, model)
    for fact_id, value in version.summary.get("ledger", {}).items():
        fact = session.get(Fact, fact_id)
        if fact is not None:
            status = FactStatus(value)
            change_status(fact, status)
            if status == FactStatus.APPLIED:
                fact.entered_version, fact.left_version = number, None
            else:
                fact.left_version = number
    if version.job_id is not None:
        job = session.get(Job, version.job_id)
        if job is not None and job.status == JobStatus.HELD:
            change_status(job, JobStatus.DONE)
    session.flush()
    return version
