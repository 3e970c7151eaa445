"""The operation-stream benchmark: the builder's determinism and structure, the file's validation,
and a small stream run end to end on the demo model through `kbctl eval-stream`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from editor.demo import DEMO_MODEL_DIR
from editor.eval.easyvqa import (
    COLOUR_HELD_OUT,
    COLOUR_QUESTION,
    COLOUR_REPHRASES,
    SHAPE_HELD_OUT,
    SHAPE_QUESTION,
    SHAPE_REPHRASES,
    load_train_images,
)
from editor.eval.errors import CaseFileError
from editor.eval.stream import StreamConfig, build_stream, load_stream, plan_stream
from kb_daemon.eval_command import eval_stream_command

CONFIG = StreamConfig(seed=0, ops=300, checkpoints=(10, 100, 300))
# 12 operations, every kind, a class fact and retracted scopes at the later checkpoints.
SMALL = StreamConfig(seed=4, ops=12, checkpoints=(4, 8), mix=(0.5, 0.2, 0.3), pool_size=30, num_untouched=12)


def _phrasings(templates: tuple[str, ...]) -> set[str]:
    """The templates with their {shape}/{colour} slot filled in every way."""
    from editor.eval.easyvqa import COLOURS, SHAPES

    return {t.format(shape=s, colour=c) for t in templates for s in SHAPES for c in COLOURS}


SHAPE_PHRASINGS = _phrasings((SHAPE_QUESTION, *SHAPE_REPHRASES, *SHAPE_HELD_OUT))
COLOUR_PHRASINGS = _phrasings((COLOUR_QUESTION, *COLOUR_REPHRASES, *COLOUR_HELD_OUT))


@pytest.fixture(scope="module")
def images():
    return load_train_images()


@pytest.fixture(scope="module")
def labels(images):
    return {im.path.name: im for im in images}


@pytest.fixture(scope="module")
def built(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("stream")
    summary = build_stream(out, CONFIG, images=images)
    return out, summary, load_stream(out / "stream.jsonl")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_seed_gives_the_same_stream_and_another_seed_another(images):
    first, pool, _ = plan_stream(images, CONFIG)
    again, pool_again, _ = plan_stream(images, CONFIG)
    other, _, _ = plan_stream(images, StreamConfig(seed=1, ops=300, checkpoints=(10, 100, 300)))
    assert first == again and pool == pool_again
    assert first != other


def test_a_shorter_stream_is_a_prefix_of_a_longer_one(images):
    """So that a quick run of the first N operations measures what the long run starts with."""
    long, long_pool, _ = plan_stream(images, CONFIG)
    short, short_pool, _ = plan_stream(images, StreamConfig(seed=0, ops=100, checkpoints=(10, 100)))
    assert short_pool == long_pool
    cut = next(i for i, r in enumerate(long) if r["type"] == "checkpoint" and r["after"] == 100) + 1
    assert short == long[:cut]


def test_mix_and_checkpoints(built):
    out, summary, stream = built
    kinds = Counter(op.kind for op in stream.ops)
    assert len(stream.ops) == 300 and set(kinds) == {"new", "supersede", "retract"}
    assert summary["mix"] == dict(kinds)
    assert kinds["new"] > kinds["supersede"] > 0 and kinds["retract"] > 0
    assert [c.after for c in stream.checkpoints] == [10, 100, 300] == summary["checkpoints"]
    assert summary["class_facts"] > 0 and summary["supersede_widening"] > 0
    assert json.loads((out / "build.json").read_text())["mix"] == summary["mix"]
    # Every checkpoint probes every live fact (own input, both held-out phrasings, I-Gen images).
    for checkpoint in stream.checkpoints:
        per_fact = Counter((p.fact_id, p.kind) for p in checkpoint.probes if p.expect == "answer")
        for fact_id in checkpoint.live:
            assert per_fact[(fact_id, "reliability")] == 1 and per_fact[(fact_id, "t_gen")] == 2
            assert per_fact[(fact_id, "i_gen")] == CONFIG.num_i_gen
        assert sum(p.kind == "untouched" for p in checkpoint.probes) == CONFIG.num_untouched


def test_operations_name_live_facts_and_probes_expect_the_live_answer(built):
    """Replayed independently of the loader: a supersede or retraction names facts live at that
    point; probes expect the answer of the fact live now, retracted ones the unedited model."""
    out, _, _ = built
    live: dict[str, dict] = {}
    retracted: set[str] = set()
    for record in _records(out / "stream.jsonl")[1:]:
        if record["type"] == "op":
            if record["op"] == "retract":
                assert record["retracts"] in live
                retracted.add(record["retracts"])
                del live[record["retracts"]]
                continue
            if record["op"] == "supersede":
                assert record["supersedes"] and all(f in live for f in record["supersedes"])
                for old in record["supersedes"]:
                    old_scope = live.pop(old)["scope"]
                    new_scope = record["scope"]
                    assert old_scope["attribute"] == new_scope["attribute"]
                    for key in ("shape", "colour"):  # the new scope contains the old one
                        assert new_scope[key] is None or new_scope[key] == old_scope[key]
            assert record["fact_id"] not in live and record["fact_id"] not in retracted
            live[record["fact_id"]] = record
        else:
            assert sorted(record["live"]) == sorted(live)
            for probe in record["probes"]:
                if probe["expect"] == "answer":
                    assert probe["answer"] == live[probe["fact"]]["fact"]["answer"]
                else:
                    assert probe["kind"] in ("retracted", "untouched")
                    assert probe["kind"] == "untouched" or probe["fact"] in retracted


def test_live_scopes_of_a_question_type_never_overlap(built):
    _, _, stream = built
    scopes: dict[str, dict] = {}
    for op in stream.ops:
        for target in op.target_ids:
            scopes.pop(target)
        if op.fact_id is not None:
            for other in scopes.values():
                if other["attribute"] == op.scope["attribute"]:
                    assert (other["shape"] and op.scope["shape"] and other["shape"] != op.scope["shape"]) or (
                        other["colour"] and op.scope["colour"] and other["colour"] != op.scope["colour"]
                    ), (op, other)
            scopes[op.fact_id] = op.scope


def test_every_image_is_a_train_image_and_probes_answer_their_labels(built, labels, images):
    out, _, stream = built
    train = {im.path.name: im.path for im in images}
    for copied in (out / "img").iterdir():
        assert copied.read_bytes() == train[copied.name].read_bytes()
    for checkpoint in stream.checkpoints:
        for item in checkpoint.probes:
            image = labels[item.probe.image.name]
            if item.kind in ("i_gen", "reliability", "t_gen", "superseded"):
                op = next(o for o in stream.ops if o.fact_id == item.fact_id)
                scope = op.scope
                assert scope["shape"] in (None, image.shape) and scope["colour"] in (None, image.colour)
            if item.kind == "retracted":
                truth = image.shape if item.probe.question in SHAPE_PHRASINGS else image.colour
                assert item.probe.answer == truth


def test_untouched_probes_are_really_untouched(built, labels):
    """No fact of the stream covers an untouched probe's input, none uses its image, and none is
    asked its question when it is a yes/no question."""
    out, _, stream = built
    facts = [op for op in stream.ops if op.fact is not None]
    used_images = {op.fact.image.name for op in facts} | {n.image.name for op in facts for n in op.fact.negatives}
    pool_images = {
        json.loads(line)["image"].split("/")[-1] for line in (out / "reference_pool.jsonl").read_text().splitlines()
    }
    fact_questions = {q for op in facts for q in (op.fact.question, *op.fact.rephrases)}
    untouched = [p for p in stream.checkpoints[-1].probes if p.kind == "untouched"]
    assert {p.kind for c in stream.checkpoints for p in c.probes if p.expect == "unedited"} <= {
        "untouched",
        "retracted",
    }
    kinds = Counter()
    for item in untouched:
        image = labels[item.probe.image.name]
        assert image.path.name not in used_images | pool_images
        question = item.probe.question
        if question in SHAPE_PHRASINGS or question in COLOUR_PHRASINGS:
            attribute = "shape" if question in SHAPE_PHRASINGS else "colour"
            kinds[attribute] += 1
            for op in facts:
                scope = op.scope
                covers = scope["shape"] in (None, image.shape) and scope["colour"] in (None, image.colour)
                assert not (scope["attribute"] == attribute and covers), (item, op)
        else:
            kinds["yes/no"] += 1
            assert item.probe.answer in ("yes", "no") and question not in fact_questions
    assert min(kinds.values()) > 0 and len(kinds) == 3


def test_a_retraction_of_a_fact_that_is_not_live_is_refused_with_its_line(built, tmp_path):
    out, _, _ = built
    lines = (out / "stream.jsonl").read_text().splitlines()
    retract_line = next(i for i, line in enumerate(lines) if json.loads(line).get("op") == "retract")
    record = json.loads(lines[retract_line])
    record["retracts"] = "f9999"
    lines[retract_line] = json.dumps(record)
    broken = out / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(CaseFileError) as error:
        load_stream(broken)
    assert (
        str(error.value)
        == f"{broken}:{retract_line + 1}: retract names 'f9999', which is not a live fact at this point"
    )
    result = CliRunner().invoke(eval_stream_command, [str(broken)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {error.value}"


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not trained yet")
def test_a_small_stream_end_to_end_on_the_demo_model(tmp_path, images):
    from editor.backbones import load_backbone, load_image
    from editor.eval.readout import Readout
    from editor.fact import normalise_answer

    summary = build_stream(tmp_path / "stream", SMALL, images=images)
    assert set(summary["mix"]) == {"new", "supersede", "retract"} and all(summary["mix"].values())
    stream_file = tmp_path / "stream" / "stream.jsonl"
    report_file, plot_file = tmp_path / "report.json", tmp_path / "stream.png"
    result = CliRunner().invoke(
        eval_stream_command, [str(stream_file), "--json", str(report_file), "--plot", str(plot_file)]
    )
    assert result.exit_code == 0, result.output
    assert "| operations | live facts |" in result.output and "targets: reliability " in result.output
    report = json.loads(report_file.read_text())
    assert plot_file.stat().st_size > 0
    assert [p["after"] for p in report["checkpoints"]] == [4, 8, 12]
    assert report["mix"] == summary["mix"] and len(report["ops"]) == 12
    assert set(report["targets_met"]) == {"reliability", "hm", "untouched_loc"}
    stream = load_stream(stream_file)
    for point, checkpoint in zip(report["checkpoints"], stream.checkpoints, strict=True):
        assert set(point["exact"]) == {"acc", "t_gen", "i_gen", "loc", "hm", "superseded", "retracted"}
        assert point["live_facts"] == point["codebook_entries"] == len(checkpoint.live)
        assert len(point["rows"]) == len(checkpoint.probes)
        assert point["probes"]["untouched"] == SMALL.num_untouched
        for row in point["rows"]:
            assert row["exact"] == (normalise_answer(row["prediction"]) == normalise_answer(row["target"]))
    # Retracted facts' probes expect what the unedited model answers, read here independently.
    backbone = load_backbone("demo")
    retracted = [
        (item, row)
        for point, checkpoint in zip(report["checkpoints"], stream.checkpoints, strict=True)
        for item, row in zip(checkpoint.probes, point["rows"], strict=True)
        if item.kind == "retracted"
    ]
    assert retracted
    readout = Readout(backbone, max_new_tokens=report["hparams"]["max_new_tokens"])
    unedited = readout.generate(
        [backbone.query(load_image(item.probe.image), item.probe.question) for item, _ in retracted]
    )
    for (item, row), answer in zip(retracted, unedited, strict=True):
        assert row["target"] == answer.text
        assert item.probe.answer is not None and row["question"] == item.probe.question
