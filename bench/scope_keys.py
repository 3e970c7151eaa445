"""How well each choice of scope key separates in-scope from out-of-scope inputs (issue 21, point 1).

On the shipped demo model and easy-VQA TRAIN images (the TEST split is never read), a fact's scope
is one of

* class, shape:      every image of shape S, any colour         (question: "what shape is in the image?")
* class, colour:     every image of colour C, any shape          (question: "what color is the shape?")
* instance, shape:   images of colour C and shape S, shape question
* instance, colour:  images of colour C and shape S, colour question

For each scope, anchors (the fact's image, with the fact's question) are drawn from a seeded sample
of `--per-cell` images per (colour, shape) cell, spread over the attribute that varies inside the
scope; colour classes get anchors of every shape, so the colour class taught from a triangle is its
own row. For each anchor and key choice, the cosine distance (the codebook's default distance,
`editor.radius.pairwise_distances`) from the anchor's key to

* in scope:   the other sampled images of the scope with the fact's question (I-Gen), and the anchor
              image with the fact's other phrasings (the builder's rephrase and its two held-out ones:
              T-Gen);
* out of scope: the sampled images outside the scope with the fact's question; the hard ones share
              an attribute with the scope the way `build-easyvqa`'s negatives do (class shape: the
              anchor's colour, another shape; class colour: the anchor's shape, another colour;
              instance shape: shape S, another colour; instance colour: colour C, another shape);
* other question: the anchor image with the other attribute's four phrasings (the benchmark's
              "other questions about the edited image" locality probes), reported apart.

Key choices (forward hooks on the backbone's submodules during one full pass per batch inside the
editor's adapter scope, next to the public `Editor.keys`; no change to `editor/`):

* today's key: the edited layer's input at the last prompt token, exactly `Editor.keys` (checked with
  torch.equal); on the demo model the edited layer is `model.language_model.layers.2.mlp.down_proj`
  (its `kb_backbone.json`), so this is `L2.down_proj`;
* `L0/L1/L3.down_proj` - the same layer kind in the other decoder layers (what `Editor(layer=...)`
  would key on);
* `L1/L2/L3.input` - the residual stream entering decoder layer 1 / 2 / 3 at the last prompt token;
* `vision.mean` - the vision tower's patch states that the projector receives (last layer, CLS
  dropped), mean over the 64 image tokens; `projector.mean` - the projector's output, same mean;
* `L2.down_proj + w*vision.mean`, `L2.down_proj + w*projector.mean` - each part L2-normalised, the
  image part scaled by w in {0.25, 0.5, 1.0}, concatenated (so cosine distance is
  (d_text + w^2 d_image) / (1 + w^2)).

Separability is per anchor, as a codebook entry has one radius around its own key: the AUC
(probability that an in-scope input is nearer than an out-of-scope one, ties half) and the best
balanced accuracy of one radius (share of in-scope inputs inside plus share of out-of-scope ones
outside, over 2), averaged over the anchors of a scope type, with the worst anchor beside it; and
the coverage: the share of in-scope inputs nearer than the anchor's nearest out-of-scope input (what
a radius kept below every negative, as BalancEdit's is, can reach), also for class scopes' in-scope
images of another kind than the anchor (a triangle-anchored colour class's circles and rectangles).
Distance percentiles pool every anchor's pairs.

    .venv/bin/python bench/scope_keys.py     # about a minute on 2 CPU cores
    # -> bench/results/scope_keys.{json,md}; per-anchor distances to bench/out/scope_keys-pairs.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from machine import machine_facts  # bench/ is sys.path[0] when a script runs

ROOT = Path(__file__).resolve().parent.parent
IMAGE_WEIGHTS = (0.25, 0.5, 1.0)
RESIDUAL_LAYERS = (1, 2, 3)  # decoder layers whose input (residual stream) is a key choice
GROUPS = (
    "class shape",
    "class colour",
    "class colour, triangle anchor",
    "class colour, circle/rectangle anchor",
    "instance shape",
    "instance colour",
)


@dataclass(frozen=True)
class Scope:
    attribute: str  # "shape" or "colour": the question type the fact answers
    shape: str | None  # None: any shape
    colour: str | None  # None: any colour

    @property
    def kind(self) -> str:
        return "class" if self.shape is None or self.colour is None else "instance"

    def contains(self, image: Any) -> bool:
        return (self.shape is None or image.shape == self.shape) and (
            self.colour is None or image.colour == self.colour
        )

    def is_hard(self, image: Any, anchor: Any) -> bool:
        """Out of scope and sharing an attribute the way build-easyvqa's negatives do."""
        if self.contains(image):
            return False
        if self.kind == "class":
            if self.attribute == "shape":
                return image.colour == anchor.colour
            return image.shape == anchor.shape
        if self.attribute == "shape":
            return image.shape == self.shape
        return image.colour == self.colour

    @property
    def label(self) -> str:
        return f"{self.kind} {self.attribute}: " + " ".join(p for p in (self.colour, self.shape) if p)


