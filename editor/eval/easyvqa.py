"""Edit cases and a reference pool built from the easy-VQA TRAIN split (our development set).

Every easy-VQA image holds one shape (circle, rectangle, triangle) of one colour (8 colours). A
fact renames a shape or recolours a colour for the images in its scope:

* class scope, shape:    every circle is now a "ring"        (question: what shape ...?)
* class scope, colour:   every gray shape is now "silver"    (question: what color ...?)
* instance scope, shape: only red rectangles are "bricks"    (negatives: rectangles of other colours)
* instance scope, colour: only teal triangles are "jade"     (negatives: teal shapes of other kinds)

Scopes of the same question type never overlap, and every loc probe lies outside every scope of
the file, so the cases are consistent with one another and sequential mode is meaningful.

Phrasings: easy-VQA asks each question type in four phrasings. The edit uses one, `rephrases`
(what the editor may use) another, and T-Gen only the two held out (`*_HELD_OUT`), never shown
to the editor. I-Gen: other images in scope, same question. Loc: the same question on images out
of scope (sharing the other attribute with the edited image where possible: the hard case), plus
other questions about the edited image. Negatives and probes use distinct images.

The TEST split is never read. Everything is a function of the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from editor.eval.cases import EditCase, FactSpec, NegativeSpec, Probe, write_cases, write_reference_pool
from editor.eval.errors import EvalError

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")

SHAPE_QUESTION = "what shape is in the image?"
SHAPE_REPHRASES = ("what shape is present?",)
SHAPE_HELD_OUT = ("what shape does the image contain?", "what is the {colour} shape?")
COLOUR_QUESTION = "what color is the shape?"
COLOUR_REPHRASES = ("what color is the {shape}?",)
COLOUR_HELD_OUT = ("what is the color of the shape?", "what is the color of the {shape}?")

# New names: none is an easy-VQA answer; several are multi-word.
SHAPE_NAMES = (
    "ring",
    "oval disc",
    "brick",
    "slab",
    "wedge",
    "spike",
    "tile",
    "kite",
    "plank",
    "hoop",
    "arrow head",
    "block",
    "sail",
    "panel",
)
COLOUR_NAMES = (
    "silver",
    "crimson",
    "navy blue",
    "amber",
    "olive",
    "azure",
    "coral",
    "ivory",
    "lilac",
    "khaki",
    "jade",
    "maroon",
    "ochre",
    "slate grey",
)

Attribute = Literal["shape", "colour"]


@dataclass(frozen=True)
class TrainImage:
    image_id: int
    path: Path
    shape: str
    colour: str
    questions: tuple[tuple[str, str], ...]  # the dataset's own (question, answer) pairs


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    class_shapes: int = 1  # shapes renamed for every colour (at most 2: loc needs another shape)
    class_colours: int = 3  # colours renamed for every shape (at most 7)
    instance_shapes: int = 6  # (colour, shape) pairs renamed, shapes not already class-renamed
    instance_colours: int = 6  # (colour, shape) pairs recoloured, colours not already class-recoloured
    variants: int = 2  # cases per fact, each on another edit image from the scope
    num_i_gen: int = 4
    num_loc: int = 6  # of which 2 are other questions about the edited image
    num_negatives: int = 2
    pool_size: int = 200

    def __post_init__(self) -> None:
        if not 0 <= self.class_shapes <= len(SHAPES) - 1:
            raise EvalError(f"class_shapes must lie in [0, {len(SHAPES) - 1}], got {self.class_shapes}")
        if not 0 <= self.class_colours <= len(COLOURS) - 1:
            raise EvalError(f"class_colours must lie in [0, {len(COLOURS) - 1}], got {self.class_colours}")
        free_shapes = (len(SHAPES) - self.class_shapes) * len(COLOURS)
        free_colours = (len(COLOURS) - self.class_colours) * len(SHAPES)
        if not 0 <= self.instance_shapes <= free_shapes // 2:
            raise EvalError(
                f"instance_shapes must lie in [0, {free_shapes // 2}], got {self.instance_shapes}"
            )
        if not 0 <= self.instance_colours <= free_colours // 2:
            raise EvalError(
                f"instance_colours must lie in [0, {free_colours // 2}], got {self.instance_colours}"
            )
        if self.class_shapes + self.instance_shapes > len(SHAPE_NAMES):
            raise EvalError(f"at most {len(SHAPE_NAMES)} shape facts (class_shapes + instance_shapes)")
        if self.class_colours + self.instance_colours > len(COLOUR_NAMES):
            raise EvalError(f"at most {len(COLOUR_NAMES)} colour facts (class_colours + instance_colours)")
        for name in ("variants", "num_i_gen", "num_loc"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_loc < 3:
            raise EvalError(
                f"num_loc must be at least 3 (same question elsewhere + other questions), got {self.num_loc}"
            )
        if self.num_negatives < 0 or self.pool_size < 0:
            raise EvalError("num_negatives and pool_size must be 0 or more")


@dataclass(frozen=True)
class FactScope:
    attribute: Attribute  # the question type the fact answers
    shape: str | None  # None: any shape
    colour: str | None  # None: any colour
    answer: str

    @property
    def kind(self) -> str:
        return "class" if self.shape is None or self.colour is None else "instance"

    def contains(self, image: TrainImage) -> bool:
        return (self.shape is None or image.shape == self.shape) and (
            self.colour is None or image.colour == self.colour
        )

    @property
    def label(self) -> str:
        parts = [self.colour, self.shape] if self.kind == "instance" else [self.shape or self.colour]
        return f"{self.attribute}-" + "-".join(p for p in parts if p)


# ----- the TRAIN split --------------------------------------------------------------------------
def load_train_images() -> list[TrainImage]:
    """easy-VQA TRAIN images with their shape and colour read off the direct questions."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    return label_images(questions, answers, image_ids, paths)


