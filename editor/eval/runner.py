"""`run_eval`: apply the cases of a file with one method and score them.

Independent mode (the paper's protocol): before each case the method is reset to the unedited
model (a fresh codebook, the original weights, an empty context), the case's fact is applied, and
the case is scored. Sequential mode: every fact is applied in file order to one model, and every
case is scored at the end; the curve scores the cases applied so far every `curve_every` edits.

The unedited model's answers on the loc probes (the Loc reference) are read once, before the
method touches the model. Only `case.fact` is ever handed to the method.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from editor.backbones import Backbone, load_backbone, load_image
from editor.eval.cases import PROBE_KINDS, EditCase, Probe, load_cases, load_reference_pool
from editor.eval.errors import EvalError
from editor.eval.hparams import CODEBOOK_METHODS, MethodSettings, settings_for
from editor.eval.methods import CodebookMethod, EditMethod
from editor.eval.metrics import (
    FLAVOURS,
    KIND_TO_METRIC,
    METRICS,
    TOP_K,
    aggregate,
    mean,
    rank_agreement,
    same_answer,
    token_accuracy,
)
from editor.eval.readout import Readout
from editor.fact import Fact, Negative
from editor.samples import ReferenceItem

logger = logging.getLogger(__name__)

POOL_FILE = "reference_pool.jsonl"
REPORT_FORMAT_VERSION = 1
Progress = Callable[[str], None]


class ImageCache:
    """Images by path, opened once (RGB) and kept while the run needs them."""

    def __init__(self, size: int = 1024) -> None:
        self._open = lru_cache(maxsize=size)(load_image)

    def __call__(self, path: Path | None) -> Image.Image | None:
        return None if path is None else self._open(path)


class LocReference:
    """The unedited model's greedy answer and top-k tokens on each loc probe, and its greedy
    answer on each of `others` (to tell a spliced answer from the unedited one)."""

    def __init__(
        self, readout: Readout, backbone: Backbone, probes: Sequence[Probe], images: ImageCache,
        others: Sequence[Probe] = (),
    ) -> None:
        unique = list(dict.fromkeys((p.image, p.question) for p in probes))
        seen = set(unique)
        extra = [key for key in dict.fromkeys((p.image, p.question) for p in others) if key not in seen]
        queries = [backbone.query(images(image), question) for image, question in [*unique, *extra]]
        answers = [g.text for g in readout.generate(queries)] if queries else []
        ranked = readout.ranked(queries[: len(unique)], answers[: len(unique)], TOP_K) if unique else []
        self._answers = dict(zip([*unique, *extra], answers, strict=True))
        self._ranked = dict(zip(unique, ranked, strict=True))

    def answer(self, probe: Probe) -> str:
        return self._answers[(probe.image, probe.question)]

    def ranked(self, probe: Probe) -> torch.Tensor:
        return self._ranked[(probe.image, probe.question)]


def to_fact(case: EditCase, images: ImageCache) -> Fact:
    """The only thing a method sees of a case."""
    spec = case.fact
    return Fact(
        images(spec.image),
        spec.question,
        spec.answer,
        rephrases=spec.rephrases,
        negatives=tuple(Negative(image=images(n.image), question=n.question) for n in spec.negatives),
        fact_id=case.case_id,
    )


def score_case(
    method: EditMethod, case: EditCase, reference: LocReference, images: ImageCache, readout: Readout
) -> dict[str, Any]:
    """Scores of one case under the method's current state: per probe and per metric, both flavours."""
    probes = [(kind, probe) for kind in PROBE_KINDS for probe in case.probes(kind)]
    if not probes:
        empty: dict[str, Any] = {f: {m: None for m in METRICS} for f in FLAVOURS}
        return {**empty, "probes": []}
    inputs = [(images(p.image), p.question) for _, p in probes]
    targets = [reference.answer(p) if kind == "loc" else str(p.answer) for kind, p in probes]
    generated = method.generate(inputs)
    ranked = method.ranked(inputs, targets, TOP_K)
    nearest_of = getattr(method, "nearest", None)
    nearest = nearest_of(inputs) if callable(nearest_of) else [{} for _ in inputs]
    rows = []
    for (kind, probe), target, answer, top, near in zip(
        probes, targets, generated, ranked, nearest, strict=True
    ):
        if kind == "loc":
            token = rank_agreement(top, reference.ranked(probe))
        else:
            token = token_accuracy(top[:, 0], readout.target_ids(target))
        row: dict[str, Any] = {
            "kind": kind,
            "image": None if probe.image is None else probe.image.name,
            "question": probe.question,
            "target": target,
            "prediction": answer.text,
            "exact": same_answer(answer.text, target),
            "token": token,
        }
        if answer.fired is not None:
            row["fired"] = answer.fired
            # Spliced: neither the fired entry's whole answer nor the unedited model's answer.
            row["spliced"] = bool(answer.fired) and not (
                same_answer(answer.text, answer.entry_answer or "")
                or same_answer(answer.text, reference.answer(probe)))
        row.update(near)
        rows.append(row)
    scores: dict[str, Any] = {}
    for flavour in FLAVOURS:
        scores[flavour] = {
            KIND_TO_METRIC[kind]: mean(float(r[flavour]) for r in rows if r["kind"] == kind)
            for kind in PROBE_KINDS
        }
    scores["probes"] = rows
    return scores


