"""An operation stream over the demo model's concepts: build it from the easy-VQA TRAIN split, run it.

A stream is what a knowledge base lives through: facts arrive, get corrected, get withdrawn. Its
operations, applied in order to one editor:

* ``new``: a fact on a scope no live fact of the same question type covers, a class scope
  ("every circle is now a disc") or an instance scope (one colour of one shape);
* ``supersede``: a fact declared as replacing live facts: a re-edit of one fact's scope with
  another answer, taught from another image of the scope, or a class fact over a class scope that
  replaces the instance facts inside it (``"widens": true``);
* ``retract``: a live fact withdrawn; its inputs answer as the unedited model again.

The concept space is small (3 shapes x 8 colours, two question types), so the live facts of a
question type cover disjoint scopes and their number is bounded (at most one per cell: 16 shape
and 18 colour cells here). One shape is never in the scope of a shape fact and two colours never in
the scope of a colour fact: the shape question on images of that shape, the colour question on
images of those colours, and yes/no questions are the inputs no fact ever touches (the untouched
locality probes).

Operations are drawn with the weights of `StreamConfig.mix` (new, supersede, retract). A drawn
``new`` takes a class scope with chance `StreamConfig.class_share` (a supersede when live facts lie
inside it), otherwise a free instance scope; when none is free it becomes a ``retract`` (a full
knowledge base makes room before it grows), so once the space fills, new facts and retractions
even out. A retracted fact's scope takes no new fact for `StreamConfig.cooldown` operations, so
that checkpoints find retracted scopes to probe. `build.json` records the realised mix.

Images are split once, seeded, into three disjoint parts: the editor's reference pool, operation
images (facts' own images and their negatives) and probe images (in-scope and untouched probes).
The first N operations of a longer stream (and its pool) are the stream of N operations.

The file (JSON Lines, image paths relative to it) holds ``op`` records in order and, after the
operation it follows, a ``checkpoint`` record with every probe to score there and what it expects:

* ``reliability`` / ``t_gen`` / ``i_gen`` of every live fact: its answer (its own input; the two
  held-out phrasings on its image; other images of its scope);
* ``superseded``: a superseded fact's own input, expecting the live fact that replaced it;
* ``retracted``: the probes of a retracted fact whose scope no live fact covers, expecting the
  unedited model's answer;
* ``untouched``: inputs no fact ever touches, expecting the unedited model's answer.

The TEST split is never read. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from editor.eval.cases import FactSpec, NegativeSpec, Probe, write_reference_pool
from editor.eval.easyvqa import (
    COLOUR_HELD_OUT,
    COLOUR_NAMES,
    COLOUR_REPHRASES,
    COLOURS,
    SHAPE_HELD_OUT,
    SHAPE_NAMES,
    SHAPE_REPHRASES,
    SHAPES,
    Attribute,
    FactScope,
    TrainImage,
    _phrasings,
    _Picker,
    _Planner,
    _question,
    _true_answer,
    load_train_images,
)
from editor.eval.errors import CaseFileError, EvalError

logger = logging.getLogger(__name__)

STREAM_FORMAT_VERSION = 1
REPORT_FORMAT_VERSION = 1
OpKind = Literal["new", "supersede", "retract"]
OP_KINDS: tuple[OpKind, ...] = ("new", "supersede", "retract")
PROBE_KINDS = ("reliability", "t_gen", "i_gen", "superseded", "retracted", "untouched")
EXPECTS_UNEDITED = frozenset({"retracted", "untouched"})
DEFAULT_CHECKPOINTS = (10, 100, 300, 1000)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class StreamConfig:
    seed: int = 0
    ops: int = 1000
    checkpoints: tuple[int, ...] = DEFAULT_CHECKPOINTS  # those above `ops` are dropped; `ops` is added
    mix: tuple[float, float, float] = (0.75, 0.15, 0.10)  # weights of new, supersede, retract
    class_share: float = 0.15  # chance that a drawn "new" takes a class scope (replacing facts inside it)
    cooldown: int = 25  # operations during which a retracted fact's scope takes no new fact
    num_negatives: int = 2
    num_i_gen: int = 3
    num_untouched: int = 96  # a third shape questions, a third colour questions, a third yes/no
    pool_size: int = 200  # reference-pool items (hard-negative candidates), from operation images
    probe_share: float = 0.5  # share of the images kept for probes

    def __post_init__(self) -> None:
        if self.ops < 1:
            raise EvalError(f"ops must be at least 1, got {self.ops}")
        if any(c < 1 for c in self.checkpoints):
            raise EvalError(f"checkpoints must be positive, got {list(self.checkpoints)}")
        if len(self.mix) != 3 or any(w < 0 for w in self.mix) or self.mix[0] <= 0:
            raise EvalError(f"mix must be three weights (new > 0, supersede, retract), got {list(self.mix)}")
        if not 0 <= self.class_share <= 1 or not 0 < self.probe_share < 1:
            raise EvalError("class_share must lie in [0, 1] and probe_share in (0, 1)")
        for name in ("num_negatives", "num_i_gen", "num_untouched", "pool_size", "cooldown"):
            if getattr(self, name) < 0:
                raise EvalError(f"{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def checkpoint_list(self) -> list[int]:
        return sorted({c for c in self.checkpoints if c <= self.ops} | {self.ops})


@dataclass
class _Live:
    """A fact of the stream while the builder plans it."""

    fact_id: str
    scope: FactScope
    edit: TrainImage
    i_gen: list[TrainImage]
    predecessors: list[TrainImage] = field(default_factory=list)  # edit images of facts it replaced


def _held_out(attribute: Attribute) -> tuple[str, ...]:
    return SHAPE_HELD_OUT if attribute == "shape" else COLOUR_HELD_OUT


def _rephrases(attribute: Attribute) -> tuple[str, ...]:
    return SHAPE_REPHRASES if attribute == "shape" else COLOUR_REPHRASES


def _overlaps(a: FactScope, b: FactScope) -> bool:
    """Whether two scopes of the same question type share a (shape, colour) cell."""
    return (
        a.attribute == b.attribute
        and (a.shape is None or b.shape is None or a.shape == b.shape)
        and (a.colour is None or b.colour is None or a.colour == b.colour)
    )


class _StreamPlanner:
    def __init__(self, images: Sequence[TrainImage], config: StreamConfig) -> None:
        self.config = config
        self.rng = random.Random(f"stream-{config.seed}")
        ordered = list(images)
        self.rng.shuffle(ordered)
        cut = int(len(ordered) * config.probe_share)
        self.probe_images, self.op_images = ordered[:cut], ordered[cut:]
        # The reference pool comes first, apart from the facts' images, so that the first N
        # operations of a longer stream are the stream of N operations, pool included.
        pooled = self.op_images[: config.pool_size]
        self.op_images = self.op_images[config.pool_size :]
        self.pool = [
            Probe(im.path, *self.rng.choice(sorted(im.questions))) for im in sorted(pooled, key=lambda im: im.image_id)
        ]
        self.reserved_shape = self.rng.choice(SHAPES)
        self.reserved_colours = tuple(sorted(self.rng.sample(COLOURS, 2)))
        self.probe_picker = _Picker(self.probe_images, self.rng)
        self.edit_queue: dict[tuple[str, str], list[TrainImage]] = {}
        for im in self.op_images:
            self.edit_queue.setdefault((im.shape, im.colour), []).append(im)
        self.scopes = self._candidate_scopes()
        self.live: dict[str, _Live] = {}
        self.retracted: list[_Live] = []
        self.retracted_at: dict[str, int] = {}
        self.count = 0
        self.number = 0

    def _candidate_scopes(self) -> list[FactScope]:
        """Every scope a fact may take; answers are chosen per fact."""
        shapes = [s for s in SHAPES if s != self.reserved_shape]
        colours = [c for c in COLOURS if c not in self.reserved_colours]
        scopes = [FactScope("shape", s, None, "") for s in shapes]
        scopes += [FactScope("shape", s, c, "") for s in shapes for c in COLOURS]
        scopes += [FactScope("colour", None, c, "") for c in colours]
        scopes += [FactScope("colour", s, c, "") for c in colours for s in SHAPES]
        return scopes

    def answer_for(self, attribute: Attribute, avoid: str | None) -> str:
        names = SHAPE_NAMES if attribute == "shape" else COLOUR_NAMES
        taken = {f.scope.answer for f in self.live.values() if f.scope.attribute == attribute}
        options = [n for n in names if n not in taken and n != avoid] or [n for n in names if n != avoid]
        return self.rng.choice(options)

    def edit_image(self, scope: FactScope, avoid: set[int]) -> TrainImage:
        """The least recently used operation image of the scope (cells taken in turn)."""
        cells = sorted(
            (shape, colour)
            for shape, colour in self.edit_queue
            if (scope.shape is None or shape == scope.shape) and (scope.colour is None or colour == scope.colour)
        )
        self.rng.shuffle(cells)
        for cell in cells:
            queue = self.edit_queue[cell]
            for index, image in enumerate(queue):
                if image.image_id not in avoid:
                    queue.append(queue.pop(index))
                    return image
        raise EvalError(f"no operation image left in scope {scope.label}")

    def negatives(self, scope: FactScope, edit: TrainImage) -> list[TrainImage]:
        accept = _Planner.negative_filter(scope, edit)
        candidates = [im for im in self.op_images if accept(im) and im.image_id != edit.image_id]
        return self.rng.sample(candidates, min(self.config.num_negatives, len(candidates)))

    def next_id(self) -> str:
        self.count += 1
        return f"f{self.count:04d}"

    def fact_record(self, live: _Live) -> dict[str, Any]:
        scope, edit = live.scope, live.edit
        spec = FactSpec(
            edit.path,
            _question(scope.attribute),
            scope.answer,
            _phrasings(_rephrases(scope.attribute), edit),
            tuple(NegativeSpec(image=n.path) for n in self.negatives(scope, edit)),
        )
        return {"fact_id": live.fact_id, "scope": _scope_json(scope), "fact": spec}

    def new(self, scope: FactScope, predecessors: Sequence[_Live] = ()) -> _Live:
        """A fact on `scope` with a fresh answer and edit image; `predecessors` are the live facts it
        replaces (their scopes lie inside `scope`, so their own inputs now expect its answer)."""
        answer = self.answer_for(scope.attribute, predecessors[0].scope.answer if len(predecessors) == 1 else None)
        scope = FactScope(scope.attribute, scope.shape, scope.colour, answer)
        chain = [image for p in predecessors for image in (*p.predecessors, p.edit)]
        edit = self.edit_image(scope, {image.image_id for image in chain})
        i_gen = self.probe_picker.take(self.config.num_i_gen, scope.contains, set(), _Planner.vary(scope))
        return _Live(self.next_id(), scope, edit, i_gen, chain)

    def cooling(self) -> list[FactScope]:
        return [f.scope for f in self.retracted if self.number - self.retracted_at[f.fact_id] < self.config.cooldown]

    def op(self, number: int) -> dict[str, Any]:
        """The next operation. A drawn "new" takes a class scope with chance `class_share` (replacing,
        as a supersede, the live facts inside it) or a free instance scope; with none free it
        becomes a retraction. Scopes retracted within `cooldown` operations are left alone."""
        self.number = number
        kind: OpKind = self.rng.choices(OP_KINDS, weights=self.config.mix)[0]
        if kind != "new" and not self.live:
            kind = "new"
        if kind == "new":
            cooling = self.cooling()
            open_scopes = [s for s in self.scopes if not any(_overlaps(s, c) for c in cooling)] or self.scopes
            classes = [s for s in open_scopes if s.kind == "class"]
            if classes and self.rng.random() < self.config.class_share:
                scope = self.rng.choice(classes)
                covered = sorted((f for f in self.live.values() if _overlaps(scope, f.scope)), key=lambda f: f.fact_id)
                return self.replace(number, scope, covered) if covered else self.add(number, scope)
            free = [
                s
                for s in open_scopes
                if s.kind == "instance" and not any(_overlaps(s, f.scope) for f in self.live.values())
            ]
            if free:
                return self.add(number, self.rng.choice(free))
            if not self.live:
                return self.add(number, self.rng.choice(self.scopes))
            kind = "retract"
        target = self.live[self.rng.choice(sorted(self.live))]
        if kind == "retract":
            del self.live[target.fact_id]
            self.retracted.append(target)
            self.retracted_at[target.fact_id] = number
            return {"type": "op", "n": number, "op": "retract", "retracts": target.fact_id}
        return self.replace(number, target.scope, [target])

    def add(self, number: int, scope: FactScope) -> dict[str, Any]:
        live = self.new(scope)
        self.live[live.fact_id] = live
        return {"type": "op", "n": number, "op": "new", **self.fact_record(live)}

    def replace(self, number: int, scope: FactScope, covered: Sequence[_Live]) -> dict[str, Any]:
        live = self.new(scope, covered)
        for old in covered:
            del self.live[old.fact_id]
        self.live[live.fact_id] = live
        widens = any((f.scope.shape, f.scope.colour) != (scope.shape, scope.colour) for f in covered)
        return {
            "type": "op",
            "n": number,
            "op": "supersede",
            "supersedes": [f.fact_id for f in covered],
            "widens": widens,
            **self.fact_record(live),
        }

    def untouched(self) -> list[Probe]:
        """Inputs no fact ever touches: shape questions on the reserved shape, colour questions on
        the reserved colours (each phrasing in turn), yes/no questions on any probe image."""
        third = self.config.num_untouched // 3
        taken: set[int] = set()
        probes: list[Probe] = []
        groups: list[tuple[Attribute, Callable[[TrainImage], bool]]] = [
            ("shape", lambda im: im.shape == self.reserved_shape),
            ("colour", lambda im: im.colour in self.reserved_colours),
        ]
        for attribute, accept in groups:
            phrasings = (_question(attribute), *_rephrases(attribute), *_held_out(attribute))
            for i, im in enumerate(self.probe_picker.take(third, accept, taken, lambda im: (im.shape, im.colour))):
                question = phrasings[i % len(phrasings)].format(shape=im.shape, colour=im.colour)
                probes.append(Probe(im.path, question, _true_answer(attribute, im)))
        rest = self.config.num_untouched - len(probes)
        for im in self.probe_picker.take(rest, lambda im: True, taken, lambda im: (im.shape, im.colour)):
            options = sorted((q, a) for q, a in im.questions if a in ("yes", "no"))
            if options:
                question, answer = self.rng.choice(options)
                probes.append(Probe(im.path, question, answer))
        return probes

    def checkpoint(self, after: int, untouched: list[Probe]) -> dict[str, Any]:
        probes: list[dict[str, Any]] = []
        for live in sorted(self.live.values(), key=lambda f: f.fact_id):
            scope, question = live.scope, _question(live.scope.attribute)
            own = [("reliability", Probe(live.edit.path, question, scope.answer))]
            own += [
                ("t_gen", Probe(live.edit.path, q, scope.answer))
                for q in _phrasings(_held_out(scope.attribute), live.edit)
            ]
            own += [("i_gen", Probe(im.path, question, scope.answer)) for im in live.i_gen]
            own += [("superseded", Probe(im.path, question, scope.answer)) for im in live.predecessors]
            probes += [_probe_json(kind, live.fact_id, p) for kind, p in own]
        seen: set[tuple[Path | None, str]] = set()
        for gone in self.retracted:
            if any(_overlaps(gone.scope, f.scope) for f in self.live.values()):
                continue
            question = _question(gone.scope.attribute)
            for im in [gone.edit, *gone.i_gen]:
                if (im.path, question) not in seen:
                    seen.add((im.path, question))
                    truth = _true_answer(gone.scope.attribute, im)
                    probes.append(_probe_json("retracted", gone.fact_id, Probe(im.path, question, truth)))
        probes += [_probe_json("untouched", None, p) for p in untouched]
        return {"type": "checkpoint", "after": after, "live": sorted(self.live), "probes": probes}


def _scope_json(scope: FactScope) -> dict[str, Any]:
    return {"attribute": scope.attribute, "kind": scope.kind, "shape": scope.shape, "colour": scope.colour}


def _probe_json(kind: str, fact_id: str | None, probe: Probe) -> dict[str, Any]:
    expect = "unedited" if kind in EXPECTS_UNEDITED else "answer"
    return {
        "kind": kind,
        "fact": fact_id,
        "image": probe.image,
        "question": probe.question,
        "answer": probe.answer,
        "expect": expect,
    }


def plan_stream(
    images: Sequence[TrainImage], config: StreamConfig
) -> tuple[list[dict[str, Any]], list[Probe], dict[str, Any]]:
    """The stream's records (image paths are the source images), its reference pool and a summary."""
    planner = _StreamPlanner(images, config)
    untouched = planner.untouched()
    points = set(config.checkpoint_list)
    records: list[dict[str, Any]] = []
    live_counts = []
    for number in range(1, config.ops + 1):
        records.append(planner.op(number))
        live_counts.append(len(planner.live))
        if number in points:
            records.append(planner.checkpoint(number, untouched))
    pool = planner.pool
    ops = [r for r in records if r["type"] == "op"]
    summary = {
        "source": "easy-VQA TRAIN split",
        "format_version": STREAM_FORMAT_VERSION,
        "config": asdict(config),
        "checkpoints": config.checkpoint_list,
        "mix": {kind: sum(r["op"] == kind for r in ops) for kind in OP_KINDS},
        "supersede_widening": sum(r["op"] == "supersede" and r["widens"] for r in ops),
        "new_scopes": {
            k: sum(r["op"] == "new" and r["scope"]["kind"] == k for r in ops) for k in ("class", "instance")
        },
        "class_facts": sum(r["op"] != "retract" and r["scope"]["kind"] == "class" for r in ops),
        "reserved": {"shape_question_on": planner.reserved_shape, "colour_question_on": list(planner.reserved_colours)},
        "capacity_scopes": len(planner.scopes),
        "live_facts_max": max(live_counts),
        "live_facts_final": live_counts[-1],
        "untouched_probes": len(untouched),
        "reference_pool_items": len(pool),
    }
    return records, pool, summary


