"""A local, derived cache of versions' codebooks: one packed safetensors file per version.

Materialising a version from the database reads, checks and decodes one blob per entry (about
45 us each, bench/README.md). The cache keeps a version's codebook (stacked keys and values, the
values' answer tokens, the entries' ids, answers, input ids, base and effective radii and reaches)
in one file under `$KB_HOME/cache/codebooks/`, read in one go, so a warm load reads one version row from the
database and one file. The database stays the only source of truth. A file is used only when

* its version key equals the one computed from the version's row: SHA-256 of the model's id, name
  and codebook spec and the version's number, entry count, creation time and `content_sha256`
  (the ordered fact ids, blob digests and base radii of its entries). A committed version never
  changes (its spans' radii included), so this row names its content; another database, or a
  database restored from a backup that recreated version N, gives another key;
* its layout is exactly what this module writes (names, dtypes, shapes, offsets that tile the
  data; a truncated or padded file fails here);
* its payload digest matches: SHA-256 of each 64 MiB chunk of the data (tensors and the records'
  JSON), hashed in threads, then SHA-256 of the chunk digests (a flipped byte fails here).

Anything else (missing, stale, truncated, corrupted, foreign) is logged, deleted and rebuilt from
the database by the caller. Nothing is unpickled. The writer takes the records and radii from the
database rows of the version, not from the codebook. Writes go to a temporary file renamed into
place, so a reader sees a whole file or none; a crash before the rename leaves a temporary file
that `prune` deletes once it is an hour old. Each model keeps the `keep_versions` most recently
written files. Deleting the directory (`clear`) is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.orm import Session

from kb_daemon.models import Model, Version, as_utc
from kb_daemon.snapshots import (
    ManifestRow,
    Materialised,
    collector_paused,
    get_version,
    materialise_changes,
    materialise_from,
)

if TYPE_CHECKING:  # pragma: no cover
    import editor
    from kb_daemon.config import Settings

logger = logging.getLogger(__name__)

FORMAT_NAME = "kb-daemon-codebook-cache"
FORMAT_VERSION = "2"
CHUNK_BYTES = 64 << 20  # the payload digest's chunk: hashed in parallel, each a few tens of ms
TEMPORARY_MAX_AGE_SECONDS = 3600.0
# Where a version's codebook came from (see `load_version`).
LoadSource = Literal["changes", "reuse", "cache", "database"]
_DTYPES = {"I64": 8, "F64": 8, "F32": 4, "U8": 1}
# name -> (dtype, rank), in file order (8-byte types first, so every tensor is aligned)
_TENSORS = {"entry_ids": ("I64", 1), "value_lengths": ("I64", 1), "answer_ids": ("I64", 1),
            "base_radii": ("F64", 1), "radii": ("F32", 1), "reaches": ("F32", 1), "keys": ("F32", 2),
            "values": ("F32", 2), "records": ("U8", 1)}


def version_key(model: Model, version: Version) -> str:
    """What a cache file must have been written for (see the module docstring)."""
    created = as_utc(version.created_at)
    record = {"model_id": model.id, "model": model.name, "spec": model.spec, "number": version.number,
              "num_entries": version.num_entries, "content_sha256": version.content_sha256,
              "created_at": created.isoformat() if created is not None else None}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def payload_digest(data: memoryview, threads: int | None = None) -> str:
    """SHA-256 of the SHA-256 of each CHUNK_BYTES chunk of `data` (hashlib releases the GIL on
    large buffers, so the chunks are hashed in parallel)."""
    chunks = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
    workers = max(1, min(len(chunks), threads or os.cpu_count() or 1, 16))
    if workers == 1:
        digests = [hashlib.sha256(chunk).digest() for chunk in chunks]
    else:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), chunks))
    return hashlib.sha256(b"".join(digests)).hexdigest()


class _ChunkedDigest:
    """`payload_digest` computed over pieces given one after another (the writer's stream)."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), CHUNK_BYTES - self._filled)
            self._current.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == CHUNK_BYTES:
                self._digests.append(self._current.digest())
                self._current, self._filled = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        digests = self._digests + ([self._current.digest()] if self._filled else [])
        return hashlib.sha256(b"".join(digests)).hexdigest()


class CacheMiss(Exception):
    """A cache file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    """What a cache file is written from: a codebook's tensors captured at one moment (views,
    not copies: the codebook never rewrites the rows of entries it holds)."""

    model_name: str
    model_id: int
    spec: dict[str, Any]
    number: int
    fact_ids: list[str]
    keys: Any  # torch.Tensor (N, Din) float32
    values: list[Any]  # per entry, torch.Tensor (L, Dout) float32
    answer_ids: list[Any]  # per entry, torch.Tensor (L,) int64, -1 where unknown
    reaches: Any  # torch.Tensor (N,) float32


def capture(model: Model, number: int, codebook: editor.Codebook) -> Snapshot | None:
    """The tensors of `codebook` (version `number` of `model`) for `CodebookCache.write`; None
    when they are not float32 on the CPU (the cache holds exactly what a load returns)."""
    import torch

    keys = codebook.keys
    if keys.dtype != torch.float32 or keys.device.type != "cpu" or model.spec is None:
        return None
    with collector_paused():
        values = [codebook.values_of(i) for i in range(len(codebook))]
        answer_ids = [codebook.token_rows_of(i) for i in range(len(codebook))]
    if any(v.dtype != torch.float32 or v.device.type != "cpu" for v in values[:1]):
        return None
    return Snapshot(model.name, model.id, dict(model.spec), number, codebook.fact_ids, keys.detach(), values,
                    answer_ids, codebook.reaches.detach().clone())


class CodebookCache:
    """Packed codebook files of `keep_versions` recent versions per model under `root`."""

    def __init__(self, root: Path, keep_versions: int = 2) -> None:
        self.root = root
        self.keep_versions = keep_versions

    @classmethod
    def for_settings(cls, settings: Settings) -> CodebookCache:
        """The cache every process of a home shares: $KB_HOME/cache/codebooks, keeping
        `settings.codebook_cache_versions` versions per model (0: the cache is not used)."""
        return cls(settings.home / "cache" / "codebooks", settings.codebook_cache_versions)

    def model_dir(self, model_id: int, model_name: str) -> Path:
        return self.root / f"{model_id}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model_name)}"

    def path(self, model: Model, number: int) -> Path:
        return self.model_dir(model.id, model.name) / f"version-{number}.safetensors"

    # ----- reading ------------------------------------------------------------------------
    def load(self, session: Session, model: Model, number: int) -> Materialised | None:
        """Version `number`'s codebook from its cache file, checked against the version's row;
        None (the file logged and deleted when it exists) when it cannot be used."""
        path = self.path(model, number)
        if not path.exists() or model.spec is None:
            return None
        key = version_key(model, get_version(session, model, number))
        try:
            with collector_paused():
                return self._read(path, model, key)
        except (CacheMiss, OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("codebook cache %s not used (%s); loading version %d from the database",
                           path, exc, number)
            path.unlink(missing_ok=True)
            return None

    def _read(self, path: Path, model: Model, key: str) -> Materialised:
        import torch

        from editor.codebook import Codebook, CodebookSpec

        assert model.spec is not None
        data = _read_file(path)
        view = memoryview(data)
        if len(data) < 8:
            raise CacheMiss("truncated: no header")
        header_size = int.from_bytes(data[:8], "little")
        if header_size > len(data) - 8:
            raise CacheMiss("truncated: header longer than the file")
        try:
            header = json.loads(bytes(view[8 : 8 + header_size]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheMiss(f"unreadable header: {exc}") from exc
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise CacheMiss("not a codebook cache file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheMiss(f"format version {meta.get('format_version')!r}, this reads {FORMAT_VERSION}")
        if meta.get("version_key") != key:
            raise CacheMiss("stale: written for another version row")
        din, dout = int(model.spec["input_size"]), int(model.spec["output_size"])
        payload = view[8 + header_size :]
        layout = _check_layout(header, len(payload), din, dout)
        if payload_digest(payload) != meta.get("payload_sha256"):
            raise CacheMiss("corrupted: payload digest differs")
        base = 8 + header_size
        dtypes = {"I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "U8": torch.uint8}

        def tensor(name: str) -> Any:
            begin, end, shape = layout[name]
            dtype = _TENSORS[name][0]
            count = (end - begin) // _DTYPES[dtype]
            if count == 0:
                return torch.zeros(shape, dtype=dtypes[dtype])
            return torch.frombuffer(data, dtype=dtypes[dtype], count=count, offset=base + begin).view(shape)

        records = json.loads(bytes(payload[layout["records"][0] : layout["records"][1]]))
        fact_ids, answers, input_ids = records["fact_ids"], records["answers"], records["input_ids"]
        n = layout["keys"][2][0]
        if not len(fact_ids) == len(answers) == len(input_ids) == n:
            raise CacheMiss("records do not match the tensors")
        lengths = tensor("value_lengths").tolist()
        if any(length < 1 for length in lengths):
            raise CacheMiss("an entry with no value rows")
        starts = [0, *accumulate(lengths)][:n]
        codebook = Codebook.from_stores(
            CodebookSpec(**model.spec), dict(model.hparams), list(zip(fact_ids, answers, input_ids, strict=True)),
            tensor("keys"), tensor("values"), list(zip(starts, lengths, strict=True)),
            tensor("base_radii").tolist(), tensor("radii"), tensor("answer_ids"), tensor("reaches"))
        return Materialised(codebook, tensor("entry_ids").tolist(), 0)

    # ----- writing ------------------------------------------------------------------------
    def write(self, snapshot: Snapshot, version: Version, rows: Sequence[ManifestRow], model: Model) -> Path:
        """Write `snapshot` of `version` atomically, with the records and radii of `rows` (the
        version's rows, which must name the captured entries in order), then prune."""
        import numpy

        if [row.fact_id for row in rows] != snapshot.fact_ids:
            raise CacheMiss(f"version {snapshot.number} holds other entries than the captured codebook")
        if any(row.radius is None for row in rows):
            raise CacheMiss(f"version {snapshot.number} has spans without radii (replayed when loaded)")
        arrays = {
            "entry_ids": numpy.array([row.entry_id for row in rows], dtype="<i8"),
            "value_lengths": numpy.array([v.shape[0] for v in snapshot.values], dtype="<i8"),
            "base_radii": numpy.array([row.base_radius for row in rows], dtype="<f8"),
            "radii": numpy.array([row.radius for row in rows], dtype="<f4"),
            "reaches": snapshot.reaches.contiguous().numpy().astype("<f4"),
        }
        records = json.dumps({"fact_ids": snapshot.fact_ids, "answers": [row.answer for row in rows],
                              "input_ids": [row.input_id for row in rows]}).encode()
        n, din = snapshot.keys.shape
        total_rows = int(arrays["value_lengths"].sum())
        dout = int(snapshot.spec["output_size"])

        def raw(array: Any) -> memoryview:  # the bytes of a C-contiguous array, no copy
            return memoryview(array.reshape(-1).view(numpy.uint8))

        pieces: dict[str, list[memoryview]] = {name: [raw(array)] for name, array in arrays.items()}
        pieces["keys"] = [raw(snapshot.keys.contiguous().numpy())]
        pieces["values"] = [raw(v.contiguous().numpy()) for v in snapshot.values]
        pieces["answer_ids"] = [raw(t.contiguous().numpy()) for t in snapshot.answer_ids]
        pieces["records"] = [memoryview(records)]
        shapes = {"entry_ids": [n], "value_lengths": [n], "base_radii": [n], "radii": [n], "reaches": [n],
                  "keys": [n, din], "values": [total_rows, dout], "answer_ids": [total_rows],
                  "records": [len(records)]}
        header: dict[str, Any] = {}
        digest, offset = _ChunkedDigest(), 0
        for name, (dtype, _rank) in _TENSORS.items():
            size = sum(len(piece) for piece in pieces[name])
            header[name] = {"dtype": dtype, "shape": shapes[name], "data_offsets": [offset, offset + size]}
            offset += size
            for piece in pieces[name]:
                digest.update(piece)
        header["__metadata__"] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                  "version_key": version_key(model, version), "payload_sha256": digest.hexdigest(),
                                  "model": snapshot.model_name, "version": str(snapshot.number), "entries": str(n)}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        folder = self.model_dir(snapshot.model_id, snapshot.model_name)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"version-{snapshot.number}.safetensors"
        temporary = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(temporary, "wb") as out:
                out.write(len(encoded).to_bytes(8, "little"))
                out.write(encoded)
                for name in _TENSORS:
                    for piece in pieces[name]:
                        out.write(piece)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        self.prune(snapshot.model_id, snapshot.model_name)
        return path

    def prune(self, model_id: int, model_name: str) -> None:
        """Keep the `keep_versions` most recently written files of the model; delete temporary
        files older than an hour (left by a process that died while writing)."""
        folder = self.model_dir(model_id, model_name)
        if not folder.is_dir():
            return
        now = time.time()
        files = []
        for item in folder.iterdir():
            try:
                stat = item.stat()
            except FileNotFoundError:
                continue
            if item.name.endswith(".tmp"):
                if now - stat.st_mtime > TEMPORARY_MAX_AGE_SECONDS:
                    item.unlink(missing_ok=True)
            elif item.suffix == ".safetensors":
                files.append((stat.st_mtime_ns, item))
        for _mtime, item in sorted(files, reverse=True)[self.keep_versions :]:
            item.unlink(missing_ok=True)

    def clear(self) -> int:
        """Delete every cache file (of every model); return how many."""
        removed = 0
        if self.root.is_dir():
            for item in self.root.glob("*/*"):
                if item.is_file():
                    item.unlink(missing_ok=True)
                    removed += 1
        return removed


