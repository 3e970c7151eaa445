"""The indexed lookup (editor.ann) against the exact scan, on synthetic codebooks CI can afford.

Keys are clustered in 32 dimensions. `synthetic_book` gives each entry a radius of 0.3 to 1.2 times
the distance to its nearest other key, so some balls overlap and a query inside several of them must
get the nearest; `realistic_book` gives radii as a real codebook has them (0.3 to 0.9 times the
distance to the nearest key with another answer, as the overlap rule allows) with answers shared
within clusters, so some balls hold many keys. Every entry the indexed lookup fires is checked with
a float64 distance.
"""

from __future__ import annotations

import threading

import pytest
import torch

from editor.ann import IndexSettings, KeyIndex
from editor.codebook import Codebook, CodebookSpec, Entry
from editor.errors import ConfigError
from editor.radius import pairwise_distances

DIN, DOUT = 32, 4
# Index at every size; one build thread, so that the graph (and so each test's outcome) is the same
# on every run: a graph built by several threads depends on their timing.
ALWAYS = IndexSettings(threshold=0, build_threads=1)
NEVER = None  # exact scan at every size


def clustered_keys(count: int, generator: torch.Generator) -> torch.Tensor:
    centres = torch.randn(count // 20 + 1, DIN, generator=generator) * 3.0  # (C, Din)
    picks = torch.randint(0, centres.shape[0], (count,), generator=generator)  # (N,)
    return (centres[picks] + torch.randn(count, DIN, generator=generator)).contiguous()  # (N, Din)


def nearest_other(keys: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance from each key to its nearest other key, in blocks. -> (N,)"""
    nearest = torch.empty(keys.shape[0])
    unit = torch.nn.functional.normalize(keys, dim=-1)  # (N, Din)
    for start in range(0, keys.shape[0], 2048):
        if distance == "cosine":
            block = 1.0 - unit[start : start + 2048] @ unit.T  # (R, N)
        else:
            block = pairwise_distances(keys[start : start + 2048], keys, "euclidean")  # (R, N)
        block[torch.arange(block.shape[0]), torch.arange(start, start + block.shape[0])] = float("inf")
        nearest[start : start + 2048] = block.min(dim=1).values
    return nearest


def synthetic_book(count: int, distance: str, seed: int = 0) -> Codebook:
    """A codebook over shared value rows (`Codebook.from_stores`), radii given, not replayed."""
    generator = torch.Generator().manual_seed(seed)
    keys = clustered_keys(count, generator)
    radii = nearest_other(keys, distance) * (0.3 + 0.9 * torch.rand(count, generator=generator))  # (N,)
    spec = CodebookSpec("synthetic", "layer", DIN, DOUT, distance)  # type: ignore[arg-type]
    values = torch.zeros(2, DOUT)
    return Codebook.from_stores(spec, {}, [(f"f{i}", f"a{i % 7}", f"i{i}") for i in range(count)], keys,
                                values, [(0, 2)] * count, radii.tolist(), radii)


def realistic_book(count: int, seed: int = 0) -> tuple[Codebook, torch.Tensor]:
    """Cosine keys in clusters (about 20 keys each, as `clustered_keys`), each key with one of 3
    answers of its cluster; each radius 0.3 to 0.9 times the distance from its key to the nearest
    key with another answer (computed over every key), so balls of different answers never overlap
    and one ball may hold many keys. -> the codebook, each entry's cluster (N,)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(count // 20 + 1, DIN, generator=generator) * 3.0  # (C, Din)
    cluster = torch.randint(0, centres.shape[0], (count,), generator=generator)  # (N,)
    keys = (centres[cluster] + torch.randn(count, DIN, generator=generator)).contiguous()  # (N, Din)
    answer_of = cluster * 3 + torch.randint(0, 3, (count,), generator=generator)  # (N,)
    unit = torch.nn.functional.normalize(keys, dim=-1)  # (N, Din)
    nearest = torch.empty(count)
    for start in range(0, count, 2048):
        block = 1.0 - unit[start : start + 2048] @ unit.T  # (R, N)
        block[answer_of[start : start + 2048, None] == answer_of[None, :]] = float("inf")
        nearest[start : start + 2048] = block.min(dim=1).values
    radii = nearest * (0.3 + 0.6 * torch.rand(count, generator=generator))  # (N,)
    spec = CodebookSpec("synthetic", "layer", DIN, DOUT, "cosine")
    book = Codebook.from_stores(spec, {}, [(f"f{i}", f"a{int(answer_of[i])}", f"i{i}") for i in range(count)],
                                keys, torch.zeros(2, DOUT), [(0, 2)] * count, radii.tolist(), radii)
    return book, cluster


def queries_near(book: Codebook, count: int, generator: torch.Generator) -> torch.Tensor:
    """Points inside or near random entries' balls. -> (count, Din)"""
    rows = torch.randint(0, len(book), (count,), generator=generator)
    keys = book.keys[rows]  # (Q, Din)
    direction = torch.nn.functional.normalize(torch.randn(count, DIN, generator=generator), dim=-1)
    if book.spec.distance == "cosine":
        # A cosine distance d between nearby unit vectors is about angle^2 / 2.
        angle = (2.0 * book.radii[rows] * torch.rand(count, generator=generator)).sqrt()  # (Q,)
        return keys + keys.norm(dim=1, keepdim=True) * angle.unsqueeze(1) * direction
    return keys + (1.1 * book.radii[rows] * torch.rand(count, generator=generator)).unsqueeze(1) * direction


def exact_distance(book: Codebook, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Float64 distance from each query to the key of its row. -> (Q,)"""
    q, k = queries.double(), book.keys[rows].double()
    if book.spec.distance == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(q, k, dim=1)
    return (q - k).norm(dim=1)


def assert_every_fired_passes_its_radius(book: Codebook, queries: torch.Tensor, fired: torch.Tensor,
                                         distance: torch.Tensor) -> None:
    """Each fired entry passes its radius test by the float32 distance the lookup reports, and that
    distance is the float64 one up to the rounding of the codebook's float32 arithmetic: for cosine
    about 1e-7 (1 - cos), for Euclidean about 1e-7 of |q|^2 + |k|^2 in the squared distance
    (|q|^2 - 2 q.k + |k|^2, as the exact scan computes it)."""
    hit = fired >= 0
    d64 = exact_distance(book, queries[hit], fired[hit])
    radius = book.radii[fired[hit]]
    assert torch.all(distance[hit] <= radius)
    if book.spec.distance == "cosine":
        slack = torch.full_like(d64, 1e-6)
        assert torch.all(d64 <= radius.double() + slack)
        assert torch.all((distance[hit].double() - d64).abs() <= slack)
    else:
        scale = queries[hit].double().pow(2).sum(1) + book.keys[fired[hit]].double().pow(2).sum(1)
        slack = 1e-6 * scale
        assert torch.all(d64.pow(2) <= radius.double().pow(2) + slack)
        assert torch.all((distance[hit].double().pow(2) - d64.pow(2)).abs() <= slack)
    assert torch.all(torch.isinf(distance[~hit]))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_indexed_lookup_fires_what_the_exact_scan_fires(distance: str) -> None:
    book = synthetic_book(20_000, distance)
    book.configure_index(ALWAYS)
    generator = torch.Generator().manual_seed(1)
    queries = torch.cat([queries_near(book, 4000, generator),
                         torch.randn(500, DIN, generator=generator) * 4.0])  # (Q, Din)
    exact, exact_dist = book.exact_lookup(queries)
    assert uses_the_index(book)
    fired, fired_dist = torch.cat([torch.stack(book.lookup(queries[i : i + 16])) for i in range(0, len(queries), 16)],
                                  dim=1)
    fired = fired.long()
    inside = exact >= 0
    assert int(inside.sum()) >= 3500  # most queries lie inside some ball
    agreement = float((fired[inside] == exact[inside]).double().mean())
    assert agreement >= 0.999, f"indexed lookup agrees with the exact scan on {agreement:.4%} of inputs"
    assert_every_fired_passes_its_radius(book, queries, fired, fired_dist)
    # Where both fire the same entry, they report the same distance up to float32 rounding.
    same = inside & (fired == exact)
    if distance == "cosine":
        assert torch.allclose(fired_dist[same], exact_dist[same], rtol=0.0, atol=1e-6)
    else:
        scale = queries[same].pow(2).sum(1) + book.keys[exact[same]].pow(2).sum(1)  # (S,)
        assert torch.all((fired_dist[same].pow(2) - exact_dist[same].pow(2)).abs() <= 2e-6 * scale)
    assert book.memory_bytes()["index"] > 0


def test_indexed_lookup_agrees_on_realistic_radii() -> None:
    book, cluster = realistic_book(20_000)
    book.configure_index(ALWAYS)
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(0, len(book), (3000,), generator=generator)
    # Half the queries step from a key in a random direction, half towards a random other key of
    # its cluster (a new input between known ones); both by up to the key's radius.
    perturbed = queries_near(book, 3000, generator)[:1500]  # (Q/2, Din)
    members = [torch.nonzero(cluster == c).squeeze(1) for c in cluster[rows[1500:]].tolist()]
    others = torch.stack([m[torch.randint(0, len(m), (1,), generator=generator)][0] for m in members])  # (Q/2,)
    unit = torch.nn.functional.normalize(book.keys, dim=-1)
    gap = (1.0 - (unit[rows[1500:]] * unit[others]).sum(1)).clamp_min(1e-6)  # (Q/2,)
    step = (torch.rand(1500, generator=generator) * book.radii[rows[1500:]] / gap).sqrt().clamp(max=1.0)
    towards = book.keys[rows[1500:]] + step.unsqueeze(1) * (book.keys[others] - book.keys[rows[1500:]])
    queries = torch.cat([perturbed, towards])  # (Q, Din)
    exact, _ = book.exact_lookup(queries)
    assert uses_the_index(book)
    fired, distance = torch.cat([torch.stack(book.lookup(queries[i : i + 16])) for i in range(0, 3000, 16)], dim=1)
    fired = fired.long()
    inside = exact >= 0
    assert int(inside.sum()) >= 2500
    agreement = float((fired[inside] == exact[inside]).double().mean())
    assert agreement >= 0.999, f"indexed lookup agrees with the exact scan on {agreement:.4%} of inputs"
    assert not bool(((fired >= 0) & ~inside).any())  # nothing fires that the scan would not
    assert_every_fired_passes_its_radius(book, queries, fired, distance)


@pytest.mark.parametrize("scan_wide_balls", [True, False])
def test_a_wide_ball_behind_many_nearer_keys_is_found_only_by_its_exact_scan(scan_wide_balls: bool) -> None:
    """A query inside entry 0's wide ball with 40 narrow-balled keys nearer to it than key 0: the
    graph's 32 candidates cannot include entry 0, so only the wide list can fire it."""
    generator = torch.Generator().manual_seed(6)
    query = torch.nn.functional.normalize(torch.randn(DIN, generator=generator), dim=0)  # (Din,)
    side = torch.nn.functional.normalize(torch.randn(DIN, generator=generator), dim=0)
    side = torch.nn.functional.normalize(side - (side @ query) * query, dim=0)  # orthogonal to the query
    wide_key = query + 0.5 * side  # cosine distance to the query about 0.106
    near = query + 0.1 * torch.nn.functional.normalize(torch.randn(40, DIN, generator=generator), dim=-1)  # (40, Din)
    far = torch.randn(400, DIN, generator=generator)  # (400, Din) elsewhere
    keys = torch.cat([wide_key.unsqueeze(0), near, far])  # (N, Din)
    radii = torch.cat([torch.tensor([0.2]), torch.full((440,), 1e-4)])  # (N,)
    spec = CodebookSpec("synthetic", "layer", DIN, DOUT, "cosine")
    book = Codebook.from_stores(spec, {}, [(f"f{i}", "same", f"i{i}") for i in range(441)], keys,
                                torch.zeros(2, DOUT), [(0, 2)] * 441, radii.tolist(), radii)
    book.configure_index(IndexSettings(threshold=0, build_threads=1, scan_wide_balls=scan_wide_balls,
                                       min_self_recall=0.0))
    assert int(book.exact_lookup(query.unsqueeze(0))[0][0]) == 0
    fired, _ = book.lookup(query.unsqueeze(0))
    assert int(fired[0]) == (0 if scan_wide_balls else -1)
    assert book.build_index().wide_rows(book.radii).tolist() == ([0] if scan_wide_balls else [])


def test_an_index_that_cannot_find_its_own_keys_is_not_used() -> None:
    """200 copies of one key: each copy's own row is rarely among the 4 candidates its search
    returns, so the self-check fails and the lookup is the exact scan, bit for bit."""
    keys = torch.cat([torch.ones(200, DIN), torch.randn(300, DIN, generator=torch.Generator().manual_seed(7))])
    radii = torch.full((500,), 0.05)
    spec = CodebookSpec("synthetic", "layer", DIN, DOUT, "cosine")
    book = Codebook.from_stores(spec, {}, [(f"f{i}", "same", f"i{i}") for i in range(500)], keys,
                                torch.zeros(2, DOUT), [(0, 2)] * 500, radii.tolist(), radii)
    book.configure_index(IndexSettings(threshold=0, build_threads=1, neighbours=4, expansion_search=4))
    assert book.build_index().self_recall < 0.5
    queries = queries_near(book, 300, torch.Generator().manual_seed(8))
    fired, distance = book.lookup(queries)
    exact, exact_distance_ = book.exact_lookup(queries)
    assert torch.equal(fired, exact) and torch.equal(distance, exact_distance_)


def test_below_the_threshold_the_lookup_is_the_exact_scan_bit_for_bit() -> None:
    book = synthetic_book(3000, "cosine")
    book.configure_index(IndexSettings(threshold=3001, build_threads=1))
    queries = queries_near(book, 200, torch.Generator().manual_seed(2))
    fired, distance = book.lookup(queries)
    exact, exact_distance_ = book.exact_lookup(queries)
    assert torch.equal(fired, exact) and torch.equal(distance, exact_distance_)
    assert book.memory_bytes()["index"] == 0  # nothing built below the threshold


def entries_for(book: Codebook, rows: range) -> list[Entry]:
    return [book.entry(i) for i in rows]


def small_book(count: int, settings: IndexSettings | None) -> Codebook:
    """A codebook built by `add` (the overlap rule replayed), indexed under `settings`."""
    source = synthetic_book(count, "cosine", seed=3)
    book = Codebook(source.spec, {})
    book.configure_index(settings)
    for e in entries_for(source, range(count)):
        book.add(Entry(e.fact_id, e.answer, e.input_id, e.key, e.values, e.base_radius * 0.5))
    return book


def uses_the_index(book: Codebook) -> bool:
    """Whether `lookup` goes through the index (above the threshold, and the index passes its
    self-check), so that agreement with the exact scan is not agreement of the scan with itself."""
    settings = book.index_settings
    if settings is None or len(book) < settings.threshold:
        return False
    return book.build_index().self_recall >= settings.min_self_recall


def agree_on_own_keys(book: Codebook) -> None:
    """Every entry's own key lies inside its ball: indexed and exact must fire the same entry."""
    fired, distance = book.lookup(book.keys)
    exact, _ = book.exact_lookup(book.keys)
    assert torch.equal(fired, exact)
    assert_every_fired_passes_its_radius(book, book.keys, fired, distance)


def test_crossing_the_threshold_switches_between_scan_and_index() -> None:
    book = small_book(400, IndexSettings(threshold=401, build_threads=1))
    assert book.memory_bytes()["index"] == 0
    agree_on_own_keys(book)
    source = synthetic_book(401, "cosine", seed=4)
    extra = source.entry(400)
    book.add(Entry("extra", extra.answer, "extra-input", extra.key, extra.values, 0.01))
    assert uses_the_index(book)
    agree_on_own_keys(book)  # 401 entries: through the index
    assert book.memory_bytes()["index"] > 0
    book.remove("extra")
    agree_on_own_keys(book)  # back to 400: the exact scan, and the index is let go
    assert book.memory_bytes()["index"] == 0


@pytest.mark.parametrize("scan_wide_balls", [False, True])
def test_retract_and_supersede_keep_the_index_in_step(scan_wide_balls: bool) -> None:
    book = small_book(600, IndexSettings(threshold=0, build_threads=1, scan_wide_balls=scan_wide_balls))
    assert uses_the_index(book)
    agree_on_own_keys(book)
    built = book.build_index()
    gone = book.entry(123)
    book.remove(gone.fact_id)
    assert book.build_index() is built  # the removal deleted one label; no rebuild
    assert gone.fact_id not in book.fact_ids
    fired, _ = book.lookup(gone.key.unsqueeze(0))
    assert int(fired[0]) == -1 or book.fact_id(int(fired[0])) != gone.fact_id
    agree_on_own_keys(book)

    # Supersede: a new fact for entry 200's input, at a new key, replaces it.
    old = book.entry(200)
    new_key = old.key + 0.3 * old.key.norm() * torch.nn.functional.normalize(torch.ones(DIN), dim=0)
    superseded, _ = book.add(Entry("replacement", "new answer", old.input_id, new_key, old.values, 0.001))
    assert superseded == [old.fact_id]
    assert book.build_index() is built
    fired, _ = book.lookup(new_key.unsqueeze(0))
    assert book.fact_id(int(fired[0])) == "replacement"
    agree_on_own_keys(book)


def test_index_is_rebuilt_when_dropped_corrupted_or_stale() -> None:
    book = small_book(500, ALWAYS)
    first = book.build_index()
    book.drop_index()
    assert book.memory_bytes()["index"] == 0
    agree_on_own_keys(book)
    second = book.build_index()
    assert second is not first

    # Corrupted: labels deleted behind the codebook's back leave the graph short of keys.
    second._index.remove([0, 1, 2])
    agree_on_own_keys(book)
    assert book.build_index() is not second

    # Stale: removals beyond rebuild_fraction of the live keys.
    book.configure_index(IndexSettings(threshold=0, build_threads=1, rebuild_fraction=0.01))
    third = book.build_index()
    for fact_id in book.fact_ids[:6]:
        book.remove(fact_id)
    assert third.stale
    agree_on_own_keys(book)
    assert book.build_index() is not third


def test_copies_never_share_an_index() -> None:
    book = small_book(300, ALWAYS)
    built = book.build_index()
    twin = book.copy()
    assert twin.index_settings == book.index_settings
    assert twin.memory_bytes()["index"] == 0
    twin.remove(twin.fact_ids[0])
    agree_on_own_keys(twin)
    assert book.build_index() is built and len(built) == len(book) == 300
    agree_on_own_keys(book)


def test_index_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="expansion_search"):
        IndexSettings(neighbours=64, expansion_search=32)
    with pytest.raises(ConfigError, match="threshold"):
        IndexSettings(threshold=-1)
    with pytest.raises(ConfigError, match="min_self_recall"):
        IndexSettings(min_self_recall=1.5)


class GatedIndex(KeyIndex):
    """A KeyIndex whose build waits for `gate`, so that a test can change the codebook while a
    background build is under way; counts the builds begun."""

    gate = threading.Event()
    builds = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        type(self).builds += 1
        assert type(self).gate.wait(60)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> type[GatedIndex]:
    gated_index = type("Gated", (GatedIndex,), {"gate": threading.Event(), "builds": 0})
    monkeypatch.setattr("editor.codebook.KeyIndex", gated_index)
    return gated_index


BACKGROUND = IndexSettings(threshold=0, build_threads=1, background=True)


def test_a_background_build_scans_until_its_index_is_in(gated: type[GatedIndex]) -> None:
    book = small_book(600, BACKGROUND)
    agree_on_own_keys(book)  # starts the build, answers by the exact scan meanwhile
    assert book.memory_bytes()["index"] == 0 and gated.builds == 1
    agree_on_own_keys(book)  # a build under way is not started again
    assert gated.builds == 1
    gated.gate.set()
    built = book.wait_for_index(60)
    assert built is not None and len(built) == 600 and uses_the_index(book)
    assert book.build_index() is built  # in use as built: not rebuilt
    agree_on_own_keys(book)


def test_entries_added_during_a_background_build_are_indexed_when_it_ends(gated: type[GatedIndex]) -> None:
    book = small_book(500, BACKGROUND)
    book.lookup(book.keys[:1])  # the build begins over 500 keys and waits at the gate
    source = synthetic_book(520, "cosine", seed=5)
    for i in range(500, 520):
        e = source.entry(i)
        book.add(Entry(f"late-{i}", e.answer, f"late-input-{i}", e.key, e.values, e.base_radius * 0.5))
    gated.gate.set()
    built = book.wait_for_index(60)
    assert built is not None and len(built) == len(book) == 520
    # The late entries fire through the index's candidates, not through a scan.
    rows = built.candidates(book.keys[500:])
    assert all(500 + i in rows[i].tolist() for i in range(20))
    agree_on_own_keys(book)


def test_a_background_build_overtaken_by_a_removal_is_dropped_and_begun_again(gated: type[GatedIndex]) -> None:
    book = small_book(500, BACKGROUND)
    book.lookup(book.keys[:1])
    book.remove(book.fact_ids[7])  # rows move: the index being built cannot be caught up
    gated.gate.set()
    assert book.wait_for_index(60) is None and gated.builds == 1
    agree_on_own_keys(book)  # scans, and begins a new build over the 499 keys
    built = book.wait_for_index(60)
    assert gated.builds == 2 and built is not None and len(built) == 499
    agree_on_own_keys(book)


def test_a_failed_background_build_leaves_the_scan_and_is_not_retried(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    attempts = []

    def failing(*args: object, **kwargs: object) -> KeyIndex:
        attempts.append(1)
        raise MemoryError("no room for the graph")

    monkeypatch.setattr("editor.codebook.KeyIndex", failing)
    book = small_book(300, BACKGROUND)
    with caplog.at_level("WARNING", logger="editor.codebook"):
        agree_on_own_keys(book)
        assert book.wait_for_index(60) is None
        agree_on_own_keys(book)
        assert book.wait_for_index(60) is None
    assert len(attempts) == 1
    assert sum("no room for the graph" in r.getMessage() for r in caplog.records) == 1


def test_settings_changed_during_a_background_build_drop_its_index(gated: type[GatedIndex]) -> None:
    book = small_book(400, BACKGROUND)
    book.lookup(book.keys[:1])
    book.configure_index(IndexSettings(threshold=0, build_threads=1, background=True, connectivity=8))
    gated.gate.set()
    assert book.wait_for_index(60) is None  # the thread's index was built under the old settings
    book.lookup(book.keys[:1])
    built = book.wait_for_index(60)
    assert built is not None and built.settings.connectivity == 8


EXIT_MID_BUILD = """
import logging, sys, time
import torch
from editor.ann import IndexSettings
from editor.codebook import Codebook, CodebookSpec, Entry
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spec = CodebookSpec("m", "l", 256, 4, "cosine")
keys = torch.randn(20000, 256, generator=torch.Generator().manual_seed(0))
book = Codebook.with_radii(spec, {}, [Entry(f"f{i}", "a", f"i{i}", keys[i], torch.zeros(1, 4), 0.01)
                                      for i in range(len(keys))], [0.01] * len(keys))
book.configure_index(IndexSettings(threshold=0, build_threads=1, background=True))
book.lookup(keys[:2])
time.sleep(0.3)
print("building at exit:", book.wait_for_index(0) is None, flush=True)
"""


def test_a_process_exits_cleanly_in_the_middle_of_a_background_build() -> None:
    # usearch aborts the process (SIGABRT) when it exits while a thread is inside an insert; the
    # build stops at its next chunk instead, and is not waited for to the end.
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", EXIT_MID_BUILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "building at exit: True" in done.stdout
    assert "built in the background" not in done.stderr