def _build_method(
    settings: MethodSettings,
    backbone: Backbone,
    pool: list[ReferenceItem],
    cases: list[EditCase],
    images: ImageCache,
    progress: Progress,
) -> EditMethod:
    if settings.method in CODEBOOK_METHODS:
        return CodebookMethod(backbone, settings, pool)
    if settings.method == "ft":
        from editor.eval.finetune import FineTune

        assert settings.finetune is not None
        return FineTune(backbone, settings.finetune, settings.finetune.layer or None)
    from editor.eval.easyvqa import development_cases, file_digest

    case_digests = {file_digest(p) for c in cases for p in c.image_paths()}
    if settings.method == "ike":
        from editor.eval.incontext import DemoSource, InContext

        config = settings.incontext
        assert config is not None
        demo_cases = development_cases(config.num_demo_edits, config.seed, case_digests)
        sources = [
            DemoSource(
                c.fact.question,
                c.fact.answer,
                (c.fact.rephrases or (c.fact.question,))[0],
                c.loc[-1].question,
                str(c.loc[-1].answer),
            )
            for c in demo_cases
            if c.loc and c.loc[-1].answer
        ]
        return InContext(backbone, config, sources)
    from editor.eval.mend import Mend, TrainingEdit

    mend = settings.mend
    assert mend is not None
    training = []
    for c in development_cases(mend.num_train_edits, mend.seed, case_digests):
        fact = to_fact(c, images)
        outer = [(fact.image, fact.question, fact.answer)]
        outer += [(fact.image, q, fact.answer) for q in fact.rephrases]
        outer += [(images(p.image), p.question, fact.answer) for p in c.i_gen[:2]]
        loc_probes = [p for p in (c.loc[:2] + c.loc[-1:]) if p.answer]
        loc = tuple((images(p.image), p.question, str(p.answer)) for p in loc_probes)
        training.append(TrainingEdit(fact, tuple(outer), loc))
    progress(f"training MEND on {len(training)} development edits (easy-VQA TRAIN, disjoint from the cases)")
    return Mend(backbone, mend, training, layer=mend.layer or None, progress=progress)


def _checkpoints(total: int, every: int) -> list[int]:
    points = list(range(every, total + 1, every))
    if not points or points[-1] != total:
        points.append(total)
    return points


def _scores_only(result: dict[str, Any]) -> dict[str, Any]:
    return {f: result[f] for f in FLAVOURS}


