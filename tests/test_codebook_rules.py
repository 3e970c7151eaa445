"""Codebook, radius and configuration rules on hand-made keys (no model needed)."""

from __future__ import annotations

import pytest
import torch

from editor.codebook import Codebook, CodebookSpec, Entry
from editor.config import EditConfig
from editor.errors import ConfigError, EditorError, IncompatibleCodebookError, InvalidFactError
from editor.fact import Fact, Negative, normalise_answer
from editor.radius import choose_radius

SPEC = CodebookSpec("model-x", "layers.1.fc2", 2, 3, "euclidean")


def entry(fact_id: str, x: float, y: float, radius: float, answer: str, input_id: str | None = None) -> Entry:
    values = torch.full((2, 3), float(len(fact_id)))
    return Entry(fact_id, answer, input_id or fact_id, torch.tensor([x, y]), values, radius)


def radii(book: Codebook) -> dict[str, float]:
    return {e.fact_id: float(r) for e, r in zip(book.entries, book.radii, strict=True)}


def test_disjoint_entries_keep_their_radii():
    book = Codebook(SPEC)
    book.add(entry("a", 0, 0, 1.0, "cat"))
    _, split = book.add(entry("b", 5, 0, 1.0, "dog"))
    assert split == [] and radii(book) == {"a": 1.0, "b": 1.0}


def test_overlap_with_different_answer_splits_both_to_half_the_distance():
    book = Codebook(SPEC)
    book.add(entry("a", 0, 0, 1.0, "cat"))
    _, split = book.add(entry("b", 1, 0, 1.0, "dog"))
    assert split == ["a"]
    assert radii(book) == {"a": 0.5, "b": 0.5}
    from editor.radius import resolve_overlaps

    assert resolve_overlaps(book.keys, torch.ones(2), ["cat", "dog"], "euclidean").cut_by == ((1,), (0,))


def test_overlap_with_same_answer_does_not_split_and_both_balls_cover():
    book = Codebook(SPEC)
    book.add(entry("a", 0, 0, 1.0, "cat"))
    _, split = book.add(entry("b", 1, 0, 1.0, "cat"))
    assert split == [] and radii(book) == {"a": 1.0, "b": 1.0}
    fired, _ = book.lookup(torch.tensor([[1.9, 0.0], [-0.9, 0.0], [0.6, 0.0]]))
    assert fired.tolist() == [1, 0, 1]  # nearest ball that contains the query


def test_lookup_misses_outside_every_ball():
    book = Codebook(SPEC)
    book.add(entry("a", 0, 0, 1.0, "cat"))
    fired, distance = book.lookup(torch.tensor([[3.0, 0.0], [0.5, 0.0]]))
    assert fired.tolist() == [-1, 0]
    assert distance[0] == float("inf") and distance[1] == pytest.approx(0.5)


def test_retract_restores_exactly_the_radii_of_the_codebook_built_without_the_fact():
    with_b = Codebook(SPEC)
    for e in (entry("a", 0, 0, 1.0, "cat"), entry("b", 1, 0, 1.0, "dog"), entry("c", 0.5, 3, 2.8, "cow"),
              entry("d", -3, 0, 1.5, "cat")):
        with_b.add(e)
    without_b = Codebook(SPEC)
    for e in (entry("a", 0, 0, 1.0, "cat"), entry("c", 0.5, 3, 2.8, "cow"), entry("d", -3, 0, 1.5, "cat")):
        without_b.add(e)
    assert radii(with_b) != radii(without_b)
    with_b.remove("b")
    assert radii(with_b) == radii(without_b)
    assert with_b.to_bytes() == without_b.to_bytes()


def test_new_fact_for_the_same_input_supersedes_the_old_entry():
    book = Codebook(SPEC)
    book.add(entry("old", 0, 0, 1.0, "cat", input_id="img1|q"))
    book.add(entry("other", 4, 0, 1.0, "dog"))
    superseded, _ = book.add(entry("new", 0.1, 0, 1.0, "kitty", input_id="img1|q"))
    assert superseded == ["old"]
    assert book.fact_ids == ["other", "new"]