def _read_file(path: Path) -> bytearray:
    """The whole file in one buffer (its tensors are views of it; no mapping that a truncation by
    another process could turn into SIGBUS)."""
    with open(path, "rb", buffering=0) as source:
        size = os.fstat(source.fileno()).st_size
        data = bytearray(size)
        view, filled = memoryview(data), 0
        while filled < size:
            got = source.readinto(view[filled:])
            if not got:
                raise CacheMiss(f"truncated while reading ({filled} of {size} bytes)")
            filled += got
    return data


def _check_layout(header: dict[str, Any], payload_bytes: int, din: int,
                  dout: int) -> dict[str, tuple[int, int, list[int]]]:
    """Each tensor's (begin, end, shape), checked against the layer sizes and each other; their
    byte ranges must tile the payload exactly (a truncated or padded file fails)."""
    if set(header) != set(_TENSORS):
        raise CacheMiss(f"unexpected tensors {sorted(header)}")
    layout: dict[str, tuple[int, int, list[int]]] = {}
    for name, (dtype, rank) in _TENSORS.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != dtype:
            raise CacheMiss(f"{name}: not {dtype}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) != rank or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise CacheMiss(f"{name}: malformed shape or offsets")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPES[dtype]:
            raise CacheMiss(f"{name}: {end - begin} bytes for shape {shape}")
        layout[name] = (begin, end, shape)
    n = layout["keys"][2][0]
    if (layout["keys"][2][1] != din or layout["values"][2][1] != dout
            or any(layout[name][2] != [n] for name in ("entry_ids", "value_lengths", "base_radii", "radii", "reaches"))
            or layout["answer_ids"][2] != [layout["values"][2][0]]):
        raise CacheMiss(f"shapes do not fit {n} entries of layer {din} -> {dout}")
    spans = sorted((begin, end) for begin, end, _shape in layout.values())
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)) \
            or spans[-1][1] != payload_bytes:
        raise CacheMiss(f"truncated or padded: tensors cover {spans[-1][1]} of {payload_bytes} payload bytes")
    return layout