def run_eval(
    cases_path: str | Path,
    method: str,
    sequential: bool = False,
    model: str | Path | Backbone = "demo",
    *,
    hparams: dict[str, Any] | None = None,
    limit: int | None = None,
    pool_path: str | Path | None = None,
    curve_every: int | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate `method` on the cases of `cases_path`; return (and optionally write) the report.

    Everything that can be checked without the model (method, hyperparameters, the case file, the
    reference pool) is checked before the model is loaded. `model` is "demo", a model directory
    or a loaded `Backbone`. The report holds aggregate metrics under "exact" and "token" (keys acc,
    t_gen, i_gen, loc, hm, in percent), per-case results, the curve, timings and the settings.
    """
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    settings = settings_for(method, hparams)
    cases_path = Path(cases_path)
    cases, pool_path, pool_probes, every = _read_inputs(cases_path, limit, pool_path, curve_every)

    backbone = model if isinstance(model, Backbone) else load_backbone(model)
    say(
        f"{settings.method}, {'sequential' if sequential else 'independent'} mode: {len(cases)} cases on "
        f"{backbone.name}"
    )
    images = ImageCache()
    readout = Readout(backbone, max_new_tokens=settings.max_new_tokens)
    tick = time.perf_counter()
    reference = LocReference(readout, backbone, [p for c in cases for p in c.loc], images,
                             [p for c in cases for kind in PROBE_KINDS if kind != "loc" for p in c.probes(kind)])
    reference_seconds = time.perf_counter() - tick
    pool = [ReferenceItem(images(p.image), p.question) for p in pool_probes]

    tick = time.perf_counter()
    editor_method = _build_method(settings, backbone, pool, cases, images, say)
    setup_seconds = time.perf_counter() - tick
    scorer = _Scorer(editor_method, reference, images, readout)
    try:
        run = (_run_sequential if sequential else _run_independent)(scorer, cases, every, say)
    finally:
        editor_method.close()

    totals = aggregate([_scores_only(run.results[c.case_id]) for c in cases])
    seconds = [run.applied[c.case_id]["seconds"] for c in cases]
    report: dict[str, Any] = {
        "format_version": REPORT_FORMAT_VERSION,
        "method": settings.method,
        "mode": "sequential" if sequential else "independent",
        "model": str(model) if not isinstance(model, Backbone) else backbone.name,
        "model_id": backbone.model_id,
        "cases_file": str(cases_path),
        "num_cases": len(cases),
        "reference_pool": None if pool_path is None else str(pool_path),
        "hparams": settings.to_dict(),
        "exact": totals["exact"],
        "token": totals["token"],
        # Answers that are neither a fired entry's whole answer nor the unedited one, over every
        # probe of every case as finally scored (None for methods without a codebook).
        "spliced": _spliced([run.results[c.case_id] for c in cases]),
        "seconds_per_edit": statistics.fmean(seconds),
        "seconds_per_edit_median": statistics.median(seconds),
        "setup": {**getattr(editor_method, "setup", {}), "seconds": setup_seconds},
        "reference_seconds": reference_seconds,
        "total_seconds": time.perf_counter() - started,
        "curve_every": every,
        "curve": run.curve,
        "cases": [
            {"id": c.case_id, "scope": c.scope, "apply": run.applied[c.case_id], **run.results[c.case_id]}
            for c in cases
        ],
    }
    say(f"done in {report['total_seconds']:.1f}s: {_line(totals)}")
    _write_report(report, json_path, plot_path)
    return report


def _spliced(results: Sequence[dict[str, Any]]) -> int | None:
    rows = [row for result in results for row in result["probes"] if "spliced" in row]
    return sum(row["spliced"] for row in rows) if rows else None


def _read_inputs(
    cases_path: Path, limit: int | None, pool_path: str | Path | None, curve_every: int | None
) -> tuple[list[EditCase], str | Path | None, list[Probe], int]:
    """The cases (the first `limit`), the reference pool's path (by default the one beside the
    case file) and probes, and the curve's interval; raises `EvalError` before any model loads."""
    cases = load_cases(cases_path)
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be at least 1, got {limit}")
        cases = cases[:limit]
    if pool_path is None and (cases_path.parent / POOL_FILE).is_file():
        pool_path = cases_path.parent / POOL_FILE
    pool_probes = load_reference_pool(pool_path) if pool_path is not None else []
    every = curve_every or max(1, len(cases) // 8)
    if every < 1:
        raise EvalError(f"curve_every must be at least 1, got {every}")
    return cases, pool_path, pool_probes, every


@dataclass(frozen=True)
class _Scorer:
    """What applying and scoring a case needs besides the case."""

    method: EditMethod
    reference: LocReference
    images: ImageCache
    readout: Readout

    def apply(self, case: EditCase) -> dict[str, Any]:
        return _apply(self.method, case, self.images)

    def score(self, case: EditCase) -> dict[str, Any]:
        return score_case(self.method, case, self.reference, self.images, self.readout)


@dataclass
class _Run:
    """A mode's results: apply details and scores per case id, and the curve."""

    applied: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)