def label_images(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int], paths: dict[int, str]
) -> list[TrainImage]:
    """Shape from "what shape ...?" answers, colour from "what color ...?" answers; images with a
    missing or contradictory label are left out."""
    shape: dict[int, set[str]] = {}
    colour: dict[int, set[str]] = {}
    asked: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        asked.setdefault(image_id, []).append((question, answer))
        if answer in SHAPES:
            shape.setdefault(image_id, set()).add(answer)
        elif answer in COLOURS:
            colour.setdefault(image_id, set()).add(answer)
    result = []
    for image_id in sorted(paths):
        shapes, colours = shape.get(image_id, set()), colour.get(image_id, set())
        if len(shapes) == 1 and len(colours) == 1:
            result.append(
                TrainImage(
                    image_id,
                    Path(paths[image_id]),
                    next(iter(shapes)),
                    next(iter(colours)),
                    tuple(asked.get(image_id, ())),
                )
            )
    return result


# ----- planning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    cases: list[EditCase]
    pool: list[Probe]
    facts: list[FactScope]


def _question(attribute: Attribute) -> str:
    return SHAPE_QUESTION if attribute == "shape" else COLOUR_QUESTION


def _true_answer(attribute: Attribute, image: TrainImage) -> str:
    return image.shape if attribute == "shape" else image.colour


def _phrasings(templates: Iterable[str], image: TrainImage) -> tuple[str, ...]:
    return tuple(t.format(shape=image.shape, colour=image.colour) for t in templates)


def _yes_no(image: TrainImage, rng: random.Random, avoid: set[str]) -> tuple[str, str] | None:
    options = [(q, a) for q, a in image.questions if a in ("yes", "no") and q not in avoid]
    return rng.choice(sorted(options)) if options else None