def load_version(session: Session, model: Model, number: int, cache: CodebookCache | None,
                 held: editor.Codebook | None = None, *,
                 base: tuple[int, Materialised] | None = None) -> tuple[Materialised, LoadSource]:
    """Version `number`'s codebook and where it came from, trying in turn:

    - "changes", when `base` (a version number and that version's codebook with its entry row
      ids) is given: only the spans that differ between the two versions and the arriving
      entries' blobs are read, and the codebook is spliced (`snapshots.materialise_changes`);
    - "cache", when its cache file checks out (one version row and one file read; about a fifth
      of the cost of a database load at 10k entries, bench/README.md);
    - "reuse", when `held` (a codebook equal to a stored version of this model) is given: the
      version's rows are read, but only the blobs of entries `held` lacks;
    - "database": every row and blob read and checked."""
    if base is not None:
        changed = materialise_changes(session, model, number, base[1], base[0])
        if changed is not None:
            return changed, "changes"
    if cache is not None and cache.keep_versions > 0:
        loaded = cache.load(session, model, number)
        if loaded is not None:
            return loaded, "cache"
    if held is not None:
        with collector_paused():
            known = {held.fact_id(i): held.entry(i) for i in range(len(held))}
        return materialise_from(session, model, number, {}, known_facts=known), "reuse"
    return materialise_from(session, model, number, {}), "database"