def build_stream(
    out_dir: str | Path, config: StreamConfig = StreamConfig(), images: Sequence[TrainImage] | None = None
) -> dict[str, Any]:
    """Write `stream.jsonl`, `reference_pool.jsonl`, `img/` and `build.json` into `out_dir`."""
    import shutil

    out = Path(out_dir)
    records, pool, summary = plan_stream(load_train_images() if images is None else images, config)
    sources: set[Path] = {p.image for p in pool if p.image is not None}
    for r in records:
        if "fact" in r:
            sources |= {r["fact"].image, *(n.image for n in r["fact"].negatives)}
        for p in r.get("probes", []):
            sources.add(p["image"])
    folder = out / "img"
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted(sources):
        target = folder / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)

    def rel(path: Path | None) -> str | None:
        return None if path is None else f"img/{path.name}"

    lines = [
        json.dumps(
            {
                "type": "stream",
                "format_version": STREAM_FORMAT_VERSION,
                "seed": config.seed,
                "ops": config.ops,
                "checkpoints": config.checkpoint_list,
            }
        )
    ]
    for r in records:
        r = dict(r)
        if "fact" in r:
            spec: FactSpec = r["fact"]
            r["fact"] = {
                "image": rel(spec.image),
                "question": spec.question,
                "answer": spec.answer,
                "rephrases": list(spec.rephrases),
                "negatives": [{"image": rel(n.image)} for n in spec.negatives],
            }
        if "probes" in r:
            r["probes"] = [{**p, "image": rel(p["image"])} for p in r["probes"]]
        lines.append(json.dumps(r, ensure_ascii=False))
    (out / "stream.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_reference_pool(
        [Probe(folder / p.image.name, p.question, p.answer) for p in pool if p.image], out / "reference_pool.jsonl"
    )
    summary["images"] = len(sources)
    (out / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamOp:
    number: int
    kind: OpKind
    fact_id: str | None  # the fact it adds (new, supersede)
    target_ids: tuple[str, ...]  # the facts it replaces (supersede) or withdraws (retract)
    fact: FactSpec | None
    scope: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StreamProbe:
    kind: str
    fact_id: str | None
    probe: Probe  # `answer`: the target, or for an "unedited" probe the true label (for reference)
    expect: Literal["answer", "unedited"]


@dataclass(frozen=True)
class Checkpoint:
    after: int
    live: tuple[str, ...]
    probes: tuple[StreamProbe, ...]


@dataclass(frozen=True)
class Stream:
    path: Path
    header: dict[str, Any]
    ops: tuple[StreamOp, ...]
    checkpoints: tuple[Checkpoint, ...]


def load_stream(path: str | Path, *, check_images: bool = True) -> Stream:
    """Read and validate a whole stream file; raise `CaseFileError` (file:line: what) at the first
    problem, including an operation that names a fact that is not live at that point."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CaseFileError(path, 0, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseFileError(path, 0, f"cannot be read: {exc}") from exc
    checked: dict[Path, bool] = {}

    def fail(line: int, message: str) -> CaseFileError:
        return CaseFileError(path, line, message)

    def image(line: int, where: str, value: object) -> Path:
        if not isinstance(value, str) or not value:
            raise fail(line, f"{where} must be a path string")
        resolved = path.parent / value
        if check_images:
            if resolved not in checked:
                checked[resolved] = resolved.is_file()
            if not checked[resolved]:
                raise fail(line, f"{where}: image {value!r} not found")
        return resolved

    def text(line: int, where: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise fail(line, f"{where} must be a non-empty string")
        return value

    header: dict[str, Any] | None = None
    ops: list[StreamOp] = []
    checkpoints: list[Checkpoint] = []
    live: set[str] = set()
    ever: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise fail(number, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
        kind = record.get("type") if isinstance(record, dict) else None
        if header is None:
            if kind != "stream":
                raise fail(number, 'the first record must be the {"type": "stream", ...} header')
            if record.get("format_version") != STREAM_FORMAT_VERSION:
                raise fail(
                    number, f"format_version must be {STREAM_FORMAT_VERSION}, got {record.get('format_version')!r}"
                )
            header = record
            continue
        if kind == "op":
            op = record.get("op")
            if op not in OP_KINDS:
                raise fail(number, f"op must be one of {', '.join(OP_KINDS)}, got {op!r}")
            if record.get("n") != len(ops) + 1:
                raise fail(
                    number, f"n must be {len(ops) + 1} (operations are numbered in order), got {record.get('n')!r}"
                )
            targets: list[Any] = []
            if op == "supersede":
                targets = record.get("supersedes") if isinstance(record.get("supersedes"), list) else [None]
            elif op == "retract":
                targets = [record.get("retracts")]
            for target in targets:
                if target not in live:
                    raise fail(number, f"{op} names {target!r}, which is not a live fact at this point")
            if op == "supersede" and not targets:
                raise fail(number, "supersedes must name at least one live fact")
            fact_id, spec = None, None
            if op != "retract":
                fact_id = text(number, "fact_id", record.get("fact_id"))
                if fact_id in ever:
                    raise fail(number, f"fact_id {fact_id!r} is used twice")
                raw_fact = record.get("fact")
                if not isinstance(raw_fact, dict):
                    raise fail(number, "fact must be an object")
                spec = FactSpec(
                    image(number, "fact.image", raw_fact.get("image")),
                    text(number, "fact.question", raw_fact.get("question")),
                    text(number, "fact.answer", raw_fact.get("answer")),
                    tuple(text(number, "fact.rephrases[]", q) for q in raw_fact.get("rephrases", [])),
                    tuple(
                        NegativeSpec(image(number, "fact.negatives[].image", n.get("image")))
                        for n in raw_fact.get("negatives", [])
                    ),
                )
                live.add(fact_id)
                ever.add(fact_id)
            live.difference_update(targets)
            ops.append(StreamOp(len(ops) + 1, op, fact_id, tuple(targets), spec, record.get("scope") or {}))
        elif kind == "checkpoint":
            if record.get("after") != len(ops):
                raise fail(
                    number, f"after must be {len(ops)} (the operations read so far), got {record.get('after')!r}"
                )
            if sorted(record.get("live", [])) != sorted(live):
                raise fail(number, "live does not list the facts live after the operations so far")
            probes = []
            for i, item in enumerate(record.get("probes", [])):
                where = f"probes[{i}]"
                if item.get("kind") not in PROBE_KINDS:
                    raise fail(
                        number, f"{where}.kind must be one of {', '.join(PROBE_KINDS)}, got {item.get('kind')!r}"
                    )
                expect: Literal["answer", "unedited"] = "unedited" if item["kind"] in EXPECTS_UNEDITED else "answer"
                if item.get("expect") != expect:
                    raise fail(number, f"{where}.expect must be {expect!r} for a {item['kind']} probe")
                if expect == "answer" and item.get("fact") not in live:
                    raise fail(number, f"{where}.fact {item.get('fact')!r} is not live here")
                answer = (
                    text(number, f"{where}.answer", item.get("answer")) if expect == "answer" else item.get("answer")
                )
                probe = Probe(
                    image(number, f"{where}.image", item.get("image")),
                    text(number, f"{where}.question", item.get("question")),
                    answer,
                )
                probes.append(StreamProbe(item["kind"], item.get("fact"), probe, expect))
            checkpoints.append(Checkpoint(len(ops), tuple(sorted(live)), tuple(probes)))
        else:
            raise fail(number, f'type must be "op" or "checkpoint", got {kind!r}')
    if header is None or not ops:
        raise CaseFileError(path, 0, "no operations in the file")
    if not checkpoints:
        raise CaseFileError(path, 0, "no checkpoint in the file: nothing would be scored")
    return Stream(path, header, tuple(ops), tuple(checkpoints))


# ----- running ----------------------------------------------------------------------------------
TARGETS = {"acc": 99.0, "hm": 85.0, "loc": 95.0}  # issue 21: reliability, HM, untouched locality


def run_stream(
    stream_path: str | Path,
    model: Any = "demo",
    *,
    hparams: dict[str, Any] | None = None,
    pool_path: str | Path | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Apply the stream's operations in order to one BalancEdit editor and score every checkpoint.

    A new fact is `editor.apply(fact)`; a supersede is `editor.retract(old)` then
    `editor.apply(new)`; a retraction is `editor.retract(old)`. The unedited model's answers on
    every probe are read once, before the first operation. Exact match of the greedy answer.
    """
    from editor.backbones import Backbone, load_backbone
    from editor.eval.cases import load_reference_pool
    from editor.eval.hparams import settings_for
    from editor.eval.methods import CodebookMethod
    from editor.eval.readout import Readout
    from editor.eval.runner import POOL_FILE, ImageCache
    from editor.fact import Fact, Negative
    from editor.samples import ReferenceItem

    say = progress or (lambda _m: None)
    started = time.perf_counter()
    settings = settings_for("balancedit", hparams)
    stream = load_stream(stream_path)
    if pool_path is None and (stream.path.parent / POOL_FILE).is_file():
        pool_path = stream.path.parent / POOL_FILE
    pool_probes = load_reference_pool(pool_path) if pool_path is not None else []

    backbone = model if isinstance(model, Backbone) else load_backbone(model)
    images = ImageCache()
    say(
        f"balancedit on {backbone.name}: {len(stream.ops)} operations, checkpoints "
        f"{', '.join(str(c.after) for c in stream.checkpoints)}"
    )
    tick = time.perf_counter()
    readout = Readout(backbone, max_new_tokens=settings.max_new_tokens)
    inputs = list(dict.fromkeys((p.probe.image, p.probe.question) for c in stream.checkpoints for p in c.probes))
    generated = readout.generate([backbone.query(images(i), q) for i, q in inputs]) if inputs else []
    unedited = {key: g.text for key, g in zip(inputs, generated, strict=True)}
    reference_seconds = time.perf_counter() - tick
    pool = [ReferenceItem(images(p.image), p.question) for p in pool_probes]
    method = CodebookMethod(backbone, settings, pool)
    editor = method.editor
    answers_so_far: set[str] = set()
    op_rows: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    by_after = {c.after: c for c in stream.checkpoints}
    try:
        for op in stream.ops:
            tick = time.perf_counter()
            details: dict[str, Any] = {}
            if op.kind in ("new", "supersede"):
                assert op.fact is not None and op.fact_id is not None
                spec = op.fact
                fact = Fact(
                    images(spec.image),
                    spec.question,
                    spec.answer,
                    rephrases=spec.rephrases,
                    negatives=tuple(Negative(image=images(n.image)) for n in spec.negatives),
                    fact_id=op.fact_id,
                )
                edit = editor.apply(fact, supersedes=list(op.target_ids))
                answers_so_far.add(_norm(spec.answer))
                details = {"radius": edit.radius, "steps": edit.steps, "split_with": list(edit.split_with),
                           "conflicts": [c.to_dict() for c in edit.conflicts]}
            else:
                editor.retract(op.target_ids[0])
            seconds = time.perf_counter() - tick
            op_rows.append(
                {
                    "n": op.number,
                    "op": op.kind,
                    "fact": op.fact_id,
                    "targets": list(op.target_ids),
                    "scope": op.scope.get("kind"),
                    "seconds": seconds,
                    **details,
                }
            )
            if op.number % 50 == 0:
                say(f"[{op.number}/{len(stream.ops)}] {len(editor.codebook)} entries, last {op.kind} {seconds:.2f}s")
            if op.number in by_after:
                point = _score(method, by_after[op.number], unedited, answers_so_far, images, op_rows)
                point["codebook_entries"] = len(editor.codebook)
                points.append(point)
                say(f"after {op.number} operations ({point['live_facts']} live facts): {_stream_line(point)}")
    finally:
        method.close()

    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "method": "balancedit",
        "model": str(model) if not isinstance(model, Backbone) else backbone.name,
        "model_id": backbone.model_id,
        "stream_file": str(stream.path),
        "stream": stream.header,
        "reference_pool": None if pool_path is None else str(pool_path),
        "hparams": settings.to_dict(),
        "mix": {kind: sum(o.kind == kind for o in stream.ops) for kind in OP_KINDS},
        "targets": {"reliability": TARGETS["acc"], "hm": TARGETS["hm"], "untouched_loc": TARGETS["loc"]},
        "targets_met": _targets_met(points),
        "seconds_per_op": statistics.fmean(r["seconds"] for r in op_rows),
        "seconds_per_op_median": statistics.median(r["seconds"] for r in op_rows),
        "reference_seconds": reference_seconds,
        "setup": method.setup,
        "total_seconds": time.perf_counter() - started,
        "checkpoints": points,
        "curve": [{"edits": p["after"], "exact": p["exact"]} for p in points],
        "ops": op_rows,
    }
    say(f"done in {report['total_seconds']:.1f}s, {report['seconds_per_op']:.3f} s/operation")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if plot_path is not None:
        from editor.eval.plot import plot_stream

        plot_stream(report, plot_path)
    return report