def test_unknown_fact_and_duplicate_fact_ids_are_refused():
    book = Codebook(SPEC)
    book.add(entry("a", 0, 0, 1.0, "cat"))
    with pytest.raises(EditorError, match="no entry for fact 'zzz'"):
        book.remove("zzz")
    with pytest.raises(EditorError, match="already in the codebook"):
        book.add(entry("a", 9, 9, 1.0, "dog", input_id="elsewhere"))
    assert book.fact_ids == ["a"]


def test_shapes_are_checked():
    book = Codebook(SPEC)
    bad_key = Entry("a", "cat", "a", torch.zeros(5), torch.zeros(1, 3), 1.0)
    with pytest.raises(IncompatibleCodebookError, match="does not fit layer input size 2"):
        book.add(bad_key)
    bad_values = Entry("a", "cat", "a", torch.zeros(2), torch.zeros(1, 4), 1.0)
    with pytest.raises(IncompatibleCodebookError, match="do not fit layer output size 3"):
        book.add(bad_values)


def test_bytes_round_trip_and_damage():
    book = Codebook(SPEC, {"alpha": 0.2})
    book.add(entry("a", 0, 0, 1.0, "cat"))
    book.add(entry("bb", 1, 0, 1.0, "dog"))
    blob = book.to_bytes()
    again = Codebook.from_bytes(blob)
    assert again.to_bytes() == blob
    assert again.fact_ids == ["a", "bb"] and radii(again) == radii(book)
    assert torch.equal(again.entries[1].values, book.entries[1].values)
    assert Codebook.from_bytes(Codebook(SPEC).to_bytes()).fact_ids == []
    for damaged in (b"", b"not safetensors at all", blob[: len(blob) // 2]):
        with pytest.raises(IncompatibleCodebookError):
            Codebook.from_bytes(damaged)


def test_paper_radius_formula_with_one_positive_and_one_negative():
    choice = choose_radius(torch.tensor([0.2]), torch.tensor([1.0]), alpha=0.1, initial_radius=9.0)
    assert choice.fallback is None
    assert choice.radius == pytest.approx(0.9 * 1.0 + 0.1 * 0.2)


def test_several_samples_put_every_positive_inside_and_every_negative_outside():
    choice = choose_radius(torch.tensor([0.1, 0.4, 0.3]), torch.tensor([2.0, 0.9, 1.5]), 0.5, 9.0)
    assert choice.fallback is None
    assert 0.4 < choice.radius < 0.9
    assert choice.radius == pytest.approx(0.5 * 0.9 + 0.5 * 0.4)


def test_infeasible_samples_fall_back_and_say_why():
    # One negative (0.3) is nearer than two positives (0.5, 0.6).
    choice = choose_radius(torch.tensor([0.1, 0.5, 0.6]), torch.tensor([0.3, 2.0]), 0.2, 9.0)
    assert choice.fallback is not None and "1 of 2 negatives" in choice.fallback
    # Balanced accuracy (the key counts as a positive): boundary 0.1 scores 2/4 + 2/2, boundary 0.6
    # scores 4/4 + 1/2: a tie, so the smaller one wins, and the radius sits between 0.1 and the
    # next negative out (0.3).
    assert choice.radius == pytest.approx(0.8 * 0.3 + 0.2 * 0.1)
    wider = choose_radius(torch.tensor([0.1, 0.5, 0.6]), torch.tensor([0.3, 2.0, 3.0]), 0.2, 9.0)
    # Now 0.6 scores 4/4 + 2/3 against 2/4 + 3/3: generality wins.
    assert wider.radius == pytest.approx(0.8 * 2.0 + 0.2 * 0.6)


def test_missing_samples_have_documented_fallbacks():
    assert choose_radius(torch.zeros(0), torch.zeros(0), 0.2, 1.5).radius == 1.5
    only_negative = choose_radius(torch.zeros(0), torch.tensor([1.0]), 0.2, 9.0)
    assert only_negative.fallback is None and only_negative.radius == pytest.approx(0.8)
    only_positive = choose_radius(torch.tensor([0.5]), torch.zeros(0), 0.2, 9.0)
    assert "no negatives" in only_positive.fallback and only_positive.radius == pytest.approx(0.6)


def test_config_rejects_unknown_and_invalid_values():
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) alpah; valid: alpha, "):
        EditConfig.from_dict({"alpah": 0.3})
    with pytest.raises(ConfigError, match="distance must be 'euclidean' or 'cosine', got 'l2'"):
        EditConfig(distance="l2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        EditConfig(alpha=1.5)
    grace = EditConfig.from_dict({"method": "grace"})
    assert (grace.value_init, grace.lr, grace.early_stop) == ("cold", 1.0, False)


def test_fact_validation():
    with pytest.raises(InvalidFactError, match="question is empty"):
        Fact(None, "   ", "x")
    with pytest.raises(InvalidFactError, match="answer is empty"):
        Fact(None, "q?", "\n")
    with pytest.raises(InvalidFactError, match="100,000 characters long; the limit is 2,000"):
        Fact(None, "q" * 100_000, "x")
    with pytest.raises(InvalidFactError, match="a negative needs an image, a question, or both"):
        Negative()
    fact = Fact(None, "  what is it? ", " Kitty ", rephrases=["what's it?"], negatives=[{"question": "x?"}])
    assert (fact.question, fact.answer, fact.rephrases) == ("what is it?", "Kitty", ("what's it?",))
    assert fact.negatives == (Negative(question="x?"),)
    assert normalise_answer("  Aqua   MARINE ") == "aqua marine"


def test_incremental_arrivals_equal_a_full_replay():
    generator = torch.Generator().manual_seed(3)
    book, reported = Codebook(SPEC), []
    for i in range(40):
        x, y = (torch.rand(2, generator=generator) * 4).tolist()
        reported.append(book.add(entry(f"e{i}", x, y, 0.3 + (i % 5) * 0.2, ["cat", "dog", "cow"][i % 3]))[1])
    replayed = Codebook(SPEC, {}, list(book.entries))
    assert torch.equal(replayed.radii, book.radii)
    # What each add reported (the entries it cut and those that cut it) is what the full replay
    # says about that arrival: i cut j when i is in j's cuts; j cut i when j is among i's earlier cuts.
    from editor.radius import resolve_overlaps

    cut_by = resolve_overlaps(book.keys, torch.tensor([e.base_radius for e in book.entries]),
                              [e.answer for e in book.entries], "euclidean").cut_by
    expected = [[f"e{j}" for j in range(i) if i in cut_by[j] or j in cut_by[i]] for i in range(40)]
    assert reported == expected
    assert sum(map(len, reported)) > 10 and float(book.radii.min()) < 0.3  # the split rule really ran


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_replay_over_candidate_pairs_equals_the_rule_over_all_pairs(distance):
    from editor.radius import _answer_codes, arrive, resolve_overlaps

    generator = torch.Generator().manual_seed(7)
    n, width = 600, 16
    keys = torch.randn(n, width, generator=generator) * 3 + 10  # large norms: mm rounding matters
    base = torch.rand(n, generator=generator) * (12.0 if distance == "euclidean" else 0.05)
    answers = [f"a{i % 7}" for i in range(n)]
    fast = resolve_overlaps(keys, base, answers, distance)
    # The rule itself, against every earlier entry, one arrival at a time.
    radii, cut_by, codes = base.clone(), [[] for _ in range(n)], _answer_codes(answers)
    for i in range(1, n):
        arrive(keys, radii, codes, i, distance, cut_by)
    assert torch.equal(fast.radii, radii)
    assert fast.cut_by == tuple(tuple(c) for c in cut_by)
    assert sum(map(len, cut_by)) > 100  # many real splits


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_lookup_finds_the_nearest_ball_that_contains_the_query(distance):
    from editor.radius import pairwise_distances

    generator = torch.Generator().manual_seed(11)
    spec = CodebookSpec("model-x", "layers.1.fc2", 32, 3, distance)
    keys = torch.randn(300, 32, generator=generator) + 5
    radius = 2.0 if distance == "euclidean" else 0.01
    book = Codebook(spec, {}, [Entry(f"e{i}", "same", f"i{i}", keys[i], torch.zeros(1, 3), radius)
                               for i in range(300)])
    queries = torch.cat([keys[:50] + 0.05 * torch.randn(50, 32, generator=generator),
                         torch.randn(50, 32, generator=generator) * 20])
    found, dist = book.lookup(queries)
    exact = pairwise_distances(queries, book.keys, distance)  # (B, N)
    inside = exact <= book.radii.unsqueeze(0)
    for row in range(queries.shape[0]):
        if inside[row].any():
            nearest = torch.where(inside[row], exact[row], torch.inf).argmin()
            assert int(found[row]) == int(nearest)
            assert abs(float(dist[row]) - float(exact[row, nearest])) < 1e-3
        else:
            assert int(found[row]) == -1 and dist[row] == float("inf")
    assert int((found >= 0).sum()) >= 50


def test_the_codebook_holds_its_tensors_in_two_stores_and_hands_out_views():
    generator = torch.Generator().manual_seed(5)
    spec = CodebookSpec("model-x", "layers.1.fc2", 8, 3, "cosine")
    book, handed_in = Codebook(spec), []
    for i in range(40):
        values = torch.randn(1 + i % 4, 3, generator=generator)
        handed_in.append(Entry(f"e{i}", f"answer {i}", f"i{i}", torch.randn(8, generator=generator), values, 0.01))
        book.add(handed_in[-1])
    book.compact()
    entries = book.entries
    # Every key is a row of one key store and every entry's values a run of rows of one value
    # store; none of them is the tensor that was handed in.
    assert len({e.key.untyped_storage().data_ptr() for e in entries}) == 1
    assert len({e.values.untyped_storage().data_ptr() for e in entries}) == 1
    assert book.keys.untyped_storage().data_ptr() == entries[0].key.untyped_storage().data_ptr()
    for mine, theirs in zip(entries, handed_in, strict=True):
        assert mine.values.untyped_storage().data_ptr() != theirs.values.untyped_storage().data_ptr()
        assert torch.equal(mine.key, theirs.key) and torch.equal(mine.values, theirs.values)
    assert [book.fact_id(i) for i in range(40)] == book.fact_ids == [f"e{i}" for i in range(40)]
    assert torch.equal(book.values_of(7), handed_in[7].values)
    # Compacted: the stores hold exactly the entries' rows.
    assert book.keys.untyped_storage().nbytes() == 40 * 8 * 4
    assert entries[0].values.untyped_storage().nbytes() == sum(e.values.numel() for e in handed_in) * 4
    # Superseding and retracting rebuild the stores; the views follow.
    book.add(Entry("new", "answer new", "i3", torch.randn(8, generator=generator), torch.ones(2, 3), 0.01))
    book.remove("e5")
    assert "e3" not in book.fact_ids and "e5" not in book.fact_ids and book.fact_ids[-1] == "new"
    assert torch.equal(book.values_of(len(book) - 1), torch.ones(2, 3))
    assert Codebook.from_bytes(book.to_bytes()).to_bytes() == book.to_bytes()


def test_ids_are_matched_whole_not_as_substrings():
    # An input id that is a prefix, suffix or run of others supersedes only itself.
    book = Codebook(SPEC)
    for fact_id, input_id, x in [("f1", "i1", 0), ("f11", "i11", 5), ("f2", "1i1", 10), ("f3", "i", 15)]:
        book.add(entry(fact_id, x, 0, 1.0, "cat", input_id))
    superseded, _ = book.add(entry("f4", 20, 0, 1.0, "dog", "i1"))
    assert superseded == ["f1"] and book.fact_ids == ["f11", "f2", "f3", "f4"]
    assert book.index_of("f2") == 1
    with pytest.raises(EditorError, match="no entry for fact 'f'"):
        book.index_of("f")
    with pytest.raises(EditorError, match="already in the codebook"):
        book.add(entry("f2", 30, 0, 1.0, "cow", "other"))


def _ctypes_array_types() -> int:
    import ctypes
    import gc

    array_type = type(ctypes.c_ubyte * 1)  # the metaclass of every ctypes array type
    return sum(1 for o in gc.get_objects() if type(o) is array_type)


def test_saving_codebooks_of_new_sizes_makes_no_lasting_types():
    # safetensors.torch.save makes (and ctypes keeps) a ctypes array type per distinct byte length;
    # a daemon's codebook has a new length at every save.
    from safetensors.torch import save as torch_save

    from editor.codebook import entry_tensors_to_bytes, save_tensors

    before = _ctypes_array_types()
    book = Codebook(SPEC)
    for i in range(40):
        book.add(entry(f"f{i}", 100 + i, 0, 1.0, f"answer {i}", f"i{i}"))
        blob = book.to_bytes()
        entry_tensors_to_bytes(Entry(f"g{i}", "a", "j", torch.zeros(8), torch.zeros(i + 1, 3), 1.0))
    assert _ctypes_array_types() == before
    assert Codebook.from_bytes(blob).fact_ids == book.fact_ids
    # Byte for byte what safetensors.torch.save writes (entry blobs are stored under their sha256).
    tensors = {"k": torch.randn(3, 8), "n": torch.tensor([1, 2], dtype=torch.int64), "e": torch.zeros(0, 3)}
    assert save_tensors(tensors, {"m": "x"}) == torch_save(tensors, metadata={"m": "x"})
    bf16 = {"b": torch.randn(4, dtype=torch.bfloat16)}  # numpy has no bfloat16: the torch path
    assert save_tensors(bf16) == torch_save(bf16)
    # Both paths take non-contiguous tensors (made contiguous once, before either path).
    for dtype in (torch.float32, torch.bfloat16):
        wide = torch.randn(3, 5).to(dtype)
        assert save_tensors({"t": wide.T}) == torch_save({"t": wide.T.contiguous()})
    # The check can fail: the torch path does leave a type per new length.
    for n in range(1000, 1005):
        torch_save({"x": torch.zeros(n)})
    assert _ctypes_array_types() >= before + 5


def test_memory_bytes_counts_the_rows_in_use_and_every_record_once():
    book = Codebook(SPEC)
    assert book.memory_bytes()["tensors"] == 0
    for i in range(5):
        book.add(entry(f"f{i}", 10.0 * i, 0, 1.0, "cat"))
    sizes = book.memory_bytes()
    # Keys (5 x 2) + values (5 x 2 x 3) + radii (5) + reaches (5) float32 and the value rows'
    # tokens (5 x 2) int64, not the stores' spare rows.
    assert sizes["tensors"] == (5 * 2 + 5 * 2 * 3 + 5 + 5) * 4 + 5 * 2 * 8
    assert book._key_store.shape[0] > 5  # spare capacity exists and is not counted
    # A long answer and a long id are counted once each, however many records hold them.
    long_answer, long_id = "a" * 10_000, "f" * 20_000
    book.add(entry(long_id, 100.0, 0, 1.0, long_answer))
    grown = book.memory_bytes()["records"] - sizes["records"]
    assert 30_000 < grown < 31_000
    book.add(entry("g", 200.0, 0, 1.0, long_answer))
    again = book.memory_bytes()["records"] - sizes["records"] - grown
    assert 0 < again < 1_000
    book.compact()
    assert book.memory_bytes()["tensors"] == (7 * 2 + 7 * 2 * 3 + 7 + 7) * 4 + 7 * 2 * 8


def reaching(fact_id: str, x: float, radius: float, answer: str, reach: float) -> Entry:
    base = entry(fact_id, x, 0, radius, answer)
    return Entry(base.fact_id, base.answer, base.input_id, base.key, base.values, radius, None, reach)


def test_overlap_rule_keeps_each_entrys_reach_and_halves_the_room_left():
    book = Codebook(SPEC)
    book.add(reaching("a", 0, 4.0, "cat", 1.5))
    book.add(reaching("b", 5, 4.0, "dog", 0.5))
    # Distance 5: a keeps 1.5, b keeps 0.5, the 3 left is split evenly; halving would give 2.5 each,
    # which leaves a's own rephrasing at 1.5 inside but would not if its reach were above 2.5.
    assert radii(book) == pytest.approx({"a": 3.0, "b": 2.0})
    book.add(reaching("c", 8, 2.4, "emu", 2.4))  # b (reach 0.5) is cut to make room for c's reach
    assert radii(book) == pytest.approx({"a": 3.0, "b": 0.5 + (3 - 0.5 - 2.4) / 2, "c": 2.4})


def test_overlap_rule_shares_the_distance_by_reach_when_the_reaches_collide():
    book = Codebook(SPEC)
    book.add(reaching("a", 0, 4.0, "cat", 3.0))
    book.add(reaching("b", 5, 4.0, "dog", 4.0))
    assert radii(book) == pytest.approx({"a": 5 * 3 / 7, "b": 5 * 4 / 7})


def test_overlap_rule_with_no_reach_is_grace_halving_and_replays_the_same():
    from editor.radius import resolve_overlaps

    zero, reached = Codebook(SPEC), Codebook(SPEC)
    for i, (x, answer) in enumerate([(0, "cat"), (1.5, "dog"), (2.5, "cat"), (4.0, "emu")]):
        zero.add(entry(f"e{i}", x, 0, 2.0, answer))
        reached.add(reaching(f"e{i}", x, 2.0, answer, 0.3 * i))
    assert radii(zero) == pytest.approx({"e0": 0.75, "e1": 0.5, "e2": 0.5, "e3": 0.75})
    for book in (zero, reached):
        replay = resolve_overlaps(book.keys, torch.full((4,), 2.0), [e.answer for e in book.entries], "euclidean",
                                  book.reaches)
        assert torch.equal(replay.radii, book.radii)
        restored = Codebook.from_bytes(book.to_bytes())
        assert torch.equal(restored.radii, book.radii) and torch.equal(restored.reaches, book.reaches)


def random_entries(count: int, seed: int, prefix: str = "f") -> list[Entry]:
    generator = torch.Generator().manual_seed(seed)
    return [Entry(f"{prefix}{i}", f"answer {i % 4}", f"in-{prefix}{i}", torch.randn(2, generator=generator),
                  torch.randn(1 + i % 4, 3, generator=generator), 0.5 + i % 3,
                  torch.arange(1 + i % 4, dtype=torch.int64) + i, float(i % 2) / 10) for i in range(count)]


@pytest.mark.parametrize("removed", [[3], list(range(0, 30, 2))])  # dead rows kept / the value store packed
def test_a_spliced_codebook_equals_one_built_from_its_entries_and_leaves_the_base_alone(removed):
    base = Codebook(SPEC, {"alpha": 1}, random_entries(30, 0))
    base_bytes, base_radii = base.to_bytes(), base.radii.clone()
    arriving = random_entries(3, 1, prefix="new")
    # The new order: the kept entries with the arriving ones at the front, in the middle and at the end.
    kept = [i for i in range(30) if i not in removed]
    order = [-1, *kept[:5], -2, *kept[5:], -3]
    radii = torch.rand(len(order))
    spliced = base.spliced(order, arriving, radii)
    expected_entries = [arriving[-i - 1] if i < 0 else base.entry(i) for i in order]
    expected = Codebook.with_radii(SPEC, {"alpha": 1}, expected_entries, radii.tolist())
    assert spliced.to_bytes() == expected.to_bytes()
    assert torch.equal(spliced.radii, expected.radii) and torch.equal(spliced.reaches, expected.reaches)
    assert [spliced.answer_ids_of(i).tolist() for i in range(len(order))] == \
        [expected.answer_ids_of(i).tolist() for i in range(len(order))]
    queries = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) * 2
    assert all(torch.equal(a, b) for a, b in zip(spliced.lookup(queries), expected.lookup(queries), strict=True))
    dead_rows = spliced._value_rows - sum(int(spliced.values_of(i).shape[0]) for i in range(len(spliced)))
    assert (dead_rows > 0) == (len(removed) == 1)  # many dead rows: the store was packed
    spliced.add(entry("later", 9, 9, 0.1, "z"))  # appends after the spliced rows
    assert spliced.values_of(len(spliced) - 1).tolist() == entry("later", 9, 9, 0.1, "z").values.tolist()
    assert base.to_bytes() == base_bytes and torch.equal(base.radii, base_radii)


def test_a_splice_that_misplaces_an_entry_is_refused():
    base = Codebook(SPEC, {}, random_entries(4, 0))
    arriving = random_entries(2, 1, prefix="new")
    with pytest.raises(IncompatibleCodebookError):
        base.spliced([0, 1, -1], arriving, torch.ones(3))  # arriving entry 2 has no place
    with pytest.raises(IncompatibleCodebookError):
        base.spliced([0, 9, -1, -2], arriving, torch.ones(4))  # no entry 9
    with pytest.raises(IncompatibleCodebookError):
        base.spliced([0, -1, -2], arriving, torch.ones(4))  # a radius too many
