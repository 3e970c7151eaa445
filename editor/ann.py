"""An approximate nearest-neighbour index over a codebook's keys, for codebooks too large to scan.

The index (usearch's HNSW graph) only proposes candidates: for each query it returns the
`neighbours` keys nearest under a compressed copy of the keys, and the codebook then applies each
candidate's own radius test with the exact float32 distance (`Codebook.lookup`). Radii are not
something the index knows, so it never decides on its own that an entry fires.

The index is derived data: built from the codebook's keys, held in memory next to them, never
saved or loaded, and rebuilt whenever it is missing or stale. It keeps its own labels (one per
key it was given, never reused) and maps them to codebook rows, so removing an entry deletes one
label and shifts the rows after it instead of rebuilding the graph; a graph that has lost more
than `IndexSettings.rebuild_fraction` of its keys this way is rebuilt (`stale`).

Two guards against what a graph search misses. After each build the index searches for a fixed
sample of its own keys (`self_recall`); a codebook scans exactly when too few are found, which is
what happens on keys spread evenly in many dimensions. And, when `IndexSettings.scan_wide_balls` is
set, entries whose radius exceeds the distance to their `neighbours`-th nearest key are tested for
every query beside the graph's candidates: a query inside such a ball may have more than
`neighbours` keys nearer than the ball's own (off by default: radii as the overlap rule leaves them
make no such entries in bench/lookup_index.py's codebooks, and finding them doubles the build).

Cosine keys are held as int8 (usearch normalises each key and scales it to [-127, 127]: about
Din bytes per entry plus the graph), Euclidean keys as float16 (int8 would lose their norms).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from editor.config import Distance
from editor.errors import ConfigError


@dataclass(frozen=True)
class IndexSettings:
    """When a codebook uses the index, and how the HNSW graph is built and searched."""

    # Codebooks with fewer entries are scanned exactly (one matrix product against all keys, which
    # costs less than a graph search up to about this size on the 100M model; bench/lookup_index.py).
    threshold: int = 20_000
    # Candidates per query whose radius test is applied exactly. A query inside some ball is
    # almost always nearest to that ball's key, so a few dozen cover overlapping neighbours too.
    neighbours: int = 32
    connectivity: int = 16  # graph edges per node (HNSW's M)
    expansion_add: int = 128  # candidate list while inserting (ef_construction)
    # Candidate list while searching (ef), at least `neighbours`. 128 rather than 64: 100% against
    # 99.80% of in-ball queries on 100k topic keys, at about twice the time per lookup (2.9 ms at
    # batch 1 there, against 54 ms for the exact scan; bench/README.md).
    expansion_search: int = 128
    # Threads used to build the graph; 0 uses every core.
    build_threads: int = 0
    # Rebuild once removed keys exceed this share of the live ones (deleted nodes stay in the
    # graph as routing points, and searches through many of them get slower and less exact).
    rebuild_fraction: float = 0.25
    # Also test, for every query, each entry whose radius exceeds the distance from its key to its
    # `neighbours`-th nearest other key ("wide" balls): a query inside such a ball can have more
    # than `neighbours` keys nearer than the ball's own, so the graph's candidates may miss it.
    scan_wide_balls: bool = False
    # After each build, this many keys (chosen by a fixed seed) are searched for: the share found
    # among their own `neighbours` candidates is the index's `self_recall`. A codebook whose index
    # finds fewer than `min_self_recall` of them scans exactly instead (keys spread so evenly in
    # many dimensions that a graph search cannot narrow down, bench/README.md). A guard against
    # gross failure, not a measure of 99.9%: 1,000 keys cannot tell 99.7% from 99.9% (an index
    # that found 99.7% of its own topic keys fired the exact scan's entry on 100% of queries).
    self_check_keys: int = 1000
    min_self_recall: float = 0.99
    # Build the graph in a background thread while lookups scan exactly, and use it once it is
    # built (for long-lived processes: a worker, a server). False: the first lookup that needs the
    # index waits for its build (minutes at 100k entries of 2,048 floats on two cores).
    background: bool = False

    def __post_init__(self) -> None:
        for name in ("threshold", "build_threads"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("neighbours", "connectivity", "expansion_add"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.expansion_search < self.neighbours:
            raise ConfigError(
                f"expansion_search ({self.expansion_search}) must be at least neighbours ({self.neighbours})"
            )
        if not 0.0 <= self.min_self_recall <= 1.0:
            raise ConfigError(f"min_self_recall must be between 0 and 1, got {self.min_self_recall}")
        if int(self.self_check_keys) < 0:
            raise ConfigError(f"self_check_keys must be 0 or more, got {self.self_check_keys}")
        if not self.rebuild_fraction > 0:
            raise ConfigError(f"rebuild_fraction must be positive, got {self.rebuild_fraction}")


# Keys inserted per usearch call in a background build, between checks of its stop event (about a
# second at 1M keys of 2,048 floats on two cores: the longest a stopping process waits for it).
BUILD_CHUNK = 512


class BuildStopped(Exception):
    """A background build saw its stop event (the process is exiting)."""


def _slices(n: int, stop: threading.Event | None, doing: str) -> Iterator[slice]:
    """Rows 0..n-1 as one slice, or with `stop` as slices of `BUILD_CHUNK`, raising
    `BuildStopped` before any slice once `stop` is set."""
    step = n if stop is None else BUILD_CHUNK
    for start in range(0, n, step):
        if stop is not None and stop.is_set():
            raise BuildStopped(f"index build stopped {doing} after {start} of {n} keys")
        yield slice(start, start + step)


def _index_dtype(distance: Distance) -> str:
    return "i8" if distance == "cosine" else "f16"


def _as_index_vectors(keys: torch.Tensor, distance: Distance) -> np.ndarray:
    """keys (N, Din) -> float32 array for usearch (which casts to its storage dtype). Euclidean keys
    are clamped to float16's range so that no key becomes infinite."""
    array = keys.detach().float().cpu().numpy()
    if distance == "euclidean":
        array = np.clip(array, -65000.0, 65000.0)
    return np.ascontiguousarray(array, dtype=np.float32)