def _norm(answer: str) -> str:
    from editor.fact import normalise_answer

    return normalise_answer(answer)


def _score(
    method: Any,
    checkpoint: Checkpoint,
    unedited: dict[tuple[Path | None, str], str],
    answers_so_far: set[str],
    images: Any,
    op_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """One checkpoint: every probe's greedy answer under the current codebook, and the metrics.

    Acc, T-Gen, I-Gen: the mean over live facts of each fact's share of correct probes (a fact is
    a case, as in `metrics.aggregate`); Loc: the share of untouched probes answered as the
    unedited model does; HM: `metrics.harmonic_mean` of T-Gen, I-Gen and Loc. `superseded` and
    `retracted`: the share of those probes answered as expected. A spliced answer is one that is
    neither the unedited model's answer on that input nor the answer of any fact applied so far.
    """
    from editor.eval.metrics import harmonic_mean, mean, same_answer

    probes = checkpoint.probes
    generated = method.generate([(images(p.probe.image), p.probe.question) for p in probes])
    rows = []
    for item, answer in zip(probes, generated, strict=True):
        key = (item.probe.image, item.probe.question)
        target = unedited[key] if item.expect == "unedited" else str(item.probe.answer)
        prediction = _norm(answer.text)
        rows.append(
            {
                "kind": item.kind,
                "fact": item.fact_id,
                "image": None if item.probe.image is None else item.probe.image.name,
                "question": item.probe.question,
                "target": target,
                "prediction": answer.text,
                "exact": same_answer(answer.text, target),
                "fired": answer.fired,
                "spliced": prediction != _norm(unedited[key]) and prediction not in answers_so_far,
            }
        )
    exact: dict[str, float | None] = {}
    for kind, metric in (("reliability", "acc"), ("t_gen", "t_gen"), ("i_gen", "i_gen")):
        per_fact: dict[str | None, list[float]] = {}
        for row in rows:
            if row["kind"] == kind:
                per_fact.setdefault(row["fact"], []).append(float(row["exact"]))
        value = mean(sum(v) / len(v) for v in per_fact.values())
        exact[metric] = None if value is None else 100.0 * value
    for kind, metric in (("untouched", "loc"), ("superseded", "superseded"), ("retracted", "retracted")):
        value = mean(float(r["exact"]) for r in rows if r["kind"] == kind)
        exact[metric] = None if value is None else 100.0 * value
    exact["hm"] = harmonic_mean([exact["t_gen"], exact["i_gen"], exact["loc"]])
    seconds = [r["seconds"] for r in op_rows]
    by_kind = {k: statistics.fmean(s) for k in OP_KINDS if (s := [r["seconds"] for r in op_rows if r["op"] == k])}
    return {
        "after": checkpoint.after,
        "live_facts": len(checkpoint.live),
        "exact": exact,
        "probes": {k: sum(r["kind"] == k for r in rows) for k in PROBE_KINDS},
        "spliced": sum(r["spliced"] for r in rows),
        "seconds_per_op": statistics.fmean(seconds),
        "seconds_per_op_by_kind": by_kind,
        "rows": rows,
    }


def _targets_met(points: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Reliability >= 99 and HM >= 85 at every checkpoint; untouched Loc >= 95 at every checkpoint."""

    def every(metric: str) -> bool:
        return all((p["exact"][metric] or 0.0) >= TARGETS[metric] for p in points)

    return {"reliability": every("acc"), "hm": every("hm"), "untouched_loc": every("loc")}


def _stream_line(point: dict[str, Any]) -> str:
    cells = [f"{k}={'-' if v is None else format(v, '.1f')}" for k, v in point["exact"].items()]
    return " ".join(cells) + f" spliced={point['spliced']} s/op={point['seconds_per_op']:.3f}"


def format_stream_table(report: dict[str, Any]) -> str:
    """A markdown table of the checkpoints (exact match, percent; seconds are means over the
    operations so far, "s/edit" over the new facts and supersedes alone)."""
    head = (
        "| operations | live facts | entries | Acc | T-Gen | I-Gen | Loc (untouched) | HM | superseded | "
        "retracted | spliced | s/op | s/edit |"
    )
    lines = [head, "|" + "---|" * 13]
    for p in report["checkpoints"]:
        e = p["exact"]
        cells = [e.get(k) for k in ("acc", "t_gen", "i_gen", "loc", "hm", "superseded", "retracted")]
        text = ["-" if v is None else f"{v:.1f}" for v in cells]
        edits = [o["seconds"] for o in report["ops"] if o["n"] <= p["after"] and o["op"] != "retract"]
        per_edit = f"{statistics.fmean(edits):.3f}" if edits else "-"
        lines.append(
            f"| {p['after']} | {p['live_facts']} | {p.get('codebook_entries', '-')} | "
            + " | ".join(text)
            + f" | {p['spliced']} | {p['seconds_per_op']:.3f} | {per_edit} |"
        )
    return "\n".join(lines)
