"""Readers that convert the paper's datasets to the case format (`EditCase`).

MMEdit E-VQA (Cheng et al. 2023; records as in its `vqa_eval.json`)::

    {"src": question, "pred": original answer, "alt": new answer, "rephrase": T-Gen question,
     "image": path, "image_rephrase": I-Gen image path, "loc": text question, "loc_ans": its answer,
     "m_loc": image path, "m_loc_q": question, "m_loc_a": answer}

-> fact (image, src, alt) with no rephrases or negatives (the editor makes its own), reliability
(image, src, alt), T-Gen (image, rephrase, alt), I-Gen (image_rephrase, src, alt), Loc
(m_loc, m_loc_q); the text-only Loc (loc) is kept only with `text_loc` (text-only models).

OKEDIT (BalancEdit's OK-VQA edit set; records as its data loader yields them, with paths)::

    {"prompt": question, "pred": original answer (optional), "target": new answer,
     "rephrase_prompts": [10 questions], "image": path, "image_rephrases": [10 image paths],
     "multimodal_locality_image": path, "multimodal_locality_prompt": question (default: prompt),
     "multimodal_locality_ground_truth": answer (optional)}

(`m_loc`, `m_loc_q`, `m_loc_a` are accepted for the locality fields too.) -> fact (image, prompt,
target), T-Gen one probe per rephrased prompt, I-Gen one per rephrased image, Loc the same
question on the image of another object.

`image` and `m_loc` paths start at `image_root`; `image_rephrase(s)` at `rephrase_root` (default
`image_root`); OKEDIT's locality image at `locality_root` (default `rephrase_root`). Records with
an empty new answer are skipped, as the reference loaders do. Input is a JSON array or JSON Lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from editor.eval.cases import EditCase, FactSpec, Probe
from editor.eval.errors import EvalError


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"{path}: cannot be read: {exc}") from exc
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: malformed JSON: {exc}") from exc
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise EvalError(f"{path}: record {index} is not an object")
    return records


def _edit_records(path: Path, answer_field: str) -> Iterator[tuple[int, _Record]]:
    """(index, record) of the file's records whose new answer (`answer_field`) is not empty; the
    reference loaders skip the others."""
    for index, raw in enumerate(_records(path)):
        if str(raw.get(answer_field, "")).strip():
            yield index, _Record(path, index, raw)


class _Record:
    def __init__(self, path: Path, index: int, record: dict[str, Any]) -> None:
        self.where = f"{path}: record {index}"
        self.record = record

    def text(self, *names: str, default: str | None = None) -> str:
        for name in names:
            value = self.record.get(name)
            if isinstance(value, str) and value.strip():
                return value.strip()
        if default is not None:
            return default
        raise EvalError(f"{self.where}: field {names[0]!r} is missing or empty")

    def texts(self, name: str) -> list[str]:
        value = self.record.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise EvalError(f"{self.where}: field {name!r} must be a list of strings")
        return [v.strip() for v in value if v.strip()]

    def image(self, root: Path, *names: str) -> Path:
        relative = self.text(*names)
        path = root / relative
        if not path.is_file():
            raise EvalError(f"{self.where}: {names[0]} {relative!r} not found under {root}")
        return path


def read_mmedit_evqa(
    path: str | Path,
    image_root: str | Path,
    *,
    rephrase_root: str | Path | None = None,
    text_loc: bool = False,
) -> list[EditCase]:
    path, image_root = Path(path), Path(image_root)
    rephrase_root = Path(rephrase_root) if rephrase_root is not None else image_root
    cases = []
    for index, record in _edit_records(path, "alt"):
        image = record.image(image_root, "image")
        question, answer = record.text("src"), record.text("alt")
        loc = [
            Probe(
                record.image(image_root, "m_loc"),
                record.text("m_loc_q"),
                record.text("m_loc_a", default="") or None,
            )
        ]
        if text_loc:
            loc.append(Probe(None, record.text("loc"), record.text("loc_ans", default="") or None))
        cases.append(
            EditCase(
                case_id=f"evqa-{index}",
                scope="mmedit-evqa",
                fact=FactSpec(image, question, answer),
                reliability=(Probe(image, question, answer),),
                t_gen=(Probe(image, record.text("rephrase"), answer),),
                i_gen=(Probe(record.image(rephrase_root, "image_rephrase"), question, answer),),
                loc=tuple(loc),
                meta={"source": "mmedit-evqa", "record": index, "pred": record.record.get("pred")},
            )
        )
    return cases


def read_okedit(
    path: str | Path,
    image_root: str | Path,
    *,
    rephrase_root: str | Path | None = None,
    locality_root: str | Path | None = None,
    text_loc: bool = False,
) -> list[EditCase]:
    """OKEDIT records -> cases (`text_loc` is accepted for symmetry; OKEDIT has no text locality)."""
    path, image_root = Path(path), Path(image_root)
    rephrase_root = Path(rephrase_root) if rephrase_root is not None else image_root
    locality_root = Path(locality_root) if locality_root is not None else rephrase_root
    cases = []
    for index, record in _edit_records(path, "target"):
        image = record.image(image_root, "image")
        question, answer = record.text("prompt"), record.text("target")
        image_rephrases = record.record.get("image_rephrases")
        if not isinstance(image_rephrases, list) or not all(isinstance(p, str) for p in image_rephrases):
            raise EvalError(f"{record.where}: field 'image_rephrases' must be a list of image paths")
        i_gen = []
        for n, relative in enumerate(image_rephrases):
            candidate = rephrase_root / relative
            if not candidate.is_file():
                raise EvalError(
                    f"{record.where}: image_rephrases[{n}] {relative!r} not found under {rephrase_root}"
                )
            i_gen.append(Probe(candidate, question, answer))
        loc_image = record.image(locality_root, "multimodal_locality_image", "m_loc")
        loc_question = record.text("multimodal_locality_prompt", "m_loc_q", default=question)
        loc_answer = record.text("multimodal_locality_ground_truth", "m_loc_a", default="") or None
        cases.append(
            EditCase(
                case_id=f"okedit-{record.record.get('question_id', index)}",
                scope="okedit",
                fact=FactSpec(image, question, answer),
                reliability=(Probe(image, question, answer),),
                t_gen=tuple(Probe(image, q, answer) for q in record.texts("rephrase_prompts")),
                i_gen=tuple(i_gen),
                loc=(Probe(loc_image, loc_question, loc_answer),),
                meta={"source": "okedit", "record": index, "pred": record.record.get("pred")},
            )
        )
    return cases