class KeyIndex:
    """HNSW graph over the rows of a codebook's key matrix; answers candidate rows per query.

    Not shared between codebooks: each `Codebook` builds its own, and its mutating methods
    (`append`, `remove_rows`) are called only by the codebook that owns it.
    """

    def __init__(self, keys: torch.Tensor, distance: Distance, settings: IndexSettings,
                 stop: threading.Event | None = None) -> None:
        """Build over keys (N, Din). With `stop` (a background build), the keys go in in chunks of
        `BUILD_CHUNK` and the build raises `BuildStopped` once `stop` is set: a process must not
        exit while usearch is inserting (it aborts)."""
        from usearch.index import Index  # imported here: only codebooks above the threshold need it

        n, din = keys.shape
        self.distance: Distance = distance
        self.settings = settings
        self.input_size = int(din)
        self._index = Index(
            ndim=int(din),
            metric="cos" if distance == "cosine" else "l2sq",
            dtype=_index_dtype(distance),
            connectivity=settings.connectivity,
            expansion_add=settings.expansion_add,
            expansion_search=settings.expansion_search,
        )
        self._label_of_row = np.arange(n, dtype=np.int64)  # (N,) the label of codebook row i
        self._row_of_label = np.arange(n, dtype=np.int64)  # (labels,) its row, or -1 once removed
        self._removed = 0
        # (N,) distance from key i to its `neighbours`-th nearest other key under the compressed
        # copy (inf where fewer exist); an entry whose radius exceeds it is scanned exactly.
        self._kth_distance = np.full(n, np.inf, dtype=np.float32)
        if n:
            vectors = _as_index_vectors(keys, distance)  # (N, Din)
            for rows in _slices(n, stop, "inserting"):
                self._index.add(self._label_of_row[rows], vectors[rows], threads=settings.build_threads)
            if settings.scan_wide_balls:
                self._kth_distance = self._kth_distances(vectors, settings.build_threads, stop)
        self.self_recall = self._self_recall(keys)

    def _self_recall(self, keys: torch.Tensor) -> float:
        """The share of `self_check_keys` sampled keys (N, Din) found among their own candidates
        (1.0 for an empty index or no sample)."""
        n = keys.shape[0]
        count = min(n, self.settings.self_check_keys)
        if count == 0:
            return 1.0
        rows = np.sort(np.random.default_rng(0).choice(n, size=count, replace=False))  # (S,)
        found = self.candidates(keys[torch.from_numpy(rows)]).numpy()  # (S, K)
        return float((found == rows[:, None]).any(axis=1).mean())

    def __len__(self) -> int:
        return int(self._label_of_row.shape[0])

    @property
    def stale(self) -> bool:
        """True when the graph holds so many removed keys that it should be rebuilt."""
        return self._removed > self.settings.rebuild_fraction * max(len(self), 1)

    def consistent_with(self, num_entries: int, input_size: int, distance: Distance) -> bool:
        """Whether the index still describes a codebook of this size, width and distance."""
        return (
            len(self) == num_entries
            and len(self._index) == num_entries
            and self.input_size == input_size
            and self.distance == distance
        )

    def _distances(self, raw: np.ndarray) -> np.ndarray:
        """usearch's distances (1 - cos, or squared Euclidean) in the codebook's own measure."""
        return raw if self.distance == "cosine" else np.sqrt(np.maximum(raw, 0.0))

    def _kth_distances(self, vectors: np.ndarray, threads: int, stop: threading.Event | None) -> np.ndarray:
        """vectors (N, Din), the indexed keys in row order -> (N,) distance from each to its
        `neighbours`-th nearest other key (the first match is the key itself)."""
        k = self.settings.neighbours + 1
        n = vectors.shape[0]
        kth = np.full(n, np.inf, dtype=np.float32)
        if n < k:
            return kth
        from usearch.index import BatchMatches

        for rows in _slices(n, stop, "in its wide-ball search"):
            chunk = vectors[rows]  # (C, Din)
            matches = self._index.search(chunk, k, threads=threads)
            # Several queries give a BatchMatches; a last chunk of one row, a Matches.
            assert isinstance(matches, BatchMatches) or chunk.shape[0] == 1
            distances = np.asarray(matches.distances, dtype=np.float32).reshape(chunk.shape[0], -1)  # (C, k)
            counts = np.asarray(getattr(matches, "counts", [distances.shape[1]])).reshape(-1)  # (C,)
            full = counts >= k
            kth[rows][full] = self._distances(distances[full, k - 1])
        return kth

    def append(self, key: torch.Tensor) -> None:
        """Index key (Din,) as the codebook's new last row. Its nearest keys' `neighbours`-th
        distances shrink to at most their distance to it, so their wide test stays conservative."""
        label = int(self._row_of_label.shape[0])
        vector = _as_index_vectors(key.unsqueeze(0), self.distance)[0]  # (Din,)
        kth = np.inf
        if self.settings.scan_wide_balls and len(self) >= self.settings.neighbours:
            matches = self._index.search(vector, self.settings.neighbours, threads=1)
            labels = np.asarray(matches.keys, dtype=np.int64)
            distances = self._distances(np.asarray(matches.distances, dtype=np.float32))
            if labels.shape[0] >= self.settings.neighbours:
                kth = float(distances[-1])
            rows = self._row_of_label[labels]
            rows, distances = rows[rows >= 0], distances[rows >= 0]
            self._kth_distance[rows] = np.minimum(self._kth_distance[rows], distances)
        self._index.add(label, vector, threads=1)
        self._row_of_label = np.append(self._row_of_label, len(self))
        self._label_of_row = np.append(self._label_of_row, label)
        self._kth_distance = np.append(self._kth_distance, np.float32(kth))

    def remove_rows(self, rows: list[int]) -> None:
        """Forget codebook rows `rows` (indices before the removal); later rows move up."""
        if not rows:
            return
        labels = self._label_of_row[rows]
        self._index.remove(labels)
        self._row_of_label[labels] = -1
        self._label_of_row = np.delete(self._label_of_row, rows)
        self._kth_distance = np.delete(self._kth_distance, rows)  # the rest only grow: still conservative
        self._row_of_label[self._label_of_row] = np.arange(len(self), dtype=np.int64)
        self._removed += len(rows)

    def wide_rows(self, radii: torch.Tensor) -> np.ndarray:
        """Rows whose radius (N,) exceeds the distance to their `neighbours`-th nearest key. -> (W,)"""
        if not self.settings.scan_wide_balls:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(radii.detach().cpu().numpy() > self._kth_distance).astype(np.int64)

    def candidates(self, queries: torch.Tensor, radii: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of the `neighbours` keys nearest each query under the index's compressed copy,
        plus, given the codebook's radii (N,), every wide row (`wide_rows`); ascending by row, -1
        where fewer were found. queries (B, Din) -> (B, K + W) int64."""
        count = min(self.settings.neighbours, max(len(self), 1))
        vectors = _as_index_vectors(queries, self.distance)  # (B, Din)
        matches = self._index.search(vectors, count, threads=1)
        # One query gives a `Matches` of the found labels only; several a padded `BatchMatches`.
        labels = np.asarray(matches.keys, dtype=np.int64).reshape(queries.shape[0], -1)  # (B, K)
        counts = getattr(matches, "counts", None)
        found_per_query = np.asarray([labels.shape[1]] if counts is None else counts).reshape(-1, 1)  # (B, 1)
        found = np.arange(labels.shape[1])[None, :] < found_per_query  # (B, K)
        inside = found & (labels >= 0) & (labels < self._row_of_label.shape[0])
        rows = np.where(inside, self._row_of_label[np.where(inside, labels, 0)], -1)  # (B, K)
        if radii is not None:
            wide = self.wide_rows(radii)  # (W,)
            rows = np.concatenate([rows, np.broadcast_to(wide, (rows.shape[0], wide.shape[0]))], axis=1)
        # Missing results last, the rest ascending: the codebook's tie rule picks the lowest row.
        rows = np.sort(np.where(rows < 0, np.iinfo(np.int64).max, rows), axis=1)
        return torch.from_numpy(np.where(rows == np.iinfo(np.int64).max, -1, rows))

    def memory_bytes(self) -> int:
        """Bytes held by the graph and its compressed keys, plus the label maps."""
        return (
            int(self._index.memory_usage)
            + self._label_of_row.nbytes
            + self._row_of_label.nbytes
            + self._kth_distance.nbytes
        )