def choose_facts(
    config: BuildConfig, rng: random.Random, shape_names: Sequence[str], colour_names: Sequence[str]
) -> list[FactScope]:
    class_shapes = rng.sample(SHAPES, config.class_shapes)
    class_colours = rng.sample(COLOURS, config.class_colours)
    shape_pairs = [(c, s) for s in SHAPES if s not in class_shapes for c in COLOURS]
    colour_pairs = [(c, s) for c in COLOURS if c not in class_colours for s in SHAPES]
    instance_shapes = rng.sample(shape_pairs, config.instance_shapes)
    instance_colours = rng.sample(colour_pairs, config.instance_colours)
    new_shapes = rng.sample(list(shape_names), config.class_shapes + config.instance_shapes)
    new_colours = rng.sample(list(colour_names), config.class_colours + config.instance_colours)
    facts = [FactScope("shape", s, None, new_shapes.pop()) for s in class_shapes]
    facts += [FactScope("colour", None, c, new_colours.pop()) for c in class_colours]
    facts += [FactScope("shape", s, c, new_shapes.pop()) for c, s in instance_shapes]
    facts += [FactScope("colour", s, c, new_colours.pop()) for c, s in instance_colours]
    return facts


class _Picker:
    """Draws images without replacement (within one case) in a seeded order."""

    def __init__(self, images: Sequence[TrainImage], rng: random.Random) -> None:
        self.images = list(images)
        rng.shuffle(self.images)

    def take(
        self,
        count: int,
        accept: Callable[[TrainImage], bool],
        taken: set[int],
        spread: Callable[[TrainImage], object] | None = None,
    ) -> list[TrainImage]:
        """Up to `count` accepted images not in `taken`; with `spread`, round-robin over its values."""
        candidates = [im for im in self.images if im.image_id not in taken and accept(im)]
        if spread is not None:
            buckets: dict[object, list[TrainImage]] = {}
            for im in candidates:
                buckets.setdefault(spread(im), []).append(im)
            order: list[TrainImage] = []
            keys = sorted(buckets, key=str)
            while any(buckets.values()):
                for key in keys:
                    if buckets[key]:
                        order.append(buckets[key].pop(0))
            candidates = order
        chosen = candidates[:count]
        taken.update(im.image_id for im in chosen)
        return chosen


def _spread_kind(image: TrainImage) -> tuple[str, str]:
    return (image.shape, image.colour)