@dataclass(frozen=True)
class Anchor:
    scope: Scope
    image_index: int  # into the sampled images

    def group(self, images: Sequence[Any]) -> list[str]:
        """The table rows this anchor counts in."""
        base = f"{self.scope.kind} {self.scope.attribute}"
        if self.scope.kind == "class" and self.scope.attribute == "colour":
            shape = images[self.image_index].shape
            return [base, base + (", triangle anchor" if shape == "triangle" else ", circle/rectangle anchor")]
        return [base]


# ----- inputs -----------------------------------------------------------------------------------
def phrasings(attribute: str, image: Any) -> list[str]:
    """The fact's question first, then its rephrase and its two held-out phrasings (build-easyvqa's)."""
    from editor.eval import easyvqa

    if attribute == "shape":
        templates = (easyvqa.SHAPE_QUESTION, *easyvqa.SHAPE_REPHRASES, *easyvqa.SHAPE_HELD_OUT)
    else:
        templates = (easyvqa.COLOUR_QUESTION, *easyvqa.COLOUR_REPHRASES, *easyvqa.COLOUR_HELD_OUT)
    return [t.format(shape=image.shape, colour=image.colour) for t in templates]


def sample_images(per_cell: int, seed: int) -> list[Any]:
    """`per_cell` TRAIN images of every (colour, shape) cell, seeded, in id order within a cell."""
    from editor.eval import easyvqa

    rng = random.Random(seed)
    cells: dict[tuple[str, str], list[Any]] = {}
    for image in easyvqa.load_train_images():
        cells.setdefault((image.colour, image.shape), []).append(image)
    chosen = []
    for colour in easyvqa.COLOURS:
        for shape in easyvqa.SHAPES:
            cell = cells[(colour, shape)]
            if len(cell) < per_cell:
                raise SystemExit(f"cell {colour} {shape} has {len(cell)} TRAIN images, fewer than {per_cell}")
            chosen += sorted(rng.sample(cell, per_cell), key=lambda im: im.image_id)
    return chosen


def choose_anchors(images: Sequence[Any], anchors_per_value: int) -> list[Anchor]:
    """For each scope, `anchors_per_value` anchors per value of the attribute that varies inside it
    (per colour for a shape class, per shape for a colour class), and `anchors_per_value` per cell for
    instance scopes. Anchors are the first images of their cell in the seeded sample."""
    from editor.eval import easyvqa

    def firsts(accept: Callable[[Any], bool]) -> list[int]:
        return [i for i, image in enumerate(images) if accept(image)][:anchors_per_value]

    anchors = []
    for shape in easyvqa.SHAPES:
        scope = Scope("shape", shape, None)
        for colour in easyvqa.COLOURS:
            anchors += [Anchor(scope, i) for i in firsts(lambda im, c=colour, s=shape: (im.colour, im.shape) == (c, s))]
    for colour in easyvqa.COLOURS:
        scope = Scope("colour", None, colour)
        for shape in easyvqa.SHAPES:
            anchors += [Anchor(scope, i) for i in firsts(lambda im, c=colour, s=shape: (im.colour, im.shape) == (c, s))]
    for attribute in ("shape", "colour"):
        for colour in easyvqa.COLOURS:
            for shape in easyvqa.SHAPES:
                scope = Scope(attribute, shape, colour)
                anchors += [Anchor(scope, i) for i in firsts(scope.contains)]
    return anchors


