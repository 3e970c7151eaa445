"""`kbctl demo`: one edit on the shipped demo model, in process, shown before and after."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

QUESTION = "what shape is in the image?"
REPHRASE = "what shape does the image contain?"


def easy_vqa_examples() -> dict[str, list[Path]]:
    """Train-split images of easy-VQA grouped by the answer to the shape question."""
    from easy_vqa import get_train_image_paths, get_train_questions

    questions, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    by_shape: dict[str, list[Path]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        if question == QUESTION and len(by_shape.setdefault(answer, [])) < 4:
            by_shape[answer].append(Path(paths[image_id]))
    return by_shape


def run_demo(echo: Callable[[str], None], new_name: str = "oblong box") -> dict[str, object]:
    """Rename one rectangle's shape to `new_name` and show which inputs follow the edit."""
    import editor

    by_shape = easy_vqa_examples()
    rectangle, other_rectangle = by_shape["rectangle"][:2]
    circle = by_shape["circle"][0]
    backbone = editor.load_backbone("demo")
    probes = [
        ("edited image", rectangle, QUESTION),
        ("rephrased question", rectangle, REPHRASE),
        ("another rectangle", other_rectangle, QUESTION),
        ("a circle", circle, QUESTION),
        ("another question", rectangle, "what color is the shape?"),
    ]
    with editor.Editor(backbone) as ed:
        before = ed.answers([(image, question) for _, image, question in probes])
        echo(f"Fact: on {rectangle.name}, '{QUESTION}' -> '{new_name}'")
        report = ed.apply(editor.Fact(rectangle, QUESTION, new_name))
        echo(f"Applied in {report.seconds:.2f} s ({report.steps} optimisation steps, radius "
             f"{report.radius:.3f}, {report.num_hard_negatives} hard negatives)")
        after = ed.answers([(image, question) for _, image, question in probes])
    width = max(len(label) for label, _, _ in probes)
    echo(f"{'input':<{width}}  {'before':<14}  after")
    for (label, _, _), old, new in zip(probes, before, after, strict=True):
        echo(f"{label:<{width}}  {old.text:<14}  {new.text}{'  (edit fired)' if new.fact_id else ''}")
    return {"report": report.to_dict(), "before": [a.text for a in before], "after": [a.text for a in after]}


def demo_image_path() -> Path:
    """An easy-VQA training image of a rectangle, for the quick start."""
    return easy_vqa_examples()["rectangle"][0]


if __name__ == "__main__":
    print(demo_image_path())