class _Planner:
    """Builds the cases of a list of facts; every image choice goes through one seeded picker."""

    def __init__(
        self, facts: list[FactScope], picker: _Picker, config: BuildConfig, rng: random.Random
    ) -> None:
        self.facts, self.picker, self.config, self.rng = facts, picker, config, rng

    def in_any_scope(self, attribute: Attribute, image: TrainImage) -> bool:
        return any(f.attribute == attribute and f.contains(image) for f in self.facts)

    @staticmethod
    def vary(fact: FactScope) -> Callable[[TrainImage], str]:
        """The sub-attribute that varies inside a scope (the colour of renamed circles)."""
        if fact.attribute == "shape":
            return lambda image: image.colour
        return lambda image: image.shape

    @staticmethod
    def negative_filter(fact: FactScope, edit: TrainImage) -> Callable[[TrainImage], bool]:
        """Out of scope, and sharing an attribute with the edited image (the hard negatives)."""
        other: Attribute = "colour" if fact.attribute == "shape" else "shape"
        if fact.kind == "class":  # e.g. renamed circles: other shapes of the edited image's colour
            return lambda im: not fact.contains(im) and _true_answer(other, im) == _true_answer(other, edit)
        if fact.attribute == "shape":  # only red rectangles renamed: rectangles of other colours
            return lambda im: im.shape == fact.shape and im.colour != fact.colour
        return lambda im: im.colour == fact.colour and im.shape != fact.shape  # teal shapes of other kinds

    def loc_filters(self, fact: FactScope, edit: TrainImage) -> tuple[Callable[[TrainImage], bool], ...]:
        """(hard, any): out of every scope of the fact's question type; hard ones share an attribute."""

        def free(image: TrainImage) -> bool:
            return not self.in_any_scope(fact.attribute, image)

        def hard(image: TrainImage) -> bool:
            return free(image) and (image.shape == edit.shape or image.colour == edit.colour)

        return hard, free

    def case(self, fact: FactScope, edit: TrainImage, variant: int, taken: set[int]) -> EditCase:
        config, picker = self.config, self.picker
        question = _question(fact.attribute)
        other: Attribute = "colour" if fact.attribute == "shape" else "shape"
        held_out = SHAPE_HELD_OUT if fact.attribute == "shape" else COLOUR_HELD_OUT
        rephrase_templates = SHAPE_REPHRASES if fact.attribute == "shape" else COLOUR_REPHRASES
        negatives = picker.take(config.num_negatives, self.negative_filter(fact, edit), taken, _spread_kind)
        i_gen = picker.take(config.num_i_gen, fact.contains, taken, self.vary(fact))
        # Loc: the same question on images out of scope (hard ones first), then other questions
        # about the edited image.
        same_question = config.num_loc - 2
        hard_filter, free_filter = self.loc_filters(fact, edit)
        hard = picker.take((same_question + 1) // 2, hard_filter, taken, _spread_kind)
        easy = picker.take(same_question - len(hard), free_filter, taken, _spread_kind)
        loc = [Probe(im.path, question, _true_answer(fact.attribute, im)) for im in hard + easy]
        asked = {question, *_phrasings(held_out + rephrase_templates, edit)}
        if not self.in_any_scope(other, edit):
            loc.append(Probe(edit.path, _question(other), _true_answer(other, edit)))
        while len(loc) < config.num_loc:
            pair = _yes_no(edit, self.rng, asked)
            if pair is None:
                break
            asked.add(pair[0])
            loc.append(Probe(edit.path, pair[0], pair[1]))
        return EditCase(
            case_id=f"{fact.label}-{variant}",
            scope=fact.kind,
            fact=FactSpec(
                edit.path,
                question,
                fact.answer,
                _phrasings(rephrase_templates, edit),
                tuple(NegativeSpec(image=n.path) for n in negatives),
            ),
            reliability=(Probe(edit.path, question, fact.answer),),
            t_gen=tuple(Probe(edit.path, q, fact.answer) for q in _phrasings(held_out, edit)),
            i_gen=tuple(Probe(im.path, question, fact.answer) for im in i_gen),
            loc=tuple(loc),
            meta={
                "attribute": fact.attribute,
                "scope_shape": fact.shape,
                "scope_colour": fact.colour,
                "edit_image": {"shape": edit.shape, "colour": edit.colour, "easy_vqa_id": edit.image_id},
                "original_answer": _true_answer(fact.attribute, edit),
            },
        )


def plan_cases(
    images: Sequence[TrainImage],
    config: BuildConfig,
    *,
    exclude_ids: Iterable[int] = (),
    shape_names: Sequence[str] = SHAPE_NAMES,
    colour_names: Sequence[str] = COLOUR_NAMES,
) -> Plan:
    """Cases (image paths point at the source images) and a reference pool, from the seed alone."""
    rng = random.Random(config.seed)
    excluded = set(exclude_ids)
    available = [im for im in images if im.image_id not in excluded]
    picker = _Picker(available, rng)
    facts = choose_facts(config, rng, shape_names, colour_names)
    planner = _Planner(facts, picker, config, rng)

    # Edit images first, all distinct; no case uses another case's edit image as a probe or negative.
    edit_images: set[int] = set()
    edits_of: list[list[TrainImage]] = []
    for fact in facts:
        edits = picker.take(config.variants, fact.contains, edit_images, planner.vary(fact))
        if len(edits) < config.variants:
            raise EvalError(f"not enough images in scope {fact.label} for {config.variants} variants")
        edits_of.append(edits)

    used: set[int] = set(edit_images)  # every image a case touches; the pool avoids them
    cases: list[EditCase] = []
    for fact, edits in zip(facts, edits_of, strict=True):
        for variant, edit in enumerate(edits, start=1):
            taken = set(edit_images)
            cases.append(planner.case(fact, edit, variant, taken))
            used |= taken
    rng.shuffle(cases)
    pool_images = [im for im in available if im.image_id not in used]
    rng.shuffle(pool_images)
    pool = []
    for im in sorted(pool_images[: config.pool_size], key=lambda im: im.image_id):
        question, answer = rng.choice(sorted(im.questions))
        pool.append(Probe(im.path, question, answer))
    return Plan(cases, pool, facts)


# ----- writing ----------------------------------------------------------------------------------
def _copy_images(cases: Sequence[EditCase], pool: Sequence[Probe], folder: Path) -> dict[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = set().union(*(c.image_paths() for c in cases)) | {p.image for p in pool if p.image is not None}
    mapping = {}
    for source in sorted(sources):
        target = folder / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
        mapping[source] = target
    return mapping


def _relocate(case: EditCase, mapping: dict[Path, Path]) -> EditCase:
    def move(path: Path | None) -> Path | None:
        return None if path is None else mapping[path]

    def probes(items: Iterable[Probe]) -> tuple[Probe, ...]:
        return tuple(Probe(move(p.image), p.question, p.answer) for p in items)

    fact = case.fact
    return EditCase(
        case.case_id,
        case.scope,
        FactSpec(
            move(fact.image),
            fact.question,
            fact.answer,
            fact.rephrases,
            tuple(NegativeSpec(move(n.image), n.question) for n in fact.negatives),
        ),
        probes(case.reliability),
        probes(case.t_gen),
        probes(case.i_gen),
        probes(case.loc),
        case.meta,
    )


def build_case_files(
    out_dir: str | Path, config: BuildConfig = BuildConfig(), images: Sequence[TrainImage] | None = None
) -> dict[str, object]:
    """Write `cases.jsonl`, `reference_pool.jsonl`, `img/` and `build.json` into `out_dir`."""
    out = Path(out_dir)
    plan = plan_cases(load_train_images() if images is None else images, config)
    mapping = _copy_images(plan.cases, plan.pool, out / "img")
    cases = [_relocate(c, mapping) for c in plan.cases]
    pool = [Probe(mapping[p.image], p.question, p.answer) if p.image is not None else p for p in plan.pool]
    write_cases(cases, out / "cases.jsonl")
    write_reference_pool(pool, out / "reference_pool.jsonl")
    summary: dict[str, object] = {
        "source": "easy-VQA TRAIN split",
        "config": asdict(config),
        "cases": len(cases),
        "class_cases": sum(c.scope == "class" for c in cases),
        "instance_cases": sum(c.scope == "instance" for c in cases),
        "facts": [asdict(f) for f in plan.facts],
        "reference_pool_items": len(pool),
        "images": len(mapping),
        "held_out_phrasings": {"shape": list(SHAPE_HELD_OUT), "colour": list(COLOUR_HELD_OUT)},
    }
    (out / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----- development edits (for MEND's training and IKE's demonstrations) ---------------------------
def invented_names(rng: random.Random, count: int) -> list[str]:
    """Pronounceable made-up words (one or two), so no development edit uses an evaluation answer."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: set[str] = set()
    while len(names) < count:
        words = [
            "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
            for _ in range(rng.choice((1, 1, 2)))
        ]
        names.add(" ".join(words))
    return sorted(names)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def development_cases(
    count: int, seed: int, exclude_digests: Iterable[str] = (), images: Sequence[TrainImage] | None = None
) -> list[EditCase]:
    """`count` edit cases on TRAIN images whose bytes match none of `exclude_digests`, with
    invented answers; plans with successive seeds until there are enough."""
    images = load_train_images() if images is None else list(images)
    excluded = set(exclude_digests)
    exclude_ids = {im.image_id for im in images if excluded and file_digest(im.path) in excluded}
    result: list[EditCase] = []
    round_ = 0
    while len(result) < count:
        rng = random.Random(f"development-{seed}-{round_}")
        config = BuildConfig(seed=rng.randrange(2**31), variants=3, pool_size=0)
        names = invented_names(rng, 2 * len(SHAPE_NAMES))
        plan = plan_cases(
            images, config, exclude_ids=exclude_ids, shape_names=names[::2], colour_names=names[1::2]
        )
        result += plan.cases
        round_ += 1
    return result[:count]