# ----- keys -------------------------------------------------------------------------------------
class KeyRecorder:
    """Forward hooks that record, for one batch of prompts (left-padded, so every prompt ends at the
    last position), the inputs of the compared down_proj layers and decoder layers at that position
    and the mean of the projector's input and output over the image tokens."""

    def __init__(self, model: torch.nn.Module, decoder_path: str) -> None:
        self.recorded: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        layers = model.get_submodule(decoder_path)
        for index in range(len(layers)):
            # The Linear itself: the editor's adapter on the edited one calls this same module, so
            # the hook sees what the adapter keys on.
            linear = self._unwrapped(layers[index].mlp.down_proj)
            self._last_token(linear, f"L{index}.down_proj")
        for index in RESIDUAL_LAYERS:
            self._last_token(layers[index], f"L{index}.input")
        projector = model.get_submodule("model.multi_modal_projector")
        self.handles.append(projector.register_forward_hook(self._projector))

    @staticmethod
    def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
        return getattr(module, "base_layer", module)

    def _last_token(self, module: torch.nn.Module, name: str) -> None:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            self.recorded[name] = hidden[:, -1].detach().float().cpu()  # (B, D)

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _projector(self, _module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self.recorded["vision.mean"] = args[0].detach().float().mean(dim=1).cpu()  # (B, D)
        self.recorded["projector.mean"] = output.detach().float().mean(dim=1).cpu()  # (B, D)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def raw_keys(ed: Any, queries: Sequence[Any], batch_size: int = 32) -> tuple[dict[str, torch.Tensor], str]:
    """Every recorded representation of `queries`, and the name of the one that is today's key
    (`Editor.keys`, checked equal to the hook on the edited layer). -> (name -> (N, D), name)"""
    backbone = ed.backbone
    index = backbone.decoder_index(ed.layer)
    if ed.layer != f"{backbone.family.decoder_layers}.{index}.mlp.down_proj":
        raise SystemExit(f"the edited layer {ed.layer!r} is not a decoder layer's mlp.down_proj")
    edited = f"L{index}.down_proj"
    recorder = KeyRecorder(backbone.model, backbone.family.decoder_layers)
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, len(queries), batch_size):
            rows = queries[start : start + batch_size]
            keys = ed.keys(rows)  # (B, Din): the pass stops at the edited layer
            batch = backbone.encode(rows)
            assert bool((batch.key_positions == batch.input_ids.shape[1] - 1).all()), "prompts end at the last position"
            recorder.recorded.clear()
            # A full pass (no edits: mode "off") so that the layers after the edited one are recorded too.
            with torch.no_grad(), ed.adapter.scope(batch.key_positions, mode="off"):
                backbone.model(**backbone.model_inputs(batch), use_cache=False)
            if not torch.equal(keys, recorder.recorded[edited]):
                raise SystemExit(f"the hook on {edited} disagrees with Editor.keys")
            for name, value in recorder.recorded.items():
                chunks.setdefault(name, []).append(value)
    finally:
        recorder.close()
    return {name: torch.cat(parts) for name, parts in chunks.items()}, edited


def key_choices(raw: dict[str, torch.Tensor], edited: str) -> dict[str, torch.Tensor]:
    """The compared keys: each recorded one alone, and the edited layer's key concatenated with a
    pooled image part (both L2-normalised, the image part weighted)."""
    normalise = torch.nn.functional.normalize
    choices = {edited + " (today)": raw[edited]}
    order = sorted(raw, key=lambda name: (name.endswith(".mean"), not name.endswith(".down_proj"), name))
    choices.update({name: raw[name] for name in order if name != edited})
    for image_part in ("vision.mean", "projector.mean"):
        for weight in IMAGE_WEIGHTS:
            choices[f"{edited} + {weight}*{image_part}"] = torch.cat(
                [normalise(raw[edited], dim=-1), weight * normalise(raw[image_part], dim=-1)], dim=-1
            )  # (N, Din + Dimage)
    return choices