def _run_sequential(scorer: _Scorer, cases: list[EditCase], every: int, say: Progress) -> _Run:
    """Every fact in file order on one model; at each checkpoint the cases applied so far are
    scored (the last checkpoint's scores are the results)."""
    run = _Run()
    scorer.method.reset()
    points = set(_checkpoints(len(cases), every))
    for n, case in enumerate(cases, start=1):
        run.applied[case.case_id] = scorer.apply(case)
        say(f"[{n}/{len(cases)}] applied {case.case_id} in {run.applied[case.case_id]['seconds']:.2f}s")
        if n in points:
            scored = {c.case_id: scorer.score(c) for c in cases[:n]}
            point = aggregate([_scores_only(s) for s in scored.values()])
            run.curve.append({"edits": n, **point})
            say(f"after {n} edits: {_line(point)}")
            if n == len(cases):
                run.results = scored
    return run


def _run_independent(scorer: _Scorer, cases: list[EditCase], every: int, say: Progress) -> _Run:
    """Each case on the unedited model: reset, apply its fact, score it."""
    run = _Run()
    for n, case in enumerate(cases, start=1):
        scorer.method.reset()
        run.applied[case.case_id] = scorer.apply(case)
        run.results[case.case_id] = scorer.score(case)
        say(
            f"[{n}/{len(cases)}] {case.case_id}: {run.applied[case.case_id]['seconds']:.2f}s, "
            f"{_line({f: run.results[case.case_id][f] for f in FLAVOURS}, with_hm=False, scale=100.0)}"
        )
        if n % every == 0 or n == len(cases):
            point = aggregate([_scores_only(run.results[c.case_id]) for c in cases[:n]])
            run.curve.append({"edits": n, **point})
    scorer.method.reset()
    return run


def _write_report(report: dict[str, Any], json_path: str | Path | None, plot_path: str | Path | None) -> None:
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if plot_path is not None:
        from editor.eval.plot import plot_curve

        plot_curve(report, plot_path)


def _apply(method: EditMethod, case: EditCase, images: ImageCache) -> dict[str, Any]:
    fact = to_fact(case, images)
    tick = time.perf_counter()
    details = method.apply(fact)
    seconds = time.perf_counter() - tick
    return {**_jsonable(details), "seconds": seconds}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def _line(point: dict[str, dict[str, float | None]], with_hm: bool = True, scale: float = 1.0) -> str:
    """One progress line; `scale` 100 for per-case fractions, 1 for aggregate percents."""
    parts = []
    for flavour in FLAVOURS:
        keys = [*METRICS, "hm"] if with_hm else list(METRICS)
        cells = []
        for key in keys:
            value = point[flavour].get(key)
            cells.append(f"{key}={'-' if value is None else format(scale * value, '.1f')}")
        parts.append(f"{flavour}: {' '.join(cells)}")
    return "; ".join(parts)
