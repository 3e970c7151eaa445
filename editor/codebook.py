"""The codebook: keys, per-step values, radii and the facts they came from, with exact round trips.

Serialised (`editor.serialization`) as safetensors bytes (no pickle) with a JSON header: format
version, model id, edited layer, layer shape, distance and hyperparameters, plus one record per
entry (fact id, normalised answer, input fingerprint); the base radii are a tensor.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from editor.ann import BuildStopped, IndexSettings, KeyIndex
from editor.config import Distance
from editor.errors import EditorError, IncompatibleCodebookError
from editor.radius import arrive, resolve_overlaps
from editor.serialization import pack, save_tensors, unpack

logger = logging.getLogger(__name__)


# Set at interpreter exit: background builds stop at their next chunk, and exit waits for them
# (usearch aborts the process if it exits while a thread is inside an insert).
_STOP_BUILDS = threading.Event()
_BUILDERS: set[threading.Thread] = set()
_BUILDERS_LOCK = threading.Lock()


@atexit.register
def _stop_background_builds() -> None:
    _STOP_BUILDS.set()
    with _BUILDERS_LOCK:
        running = list(_BUILDERS)
    for thread in running:
        thread.join()


def _same_graph(a: IndexSettings, b: IndexSettings) -> bool:
    """Whether indexes built under `a` and `b` are the same (when and how to build aside)."""
    return dataclasses.replace(a, threshold=0, background=False) == dataclasses.replace(b, threshold=0,
                                                                                          background=False)


@dataclass
class _BackgroundBuild:
    """An index build in a thread over the first `rows` keys (see `Codebook._build_in_background`)."""

    settings: IndexSettings
    rows: int
    thread: threading.Thread = dataclasses.field(init=False)
    stale: bool = False  # rows moved since it began: its index cannot be caught up
    failed: str | None = None  # why the build raised


@dataclass(frozen=True)
class CodebookSpec:
    """What a codebook is bound to: the base model and the layer it edits."""

    model_id: str
    layer: str
    input_size: int
    output_size: int
    distance: Distance
    # What a key is made of: "layer" (the edited layer's input) or "layer+image*W" (see
    # `EditConfig.image_key_weight`); `input_size` is the key's length.
    key: str = "layer"

    def check_compatible(self, other: CodebookSpec) -> None:
        """Raise `IncompatibleCodebookError` naming the first field that differs."""
        for name in ("model_id", "layer", "key", "input_size", "output_size", "distance"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise IncompatibleCodebookError(
                    f"codebook was built for {name}={theirs!r} but this editor has {name}={mine!r}; "
                    "load it onto the model and layer it was made for"
                )


@dataclass(frozen=True, slots=True)
class Entry:
    """One fact in the codebook. `values` holds one output vector per answer step."""

    fact_id: str
    answer: str  # normalised
    input_id: str  # fingerprint of the fact's (image, question)
    key: torch.Tensor  # (Din,)
    values: torch.Tensor  # (L, Dout): step 0 replaces the prompt's last token, step j answer token j-1
    base_radius: float  # the radius chosen when the entry was added
    # (L,) int64: the token each value step was trained to produce (the answer's tokens, then the
    # end of sequence); None when unknown (an entry stored before tokens were kept), in which case
    # generation cannot hold the entry to its whole answer (see editor.commit).
    answer_ids: torch.Tensor | None = None
    # How far the fact's own positives reach: the overlap rule does not cut the radius below it
    # unless a neighbour's own reach needs the room (`editor.radius.arrive`); 0 cuts like GRACE.
    reach: float = 0.0


@dataclass(frozen=True, slots=True)
class _Record:
    """What the codebook keeps per entry besides its tensors: where they lie in the stores."""

    fact_id: str
    answer: str
    input_id: str
    base_radius: float
    reach: float
    row: int  # first row of the entry's values in the value store (its key is row `index` of the key store)
    length: int  # number of value rows (answer steps + 1)


class Codebook:
    """Entries in insertion order, with their stacked keys and effective radii.

    Every tensor is held once, in two stores: `keys` is the first N rows of the key store, and
    each entry's values are a run of rows of the value store. Per entry the codebook keeps only a
    small record (ids, answer, base radius, the offset and length of its value rows); `entry(i)`
    and `entries` hand out `Entry` objects whose tensors are views of the stores, made on demand,
    because views kept per entry cost a long-lived worker more memory than the tensors themselves
    (see docs/decisions.md). The cosine lookup normalises queries, not a copy of the keys.
    Appending writes into spare capacity that grows geometrically, so an added entry copies O(1)
    rows on average instead of the whole (N, Din) matrix, and the codebook is two large blocks of
    memory, not two small blocks per entry scattered among a long-lived worker's other allocations.

    By default `lookup` scans every key. With `configure_index(IndexSettings(...))`, from the
    settings' threshold on it asks an approximate nearest-neighbour index (`editor.ann.KeyIndex`)
    for candidates and applies their radius tests exactly; an index that fails its self-check (it
    finds too few of its own keys, as on keys spread evenly in many dimensions) is not used and the
    scan stays. The index is off by default: it is rebuilt in every process that loads the codebook
    (minutes at 100k entries of 2,048 floats on two cores, half an hour at 1M), which costs more
    than the scan it saves for a short-lived reader, and an entry it misses answers as the base
    model (bench/README.md). The index is this codebook's own derived data: built on the first
    lookup that needs it (or by `build_index`), or with `IndexSettings.background` in a thread
    while lookups scan exactly; kept in step by `add` and `remove`, rebuilt when missing or stale,
    and never handed to a copy.
    """

    keys: torch.Tensor  # (N, Din): rows 0..N-1 of _key_store
    radii: torch.Tensor  # (N,) effective radii
    reaches: torch.Tensor  # (N,) each entry's `Entry.reach`
    # Entry i's answer as a small integer (equal answers, equal codes), for the overlap rule; kept
    # up to date as entries arrive, so that `add` needs no pass over the N answers. Which entries
    # cut which is not kept: `add` reports the new entry's cuts, and a history of every cut would
    # grow with the square of a batch of mutually overlapping facts.
    _codes: array[int]
    _code_of: dict[str, int]

    def __init__(self, spec: CodebookSpec, hparams: dict[str, Any] | None = None,
                 entries: Sequence[Entry] = ()) -> None:
        self.spec = spec
        self.hparams = dict(hparams or {})
        self._index_settings: IndexSettings | None = None  # None: always the exact scan (see above)
        self._index: KeyIndex | None = None
        # Held by a build, by `add` and `remove`, and while a background build installs its index,
        # so that an index never misses an entry that arrived during its build.
        self._index_lock = threading.RLock()
        self._index_refused = False  # whether the built index failed its self-check (logged once)
        self._build: _BackgroundBuild | None = None  # the background build under way, if any
        self._refresh(list(entries))

    def __repr__(self) -> str:
        return f"Codebook({self.spec.model_id!r}, {self.spec.layer!r}, {len(self)} entries)"

    def __len__(self) -> int:
        return len(self._records)

    @property
    def fact_ids(self) -> list[str]:
        return [r.fact_id for r in self._records]

    def fact_id(self, index: int) -> str:
        return self._records[index].fact_id

    def entry_answer(self, index: int) -> str:
        """Entry `index`'s answer, normalised."""
        return self._records[index].answer

    def entry(self, index: int) -> Entry:
        """Entry `index`; its key and values are views of the codebook's stores."""
        r = self._records[index]
        return Entry(r.fact_id, r.answer, r.input_id, self.keys[index].detach(), self.values_of(index),
                     r.base_radius, self.answer_ids_of(index), r.reach)

    @property
    def entries(self) -> list[Entry]:
        """Every entry in order (a new list of views on each call: O(N), not for hot paths)."""
        return [self.entry(i) for i in range(len(self._records))]

    def values_of(self, index: int) -> torch.Tensor:
        """Entry `index`'s values (L, Dout), a view of the value store."""
        r = self._records[index]
        return self._value_store[r.row : r.row + r.length].detach()

    def answer_ids_of(self, index: int) -> torch.Tensor | None:
        """The tokens entry `index`'s values were trained to produce (L,), or None when unknown."""
        ids = self.token_rows_of(index)
        return None if bool((ids < 0).any()) else ids

    def token_rows_of(self, index: int) -> torch.Tensor:
        """Entry `index`'s row of the token store (L,) int64, -1 where unknown (a view)."""
        r = self._records[index]
        return self._token_store[r.row : r.row + r.length]

    @classmethod
    def with_radii(
        cls, spec: CodebookSpec, hparams: dict[str, Any], entries: list[Entry], radii: Sequence[float]
    ) -> Codebook:
        """A codebook whose effective radii are already known (the daemon stores them with each
        version): the overlap rule is not replayed, so building it is linear in its size.

        `radii` must be what the rule gives for `entries` in this order (tests check the daemon's
        stored radii against the replay).
        """
        resolved = torch.tensor([float(r) for r in radii], dtype=torch.float32)  # (N,)
        if resolved.shape != (len(entries),):
            raise IncompatibleCodebookError(f"{resolved.shape[0]} radii for {len(entries)} entries")
        book = cls(spec, hparams)
        book._refresh(list(entries), resolved)
        return book

    @classmethod
    def from_stores(cls, spec: CodebookSpec, hparams: dict[str, Any], ids: Sequence[tuple[str, str, str]],
                    keys: torch.Tensor, values: torch.Tensor, rows: Sequence[tuple[int, int]],
                    base_radii: Sequence[float], radii: torch.Tensor,
                    answer_ids: torch.Tensor | None = None, reaches: torch.Tensor | None = None) -> Codebook:
        """A codebook over tensors it does not copy: entry i is ids[i] = (fact id, answer, input
        id), key keys[i], values values[row : row + length] for rows[i] = (row, length), and
        radii[i] its effective radius, which the caller vouches for (bench/inference_overhead
        builds 100k-entry codebooks whose entries share one run of value rows). `answer_ids`, one
        token per value row, default to unknown (-1); `reaches` (N,) to 0."""
        if not (len(ids) == len(rows) == len(base_radii) == keys.shape[0] == radii.shape[0]):
            raise IncompatibleCodebookError("entry counts differ between the arguments")
        book = cls(spec, hparams)
        book._records = [
            _Record(fact_id, answer, input_id, float(base), float(reach), int(row), int(length))
            for (fact_id, answer, input_id), (row, length), base, reach
            in zip(ids, rows, base_radii, reaches.tolist() if reaches is not None else [0.0] * len(ids), strict=True)
        ]
        book._key_store, book._value_store = keys, values
        book._token_store = (answer_ids if answer_ids is not None
                             else torch.full((values.shape[0],), -1, dtype=torch.int64))
        book._value_rows = max((row + length for row, length in rows), default=0)
        book.keys, book.radii = keys, radii.to(torch.float32)
        book.reaches = (reaches.to(torch.float32) if reaches is not None
                        else torch.zeros(len(book._records)))
        book._index_answers()
        return book

    def spliced(self, order: Sequence[int] | torch.Tensor, arriving: Sequence[Entry], radii: torch.Tensor) -> Codebook:
        """A new codebook whose entry j is this codebook's entry `order[j]` when `order[j] >= 0`,
        else `arriving[-order[j] - 1]`, with effective radii `radii` (N',), which the caller
        vouches for (the daemon reads them from the version's spans; the overlap rule is not
        replayed).

        This codebook is left as it is (a server keeps serving it). The new one copies the key
        rows in the new order and appends the arriving entries' value rows after this codebook's
        value rows, so its Python work is one record per arriving entry plus a filter of the
        records: moving a loaded version by k changes costs O(k) records and blobs, and O(N) only
        in memory copies. The value rows of entries left out stay in the new store as dead rows
        until they outnumber a quarter of the live ones, when the store is packed.
        """
        order_t = (order if isinstance(order, torch.Tensor) else torch.tensor(list(order))).to(torch.int64)  # (N',)
        n_new = int(order_t.shape[0])
        radii = radii.to(torch.float32).reshape(-1)
        if radii.shape != (n_new,):
            raise IncompatibleCodebookError(f"{radii.shape[0]} radii for {n_new} entries")
        old_rows = order_t >= 0  # (N',) bool
        slots = (-order_t[~old_rows] - 1).tolist()  # the arriving entry of each new slot, in slot order
        if sorted(slots) != list(range(len(arriving))):
            raise IncompatibleCodebookError("the order must place every arriving entry exactly once")
        if bool((order_t[old_rows] >= len(self)).any()):
            raise IncompatibleCodebookError("the order names an entry this codebook does not hold")
        for entry in arriving:
            if entry.key.shape != (self.spec.input_size,) or entry.values.ndim != 2 \
                    or entry.values.shape[1] != self.spec.output_size:
                raise IncompatibleCodebookError(f"entry of fact {entry.fact_id!r} does not fit this codebook's layer")
        book = Codebook(self.spec, self.hparams)
        book._index_settings = self._index_settings
        keys = torch.empty(n_new, self.spec.input_size, dtype=self.keys.dtype)  # (N', Din)
        reaches = torch.empty(n_new, dtype=torch.float32)  # (N',)
        if bool(old_rows.any()):
            kept = order_t[old_rows]
            keys[old_rows] = self.keys[kept]
            reaches[old_rows] = self.reaches[kept]
        rows = self._value_rows
        value_parts, token_parts, new_records = [self._value_store[:rows]], [self._token_store[:rows]], []
        for slot in slots:
            entry = arriving[slot]
            values = entry.values.detach().to(device="cpu", dtype=self._value_store.dtype)  # (L, Dout)
            new_records.append(_Record(entry.fact_id, entry.answer, entry.input_id, float(entry.base_radius),
                                       float(entry.reach), rows, int(values.shape[0])))
            value_parts.append(values)
            token_parts.append(_token_row(entry))
            rows += int(values.shape[0])
        if slots:
            keys[~old_rows] = torch.stack([arriving[s].key.detach().to("cpu", keys.dtype) for s in slots])
            reaches[~old_rows] = torch.tensor([float(arriving[s].reach) for s in slots], dtype=torch.float32)
        arriving_records = iter(new_records)
        book._records = [self._records[i] if i >= 0 else next(arriving_records) for i in order_t.tolist()]
        book._key_store, book.keys = keys, keys
        book._value_store, book._token_store = torch.cat(value_parts), torch.cat(token_parts)
        book._value_rows = rows
        book.radii, book.reaches = radii.clone(), reaches
        live = sum(r.length for r in book._records)
        if rows - live > live // 4:
            book._pack_values()
        book._index_answers()
        return book

    def _pack_values(self) -> None:
        """Rewrite the value and token stores to hold only the entries' rows, in entry order."""
        starts = torch.tensor([r.row for r in self._records], dtype=torch.int64)
        lengths = torch.tensor([r.length for r in self._records], dtype=torch.int64)
        total = int(lengths.sum())
        # Row i of the packed store is row starts[e] + (i - first row of e) of the old one.
        offsets = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)  # (total,)
        picked = torch.arange(total, dtype=torch.int64) + offsets
        self._value_store, self._token_store = self._value_store[picked], self._token_store[picked]
        first = 0
        records = []
        for r in self._records:
            records.append(dataclasses.replace(r, row=first))
            first += r.length
        self._records, self._value_rows = records, total

    def _refresh(self, entries: list[Entry], radii: torch.Tensor | None = None) -> list[int]:
        """Rebuild the stores from `entries`; the radii are replayed by the overlap rule unless
        given. Returns, when replayed, the entries whose radius the last entry cut or that cut it."""
        touched: list[int] = []
        if entries:
            self._adopt(entries, torch.stack([e.key for e in entries]),  # (N, Din)
                        torch.cat([e.values for e in entries]),  # (sum L, Dout)
                        torch.cat([_token_row(e) for e in entries]))  # (sum L,)
            if radii is not None:
                self.radii = radii
            else:
                base = torch.tensor([e.base_radius for e in entries], dtype=torch.float32)
                split = resolve_overlaps(self.keys, base, [e.answer for e in entries], self.spec.distance,
                                         self.reaches)
                self.radii, last = split.radii, len(entries) - 1
                # The last entry arrived last: it was cut by cut_by[last], and it cut every entry
                # whose cuts end with it.
                touched = sorted(set(split.cut_by[last])
                                 | {j for j, cuts in enumerate(split.cut_by[:last]) if cuts and cuts[-1] == last})
        else:
            self._adopt([], torch.zeros(0, self.spec.input_size), torch.zeros(0, self.spec.output_size),
                        torch.zeros(0, dtype=torch.int64))
            self.radii = torch.zeros(0)
        self._index_answers()
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        return touched

    def _index_answers(self) -> None:
        # Fact id -> row and input id -> rows, built on first use (a server's codebook that is only
        # looked up never pays for them) and kept up to date by appends.
        self._row_of_fact: dict[str, int] | None = None
        self._rows_of_input: dict[str, list[int]] | None = None
        self._code_of = {}
        self._codes = array("i", (self._code_of.setdefault(r.answer, len(self._code_of)) for r in self._records))

    def _adopt(self, entries: list[Entry], key_store: torch.Tensor, value_store: torch.Tensor,
               token_store: torch.Tensor) -> None:
        """Make the stores, which hold `entries`' tensors in order, the codebook's storage.

        key_store (capacity >= N, Din) holds key i in row i; value_store (capacity >= sum L, Dout)
        holds the entries' values one after another, and token_store (the same rows) the token
        each value row produces. The entries' own tensors are not kept.
        """
        records, row = [], 0
        for e in entries:
            length = int(e.values.shape[0])
            records.append(_Record(e.fact_id, e.answer, e.input_id, float(e.base_radius), float(e.reach),
                                   row, length))
            row += length
        self._records = records
        if self._build is not None:  # rows may have moved: a build over the old keys cannot be caught up
            self._build.stale = True
        self._key_store, self._value_store, self._value_rows = key_store, value_store, row
        self._token_store = token_store
        self.keys = key_store[: len(records)]  # (N, Din)
        self.reaches = torch.tensor([r.reach for r in records], dtype=torch.float32)  # (N,)

    def _append(self, key: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor) -> int:
        """Copy key (Din,), values (L, Dout) and their tokens (L,) into the stores after the last
        entry, growing a store that is full; return the first value row."""
        n, row, length = len(self._records), self._value_rows, int(values.shape[0])
        if n + 1 > self._key_store.shape[0] or row + length > self._value_store.shape[0]:
            # Grow by a quarter (at least 16 entries' worth): at most 20% of a store is spare, and
            # the rows copied over a run of appends stay linear in N (rebuilding the matrix per added
            # entry would copy N^2 / 2 rows and leave freed blocks of every size behind).
            keys = self._key_store.new_empty(max(n + 16, n + n // 4 + 1), self.spec.input_size)
            keys[:n] = self.keys
            values_store = self._value_store.new_empty(max(row + 16 * length, row + row // 4 + length),
                                                       self.spec.output_size)
            values_store[:row] = self._value_store[:row]
            token_store = self._token_store.new_empty(values_store.shape[0])
            token_store[:row] = self._token_store[:row]
            self._key_store, self._value_store, self._token_store = keys, values_store, token_store
        self._key_store[n] = key
        self._value_store[row : row + length] = values
        self._token_store[row : row + length] = tokens
        self._value_rows = row + length
        self.keys = self._key_store[: n + 1]  # (N + 1, Din)
        return row

    def compact(self) -> None:
        """Give back the stores' spare capacity: afterwards they hold exactly the entries' tensors.

        The spare rows make a run of `add` calls cheap; a long-lived holder (a worker between jobs)
        compacts once the run is over, for one copy of the codebook's tensors.
        """
        n, rows = len(self._records), self._value_rows
        if self._key_store.shape[0] == n and self._value_store.shape[0] == rows:
            return
        self._key_store, self._value_store = self._key_store[:n].clone(), self._value_store[:rows].clone()
        self._token_store = self._token_store[:rows].clone()
        self.keys = self._key_store
        self._device_cache = {}  # it may hold a view of the old key store

    def _fact_rows(self) -> dict[str, int]:
        if self._row_of_fact is None:
            self._row_of_fact = {r.fact_id: i for i, r in enumerate(self._records)}
        return self._row_of_fact

    def _input_rows(self) -> dict[str, list[int]]:
        if self._rows_of_input is None:
            rows: dict[str, list[int]] = {}
            for i, r in enumerate(self._records):
                rows.setdefault(r.input_id, []).append(i)
            self._rows_of_input = rows
        return self._rows_of_input

    def has_fact(self, fact_id: str) -> bool:
        """Whether the codebook holds an entry of `fact_id` (a dictionary lookup)."""
        return fact_id in self._fact_rows()

    def index_of(self, fact_id: str) -> int:
        row = self._fact_rows().get(fact_id)
        if row is None:
            raise EditorError(f"no entry for fact {fact_id!r} in the codebook")
        return row

    def add(self, entry: Entry) -> tuple[list[str], list[str]]:
        """Add an entry; an older entry for the same input is superseded (removed).

        Returns (superseded fact ids, fact ids whose radius the new entry cut or that cut it).
        """
        with self._index_lock:
            return self._add(entry)

    def _add(self, entry: Entry) -> tuple[list[str], list[str]]:
        if entry.key.shape != (self.spec.input_size,):
            raise IncompatibleCodebookError(
                f"key of shape {tuple(entry.key.shape)} does not fit layer input size {self.spec.input_size}"
            )
        if entry.values.ndim != 2 or entry.values.shape[1] != self.spec.output_size:
            raise IncompatibleCodebookError(
                f"values of shape {tuple(entry.values.shape)} do not fit layer output size {self.spec.output_size}"
            )
        superseded_rows = list(self._input_rows().get(entry.input_id, ()))
        superseded = [self._records[i].fact_id for i in superseded_rows]
        held = self._fact_rows().get(entry.fact_id)
        if held is not None and self._records[held].input_id != entry.input_id:
            raise EditorError(f"fact id {entry.fact_id!r} is already in the codebook")
        base_radius = float(torch.tensor(entry.base_radius, dtype=torch.float32))
        reach = float(torch.tensor(entry.reach, dtype=torch.float32))
        # The key and values are copied into the codebook's stores (by _refresh or _append): they
        # are often a row or slice of a larger batch tensor, whose storage must not stay alive.
        key = entry.key.detach().float().cpu()  # (Din,)
        values = entry.values.detach().float().cpu()  # (L, Dout)
        tokens = _token_row(entry)  # (L,)
        if superseded:
            remaining = [e for e in self.entries if e.input_id != entry.input_id]
            key_index, self._index = self._index, None
            touched = self._refresh(
                [*remaining, Entry(entry.fact_id, entry.answer, entry.input_id, key, values, base_radius, tokens,
                                   reach)])
            if key_index is not None:
                key_index.remove_rows(superseded_rows)
                key_index.append(key)
                self._index = key_index
        else:  # the common case: only the new entry's arrival needs the overlap rule
            row = self._append(key, values, tokens)
            self._records.append(_Record(entry.fact_id, entry.answer, entry.input_id, base_radius, reach, row,
                                         int(values.shape[0])))
            new_row = len(self._records) - 1
            if self._row_of_fact is not None:
                self._row_of_fact[entry.fact_id] = new_row
            if self._rows_of_input is not None:
                self._rows_of_input.setdefault(entry.input_id, []).append(new_row)
            self._codes.append(self._code_of.setdefault(entry.answer, len(self._code_of)))
            self.radii = torch.cat([self.radii, torch.tensor([base_radius])])  # (N,)
            self.reaches = torch.cat([self.reaches, torch.tensor([reach])])  # (N,)
            # A copy (N x 4 bytes): a view would pin the array, which cannot grow while exported.
            codes = torch.frombuffer(self._codes, dtype=torch.int32).clone()  # (N,)
            touched = arrive(self.keys, self.radii, codes, len(self._records) - 1, self.spec.distance,
                             reaches=self.reaches)
            self._device_cache = {}
            if self._index is not None:
                self._index.append(key)
        return superseded, [self._records[j].fact_id for j in touched]

    def remove(self, fact_id: str) -> None:
        """Remove a fact's entry; the radii it cut are restored by replaying the overlap rule."""
        with self._index_lock:
            self._remove(fact_id)

    def _remove(self, fact_id: str) -> None:
        index = self.index_of(fact_id)
        entries = self.entries
        del entries[index]
        key_index, self._index = self._index, None
        self._refresh(entries)
        if key_index is not None:
            key_index.remove_rows([index])
            self._index = key_index

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query, the nearest entry whose ball contains it, else -1.

        queries (B, Din) -> (entry index (B,) int64, distance to it (B,) float; inf when none).
        Below the index threshold this is `exact_lookup`; from it on, `indexed_lookup`.
        """
        if not self._records:
            n = queries.shape[0]
            return torch.full((n,), -1, dtype=torch.long), torch.full((n,), float("inf"))
        key_index = self._current_index()
        if key_index is None:
            return self.exact_lookup(queries)
        return self._lookup_candidates(queries, key_index.candidates(queries.detach().float().cpu(), self.radii))

    def exact_lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`lookup` by scanning every key: the B x N distances at key positions, never B x T x N,
        as one matrix product against the keys, with their norms prepared once per device."""
        if not self._records:
            n = queries.shape[0]
            return torch.full((n,), -1, dtype=torch.long), torch.full((n,), float("inf"))
        keys, norms, radii = self._on_device(queries.device)
        q = queries.float()  # (B, Din)
        if self.spec.distance == "cosine":
            # cos = (q / |q|) . k / |k|: the keys are not normalised into a copy of the key store.
            cos = (torch.nn.functional.normalize(q, dim=-1) @ keys.T).mul_(norms)  # (B, N)
            dist = cos.neg_().add_(1.0).clamp_min_(0.0)  # (B, N)
        else:
            squared = torch.addmm(norms.unsqueeze(0), q, keys.T, alpha=-2.0)  # (B, N)
            dist = squared.add_((q * q).sum(dim=1, keepdim=True)).clamp_min_(0.0).sqrt_()  # (B, N)
        masked = dist.masked_fill_(dist > radii.unsqueeze(0), float("inf"))  # (B, N)
        best_dist, best = masked.min(dim=1)  # (B,), (B,)
        best = torch.where(torch.isfinite(best_dist), best, torch.full_like(best, -1))
        return best.cpu(), best_dist.cpu()

    def indexed_lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`lookup` through the index whatever the codebook's size (building it if needed): among
        the index's candidates, the nearest whose ball contains the query by the exact distance."""
        if not self._records:
            return self.exact_lookup(queries)
        key_index = self.build_index(self._index_settings or IndexSettings())
        return self._lookup_candidates(queries, key_index.candidates(queries.detach().float().cpu(), self.radii))

    def _lookup_candidates(self, queries: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact lookup restricted to candidate rows (B, K), ascending per query, -1 for none:
        the same distances from the float32 keys, the same radius test, and the same tie rule (the
        lowest row among equally near entries) as `exact_lookup` over all N keys."""
        keys, norms, radii = self._on_device(queries.device)
        q = queries.float()  # (B, Din)
        rows = rows.to(queries.device)
        valid = rows >= 0  # (B, K)
        safe = rows.clamp_min(0)  # (B, K)
        chosen = keys[safe]  # (B, K, Din)
        if self.spec.distance == "cosine":
            unit = torch.nn.functional.normalize(q, dim=-1)  # (B, Din)
            cos = torch.bmm(chosen, unit.unsqueeze(2)).squeeze(2).mul_(norms[safe])  # (B, K)
            dist = cos.neg_().add_(1.0).clamp_min_(0.0)  # (B, K)
        else:
            squared = norms[safe] - 2.0 * torch.bmm(chosen, q.unsqueeze(2)).squeeze(2)  # (B, K)
            dist = squared.add_((q * q).sum(dim=1, keepdim=True)).clamp_min_(0.0).sqrt_()  # (B, K)
        inside = valid & (dist <= radii[safe])  # (B, K)
        masked = dist.masked_fill_(~inside, float("inf"))  # (B, K)
        best_dist, best_column = masked.min(dim=1)  # (B,), (B,)
        best = rows.gather(1, best_column.unsqueeze(1)).squeeze(1)  # (B,)
        best = torch.where(torch.isfinite(best_dist), best, torch.full_like(best, -1))
        return best.cpu(), best_dist.cpu()

    def configure_index(self, settings: IndexSettings | None) -> None:
        """Use the index under `settings` from now on (None: always scan exactly). A built index
        is kept when only the threshold or the background setting changes."""
        with self._index_lock:
            built = self._index
            if built is not None and (settings is None or not _same_graph(settings, built.settings)):
                self._index = None
            if self._build is not None and (settings is None or not _same_graph(settings, self._build.settings)):
                self._build = None  # the thread finds itself replaced and drops what it built
            self._index_settings = settings

    @property
    def index_settings(self) -> IndexSettings | None:
        return self._index_settings

    def build_index(self, settings: IndexSettings | None = None) -> KeyIndex:
        """The codebook's index, built now if it is missing, stale or inconsistent with the keys
        (a worker may call this after loading a large version, so the first question does not
        wait for it)."""
        settings = settings or self._index_settings or IndexSettings()
        with self._index_lock:
            key_index = self._index
            if key_index is None or not self._index_fits(key_index, settings):
                key_index = KeyIndex(self.keys, self.spec.distance, settings)
                self._index = key_index
            return key_index

    def _index_fits(self, key_index: KeyIndex, settings: IndexSettings) -> bool:
        """Whether `key_index` was built under `settings` (the threshold aside), describes these
        keys and has not lost too many of them to removals."""
        return (not key_index.stale and _same_graph(key_index.settings, settings)
                and key_index.consistent_with(len(self), self.spec.input_size, self.spec.distance))

    def drop_index(self) -> None:
        """Free the index (a background build under way ends unused); the next lookup that needs
        it builds it again from the keys."""
        with self._index_lock:
            self._index, self._build = None, None

    def wait_for_index(self, timeout: float | None = None) -> KeyIndex | None:
        """Wait for a background build under way (up to `timeout` seconds), then return the
        index in use, if any. Starts nothing."""
        build = self._build
        if build is not None:
            build.thread.join(timeout)
        return self._index

    def _current_index(self) -> KeyIndex | None:
        """The index when this codebook's size calls for it, else None (and an index that is no
        longer needed is dropped). With `IndexSettings.background`, a missing or unfit index is
        built in a thread and this returns None (the exact scan) until it is in."""
        settings = self._index_settings
        if settings is None or len(self) < settings.threshold:
            self._index = None
            return None
        if settings.background:
            key_index = self._index
            if key_index is None or not self._index_fits(key_index, settings):
                self._build_in_background(settings)
                return None
        else:
            key_index = self.build_index(settings)
        if key_index.self_recall < settings.min_self_recall:
            if not self._index_refused:
                logger.warning("index over %d keys finds %.1f%% of its own keys (below %.1f%%): scanning exactly",
                               len(self), 100 * key_index.self_recall, 100 * settings.min_self_recall)
                self._index_refused = True
            return None
        self._index_refused = False
        return key_index

    def _build_in_background(self, settings: IndexSettings) -> None:
        """Start a thread that builds the index over the keys as they are now, unless one is
        running (it is caught up or discarded when it ends, and the next lookup starts another)
        or one under these settings has failed (logged once; the codebook keeps scanning)."""
        with self._index_lock:
            build = self._build
            if build is not None and (build.thread.is_alive()
                                      or (build.failed and _same_graph(build.settings, settings))):
                return
            if _STOP_BUILDS.is_set():  # the process is exiting
                return
            # Rows below len(self) are never written again: appends go after them, and anything
            # that moves rows makes new stores (and marks this build stale).
            keys = self.keys  # (N, Din)
            build = _BackgroundBuild(settings, int(keys.shape[0]))
            build.thread = threading.Thread(target=self._run_build, args=(build, keys), daemon=True,
                                            name=f"index-{self.spec.model_id}")
            self._build = build
            with _BUILDERS_LOCK:
                _BUILDERS.add(build.thread)
            build.thread.start()

    def _run_build(self, build: _BackgroundBuild, keys: torch.Tensor) -> None:
        """The background thread: build, then, under the lock, index the entries appended since
        the build started and put the index in use, unless the codebook moved rows meanwhile or
        its settings changed (then the index is dropped and the next lookup builds again)."""
        try:
            self._build_and_install(build, keys)
        finally:
            with _BUILDERS_LOCK:
                _BUILDERS.discard(threading.current_thread())

    def _build_and_install(self, build: _BackgroundBuild, keys: torch.Tensor) -> None:
        started = time.perf_counter()
        try:
            key_index = KeyIndex(keys, self.spec.distance, build.settings, stop=_STOP_BUILDS)
        except BuildStopped:
            return
        except Exception as exc:  # noqa: BLE001  (the exact scan stays correct; say why once)
            build.failed = f"{type(exc).__name__}: {exc}"
            logger.warning("building the index over %d keys failed (%s): scanning exactly", build.rows, build.failed)
            return
        with self._index_lock:
            settings = self._index_settings
            if self._build is not build or build.stale or settings is None \
                    or not _same_graph(settings, build.settings):
                logger.info("index over %d keys built in %.1f s but the codebook changed meanwhile: dropped",
                            build.rows, time.perf_counter() - started)
                if self._build is build:
                    self._build = None
                return
            for row in range(build.rows, len(self)):
                key_index.append(self.keys[row])
            self._index, self._build = key_index, None
        logger.info("index over %d keys built in the background in %.1f s (%d more indexed since it began)",
                    build.rows, time.perf_counter() - started, len(key_index) - build.rows)

    def _on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, norms, radii) on `device`: for cosine the norms are the keys' inverse norms
        (1 / max(|k|, 1e-12), as `normalize` divides), for Euclidean their squared norms. On the
        CPU `keys` is the key store itself, not a copy."""
        if device not in self._device_cache:
            keys = self.keys.to(device=device, dtype=torch.float32)
            if self.spec.distance == "cosine":
                norms = keys.norm(dim=1).clamp_min_(1e-12).reciprocal_()  # (N,)
            else:
                norms = (keys * keys).sum(dim=1)  # (N,)
            self._device_cache[device] = (keys, norms, self.radii.to(device))
        return self._device_cache[device]

    def memory_bytes(self) -> dict[str, int]:
        """What the codebook holds, in bytes: `tensors`, its keys, value rows, their tokens, radii and reaches (not the
        stores' spare capacity), and `records`, the Python objects it keeps per entry (records,
        their ids, answers and numbers, the answer codes), as `sys.getsizeof` counts them, and
        `index`, the nearest-neighbour index when one is built (0 otherwise)."""
        rows = self._value_rows
        tensors = (self.keys.nbytes + self._value_store[:rows].nbytes + self._token_store[:rows].nbytes
                   + self.radii.nbytes + self.reaches.nbytes)
        seen: set[int] = set()
        pending: list[Any] = [self._records, self._codes, self._code_of]
        records = 0
        while pending:
            item = pending.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            records += sys.getsizeof(item)
            if isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            elif isinstance(item, _Record):
                pending.extend(getattr(item, name) for name in _Record.__slots__)
        index = self._index.memory_bytes() if self._index is not None else 0
        return {"tensors": tensors, "records": records, "index": index}

    def copy(self) -> Codebook:
        """An independent codebook with the same entries and index settings; it builds its own
        index when it needs one (an index is never shared between codebooks)."""
        book = Codebook(self.spec, self.hparams, self.entries)
        book._index_settings = self._index_settings
        return book

    def to_bytes(self) -> bytes:
        """safetensors bytes; identical codebooks give identical bytes."""
        n = len(self._records)
        tensors = {
            "keys": self.keys if n else torch.zeros(0, self.spec.input_size),
            "values": torch.cat([self.values_of(i) for i in range(n)]) if n else torch.zeros(0, self.spec.output_size),
            "value_lengths": torch.tensor([r.length for r in self._records], dtype=torch.int64),
            "base_radii": torch.tensor([r.base_radius for r in self._records], dtype=torch.float32),
            "reaches": self.reaches.clone(),
            "answer_ids": (torch.cat([self.token_rows_of(i) for i in range(n)]) if n
                           else torch.zeros(0, dtype=torch.int64)),
        }
        header = {
            "spec": {
                "model_id": self.spec.model_id,
                "layer": self.spec.layer,
                "input_size": self.spec.input_size,
                "output_size": self.spec.output_size,
                "distance": self.spec.distance,
                "key": self.spec.key,
            },
            "hparams": self.hparams,
            "entries": [
                {"fact_id": r.fact_id, "answer": r.answer, "input_id": r.input_id} for r in self._records
            ],
        }
        return pack(tensors, header)

    @classmethod
    def from_bytes(cls, data: bytes) -> Codebook:
        """Inverse of `to_bytes`. Foreign or damaged bytes raise `IncompatibleCodebookError`."""
        header, tensors = unpack(data)
        spec = CodebookSpec(**header["spec"])
        records = header["entries"]
        lengths = tensors["value_lengths"].tolist()
        if not (len(records) == len(lengths) == tensors["keys"].shape[0] == tensors["base_radii"].shape[0]):
            raise IncompatibleCodebookError("codebook is inconsistent: entry counts differ between fields")
        values = torch.split(tensors["values"], lengths) if records else []
        tokens = tensors.get("answer_ids")
        if tokens is not None and tokens.shape != (tensors["values"].shape[0],):
            raise IncompatibleCodebookError("codebook is inconsistent: answer_ids do not match the value rows")
        token_rows = torch.split(tokens, lengths) if records and tokens is not None else [None] * len(records)
        reaches = tensors.get("reaches", torch.zeros(len(records)))
        if reaches.shape != (len(records),):
            raise IncompatibleCodebookError("codebook is inconsistent: reaches do not match the entries")
        # No clones: the constructor copies keys, values and tokens into its own stores.
        entries = [
            Entry(r["fact_id"], r["answer"], r["input_id"], tensors["keys"][i],
                  values[i], float(tensors["base_radii"][i]), token_rows[i], float(reaches[i]))
            for i, r in enumerate(records)
        ]
        return cls(spec, header.get("hparams", {}), entries)


def _token_row(entry: Entry) -> torch.Tensor:
    """The entry's answer tokens as the token store holds them: (L,) int64, -1 when unknown."""
    length = int(entry.values.shape[0])
    if entry.answer_ids is None:
        return torch.full((length,), -1, dtype=torch.int64)
    ids = entry.answer_ids.detach().to(device="cpu", dtype=torch.int64).reshape(-1)
    if ids.shape[0] != length:
        raise IncompatibleCodebookError(
            f"entry of fact {entry.fact_id!r} has {ids.shape[0]} answer tokens for {length} value steps")
    return ids


def entry_tensors_to_bytes(entry: Entry) -> bytes:
    """An entry's key, values and answer tokens as safetensors bytes (the daemon stores each
    entry once)."""
    tensors = {"key": entry.key, "values": entry.values}
    if entry.answer_ids is not None:
        tensors["answer_ids"] = _token_row(entry)
    if entry.reach:
        tensors["reach"] = torch.tensor([entry.reach], dtype=torch.float32)
    return save_tensors(tensors)


def entry_from_bytes(
    data: bytes, fact_id: str, answer: str, input_id: str, base_radius: float
) -> Entry:
    """Inverse of `entry_tensors_to_bytes`, with the fields stored beside the bytes."""
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises several types for damaged input
        raise IncompatibleCodebookError(f"entry tensors of fact {fact_id!r} are unreadable: {exc}") from exc
    if not {"key", "values"} <= set(tensors) <= {"key", "values", "answer_ids", "reach"}:
        raise IncompatibleCodebookError(f"entry tensors of fact {fact_id!r} hold {sorted(tensors)}")
    reach = tensors.get("reach")
    if reach is not None and reach.shape != (1,):
        raise IncompatibleCodebookError(f"entry tensors of fact {fact_id!r} hold a reach of shape {tuple(reach.shape)}")
    entry = Entry(fact_id, answer, input_id, tensors["key"], tensors["values"], base_radius,
                  tensors.get("answer_ids"), float(reach[0]) if reach is not None else 0.0)
    _token_row(entry)  # checks the token count against the values
    return entry