# ----- metrics ----------------------------------------------------------------------------------
def auc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an in-scope distance < an out-of-scope one), ties counted half."""
    if not len(inside) or not len(outside):
        return float("nan")
    less = (inside[:, None] < outside[None, :]).float().mean()
    ties = (inside[:, None] == outside[None, :]).float().mean()
    return float(less + 0.5 * ties)


def best_balanced_accuracy(inside: torch.Tensor, outside: torch.Tensor) -> tuple[float, float]:
    """The best (share of `inside` within r + share of `outside` beyond r) / 2 over radii r, and the
    smallest radius that reaches it (an input at distance d is inside when d <= r)."""
    radii = torch.cat([torch.tensor([-1.0]), inside, outside]).unique()  # (R,) sorted
    inside_share = (inside[None, :] <= radii[:, None]).float().mean(dim=1)  # (R,)
    outside_share = (outside[None, :] > radii[:, None]).float().mean(dim=1)  # (R,)
    balanced = (inside_share + outside_share) / 2
    best = int(torch.argmax(balanced))  # first maximum: the smallest radius
    return float(balanced[best]), float(max(radii[best], 0.0))


def coverage(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Share of `inside` strictly nearer than the nearest of `outside`: what a radius can cover
    while every out-of-scope input stays out (BalancEdit's radius lies below its nearest negative)."""
    if not len(outside):
        return 1.0
    return float((inside < outside.min()).float().mean())


def percentiles(values: torch.Tensor) -> dict[str, float]:
    if not len(values):
        return {"p5": float("nan"), "median": float("nan"), "p95": float("nan"), "count": 0}
    q = torch.quantile(values.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"p5": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "count": int(len(values))}


@dataclass
class Pairs:
    """Where each compared input of one anchor stands, by row of the query list."""

    in_rephrase: list[int]  # anchor image, other phrasings
    other_question: list[int]  # anchor image, the other attribute's phrasings
    in_image: list[int] = field(default_factory=list)  # other in-scope images, fact's question
    out_hard: list[int] = field(default_factory=list)  # out of scope, sharing an attribute, fact's question
    out_other: list[int] = field(default_factory=list)  # the rest out of scope, fact's question
    # Class scopes: the in_image rows whose varying attribute differs from the anchor's (a colour
    # class anchored on a triangle: its circles and rectangles). Empty for instance scopes.
    in_image_cross: list[int] = field(default_factory=list)


def pairs_of(anchor: Anchor, images: Sequence[Any], row: Callable[[int, str, int], int]) -> Pairs:
    """row(image index, attribute, phrasing index) -> query row."""
    scope = anchor.scope
    other = "colour" if scope.attribute == "shape" else "shape"
    anchor_image = images[anchor.image_index]
    pairs = Pairs(
        in_rephrase=[row(anchor.image_index, scope.attribute, p) for p in range(1, 4)],
        other_question=[row(anchor.image_index, other, p) for p in range(4)],
    )
    varying = "colour" if scope.attribute == "shape" else "shape"
    for i, image in enumerate(images):
        if i == anchor.image_index:
            continue
        target = row(i, scope.attribute, 0)
        if scope.contains(image):
            pairs.in_image.append(target)
            if scope.kind == "class" and getattr(image, varying) != getattr(anchor_image, varying):
                pairs.in_image_cross.append(target)
        elif scope.is_hard(image, anchor_image):
            pairs.out_hard.append(target)
        else:
            pairs.out_other.append(target)
    return pairs


def measure(
    anchors: Sequence[Anchor],
    images: Sequence[Any],
    queries_rows: Callable[[int, str, int], int],
    choices: dict[str, torch.Tensor],
    raw_out: Path | None,
    query_labels: Sequence[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Per key choice and group: pooled distance percentiles and per-anchor separability."""
    from editor.radius import pairwise_distances

    parts = ("in", "in_image", "in_rephrase", "in_image_cross", "out_hard", "out", "other_question", "anchors")
    collected: dict[str, dict[str, dict[str, list[Any]]]] = {
        name: {group: {part: [] for part in parts} for group in GROUPS} for name in choices
    }
    raw_file = gzip.open(raw_out, "wt") if raw_out is not None else None
    try:
        if raw_file is not None:  # first line: what each query row is; then one line per anchor
            raw_file.write(json.dumps({"queries": list(query_labels)}) + "\n")
        for anchor in anchors:
            pairs = pairs_of(anchor, images, queries_rows)
            anchor_row = queries_rows(anchor.image_index, anchor.scope.attribute, 0)
            record: dict[str, Any] = {
                "scope": anchor.scope.label,
                "anchor": query_labels[anchor_row],
                "rows": {k: v for k, v in vars(pairs).items()},
                "distances": {},
                "separability": {},
            }
            every = sorted(set().union(*vars(pairs).values()))
            for name, keys in choices.items():
                distance = pairwise_distances(keys[anchor_row][None], keys[every], "cosine")[0]  # (M,)
                at = dict(zip(every, distance.tolist(), strict=True))
                d = {k: torch.tensor([at[r] for r in v]) for k, v in vars(pairs).items()}
                inside = torch.cat([d["in_image"], d["in_rephrase"]])
                outside = torch.cat([d["out_hard"], d["out_other"]])
                accuracy, radius = best_balanced_accuracy(inside, outside)
                hard_accuracy, _ = best_balanced_accuracy(inside, d["out_hard"])
                summary = {
                    "auc": auc(inside, outside),
                    "auc_hard": auc(inside, d["out_hard"]),
                    "auc_other_question": auc(inside, d["other_question"]),
                    "balanced_accuracy": accuracy,
                    "balanced_accuracy_hard": hard_accuracy,
                    "radius": radius,
                    "coverage": coverage(inside, outside),
                    "coverage_hard": coverage(inside, d["out_hard"]),
                    "coverage_cross": coverage(d["in_image_cross"], outside) if len(d["in_image_cross"]) else None,
                }
                for group in anchor.group(images):
                    bucket = collected[name][group]
                    bucket["in"].append(inside)
                    bucket["in_image"].append(d["in_image"])
                    bucket["in_rephrase"].append(d["in_rephrase"])
                    bucket["in_image_cross"].append(d["in_image_cross"])
                    bucket["out_hard"].append(d["out_hard"])
                    bucket["out"].append(outside)
                    bucket["other_question"].append(d["other_question"])
                    bucket["anchors"].append(summary)
                record["separability"][name] = summary
                record["distances"][name] = {k: [round(x, 7) for x in v.tolist()] for k, v in d.items()}
            if raw_file is not None:
                raw_file.write(json.dumps(record) + "\n")
    finally:
        if raw_file is not None:
            raw_file.close()

    result: dict[str, dict[str, Any]] = {}
    for name, groups in collected.items():
        result[name] = {}
        for group, bucket in groups.items():
            summaries = bucket["anchors"]
            if not summaries:
                continue

            def mean(metric: str, rows: list[dict[str, float]] = summaries) -> float:
                return sum(r[metric] for r in rows) / len(rows)

            result[name][group] = {
                "anchors": len(summaries),
                "in": percentiles(torch.cat(bucket["in"])),
                "in_image": percentiles(torch.cat(bucket["in_image"])),
                "in_rephrase": percentiles(torch.cat(bucket["in_rephrase"])),
                "out_hard": percentiles(torch.cat(bucket["out_hard"])),
                "out": percentiles(torch.cat(bucket["out"])),
                "other_question": percentiles(torch.cat(bucket["other_question"])),
                "auc": mean("auc"),
                "auc_hard": mean("auc_hard"),
                "auc_other_question": mean("auc_other_question"),
                "balanced_accuracy": mean("balanced_accuracy"),
                "balanced_accuracy_worst": min(r["balanced_accuracy"] for r in summaries),
                "balanced_accuracy_hard": mean("balanced_accuracy_hard"),
                "coverage": mean("coverage"),
                "coverage_hard": mean("coverage_hard"),
                "coverage_cross": (mean("coverage_cross") if summaries[0]["coverage_cross"] is not None else None),
                "in_image_cross": percentiles(torch.cat(bucket["in_image_cross"])),
                "separable_anchors": sum(r["balanced_accuracy"] == 1.0 for r in summaries),
            }
    return result


# ----- report -----------------------------------------------------------------------------------
def number(value: float) -> str:
    return f"{value:.3g}" if value == value else "-"


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    keys = result["keys"]
    lines = [
        "# Scope keys: in-scope vs out-of-scope distances on the demo model",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: `{result['commit']}`; edited layer `{setup['edited_layer']}`; {setup['images']} easy-VQA "
        f"TRAIN images ({setup['per_cell']} per colour-shape cell, seed {setup['seed']}), {setup['anchors']} "
        f"anchors, {setup['queries']} queries; cosine distance; {result['seconds']:.0f} s on "
        f"{result['machine']['cpus']} CPUs, {result['machine']['torch_threads']} torch thread(s).",
        "",
        "In scope: other in-scope images with the fact's question (in, images), and the anchor image with "
        "the fact's three other phrasings (in, rephrased). Out of scope: out-of-scope images with the "
        "fact's question; hard: those sharing an attribute (class shape: the anchor's colour; class "
        "colour: the anchor's shape; instance shape: the same shape in another colour; instance colour: "
        "the same colour on another shape).",
        "",
        "Separability is per anchor (an entry has one radius around its own key), averaged over the "
        "anchors of a scope type: AUC = P(in-scope input nearer than out-of-scope one); bal. acc. = the "
        "best single radius's (share of in-scope inside + share of out-of-scope outside) / 2; worst = the "
        "worst anchor's bal. acc.; sep. = anchors with bal. acc. 1; other-q AUC = in-scope inputs "
        "against the anchor image asked the other attribute's four phrasings (another question about "
        "the edited image must stay out). Distances are p5 / median / p95 over every anchor's pairs.",
        "",
        "## Summary: mean AUC over anchors (in scope vs all out of scope / vs hard out of scope)",
        "",
        "| key | " + " | ".join(GROUPS) + " | other-q AUC (min over groups) |",
        "|---|" + "---|" * (len(GROUPS) + 1),
    ]
    for name, groups in keys.items():
        cells = [f"{groups[g]['auc']:.3f} / {groups[g]['auc_hard']:.3f}" for g in GROUPS]
        other = min(groups[g]["auc_other_question"] for g in GROUPS)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {other:.3f} |")
    lines += [
        "",
        "## Summary: mean best balanced accuracy of one radius per anchor (all out / hard out)",
        "",
        "| key | " + " | ".join(GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for name, groups in keys.items():
        cells = [f"{groups[g]['balanced_accuracy']:.3f} / {groups[g]['balanced_accuracy_hard']:.3f}" for g in GROUPS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Summary: mean share of in-scope inputs nearer than the anchor's nearest out-of-scope input "
        "(all out / hard out)",
        "",
        "What a radius can cover with every out-of-scope input left out (BalancEdit's radius lies "
        "below its nearest negative).",
        "",
        "| key | " + " | ".join(GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for name, groups in keys.items():
        cells = [f"{groups[g]['coverage']:.3f} / {groups[g]['coverage_hard']:.3f}" for g in GROUPS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    class_groups = [g for g in GROUPS if g.startswith("class")]
    lines += [
        "",
        "## Class scopes: in-scope images of another kind than the anchor",
        "",
        "The other shapes of a colour class, the other colours of a shape class: median distance to the "
        "anchor, and the mean share nearer than the anchor's nearest out-of-scope input.",
        "",
        "| key | " + " | ".join(class_groups) + " |",
        "|---|" + "---|" * len(class_groups),
    ]
    for name, groups in keys.items():
        cells = [
            f"{number(groups[g]['in_image_cross']['median'])} / {groups[g]['coverage_cross']:.3f}" for g in class_groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")

    def spread(p: dict[str, float]) -> str:
        return f"{number(p['p5'])} / {number(p['median'])} / {number(p['p95'])}"

    for group in GROUPS:
        anchors = next(iter(keys.values()))[group]["anchors"]
        lines += [
            f"## {group} ({anchors} anchors)",
            "",
            "| key | in, images | in, rephrased | hard out | all out | AUC | AUC hard | bal. acc. | worst "
            "| bal. acc. hard | sep. | other-q AUC |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, groups in keys.items():
            row = groups[group]
            lines.append(
                f"| {name} | {spread(row['in_image'])} | {spread(row['in_rephrase'])} | "
                f"{spread(row['out_hard'])} | {spread(row['out'])} | {row['auc']:.3f} | {row['auc_hard']:.3f} | "
                f"{row['balanced_accuracy']:.3f} | {row['balanced_accuracy_worst']:.3f} | "
                f"{row['balanced_accuracy_hard']:.3f} | {row['separable_anchors']}/{row['anchors']} | "
                f"{row['auc_other_question']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head or "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-cell", type=int, default=20, help="sampled TRAIN images per (colour, shape) cell")
    parser.add_argument(
        "--anchors-per-value",
        type=int,
        default=3,
        help="anchors per colour (shape class), per shape (colour class), per cell (instance)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/scope_keys.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench/results/scope_keys.md")
    parser.add_argument("--raw-out", type=Path, default=ROOT / "bench/out/scope_keys-pairs.jsonl.gz")
    args = parser.parse_args(argv)
    if args.anchors_per_value > args.per_cell:
        parser.error("--anchors-per-value cannot exceed --per-cell")

    torch.set_num_threads(1)
    import editor
    from editor.backbones import Query

    started = time.perf_counter()
    images = sample_images(args.per_cell, args.seed)
    anchors = choose_anchors(images, args.anchors_per_value)
    backbone = editor.load_backbone("demo")
    queries: list[Query] = []
    labels: list[dict[str, Any]] = []
    rows: dict[tuple[int, str, int], int] = {}
    for i, image in enumerate(images):
        opened = backbone.query(image.path, "")  # validated once, reused for every question
        for attribute in ("shape", "colour"):
            for p, question in enumerate(phrasings(attribute, image)):
                rows[(i, attribute, p)] = len(queries)
                queries.append(Query(opened.image, question))
                labels.append(
                    {"easy_vqa_id": image.image_id, "shape": image.shape, "colour": image.colour, "question": question}
                )
    with editor.Editor(backbone) as ed:
        raw, edited = raw_keys(ed, queries)
        layer = ed.layer
    print(f"keys of {len(queries)} queries in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    choices = key_choices(raw, edited)
    args.raw_out.parent.mkdir(parents=True, exist_ok=True)
    keys = measure(anchors, images, lambda i, a, p: rows[(i, a, p)], choices, args.raw_out, labels)
    result = {
        "command": " ".join([".venv/bin/python", "bench/scope_keys.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "setup": {
            "model": "demo",
            "edited_layer": layer,
            "distance": "cosine",
            "split": "easy-VQA TRAIN",
            "per_cell": args.per_cell,
            "anchors_per_value": args.anchors_per_value,
            "seed": args.seed,
            "images": len(images),
            "anchors": len(anchors),
            "queries": len(queries),
            "image_weights": list(IMAGE_WEIGHTS),
        },
        "keys": keys,
        "machine": machine_facts(),
    }
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.markdown.write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
