"""A loaded model with its editor and the codebook of one version, for workers and `kbctl ask`.

Imports torch and the editor inside methods only, so importing kb_daemon stays light.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from kb_daemon.models import Fact, Model
from kb_daemon.snapshots import get_blob, materialise, set_spec

logger = logging.getLogger(__name__)
EASY_VQA_POOL_SIZE = 120


def load_reference_pool(spec: str | None) -> list[Any]:
    """Reference inputs for hard-negative mining: "easy-vqa[:N]" or a JSON Lines file of
    {"image": path relative to the file, "question": ...}."""
    from PIL import Image

    from editor.samples import ReferenceItem

    if not spec:
        return []
    if spec.startswith("easy-vqa"):
        from easy_vqa import get_train_image_paths, get_train_questions

        size = int(spec.split(":", 1)[1]) if ":" in spec else EASY_VQA_POOL_SIZE
        questions, _answers, image_ids = get_train_questions()
        paths = get_train_image_paths()
        # The last train images: the benchmark builder and the demo draw from the first ones.
        chosen = sorted(set(image_ids))[-size:]
        first_question = {}
        for question, image_id in zip(questions, image_ids, strict=True):
            first_question.setdefault(image_id, question)
        return [ReferenceItem(Image.open(paths[i]).convert("RGB"), first_question[i]) for i in chosen]
    from kb_daemon.ingest import read_inputs

    path = Path(spec)
    return [ReferenceItem(Image.open(path.parent / image).convert("RGB") if image else None, question)
            for image, question in read_inputs(path, "reference pool")]


def open_image(data: bytes | None) -> Any:
    if data is None:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class ModelRuntime:
    """One model loaded once per process; the codebook follows the version asked for."""

    def __init__(self, model: Model) -> None:
        import editor
        from kb_daemon.config import Settings

        settings = Settings.from_env()
        self.name = model.name
        backbone = editor.load_backbone(model.path, edit_layer=model.layer, device=settings.device,
                                        dtype=settings.dtype)
        self.editor = editor.Editor(backbone, layer=model.layer,
                                    reference_pool=load_reference_pool(model.reference_pool),
                                    **dict(model.hparams))
        self.spec = dataclasses.asdict(self.editor.spec)
        self.version: int | None = None

    def check_spec(self, session: Session, model: Model) -> None:
        set_spec(session, model, self.spec)

    def use_version(self, session: Session, model: Model, number: int) -> None:
        if self.version != number:
            self.editor.load_codebook(materialise(session, model, number))
            self.version = number

    def invalidate(self) -> None:
        """Forget the loaded version (after a failed job changed the in-memory codebook)."""
        self.version = None

    def to_editor_fact(self, session: Session, fact: Fact) -> Any:
        import editor

        what = f"fact {fact.id}"
        image = open_image(get_blob(session, fact.image_sha256, what)) if fact.image_sha256 else None
        negatives = []
        for negative in fact.negatives:
            if "image_sha256" in negative:
                negatives.append(editor.Negative(image=open_image(get_blob(session, negative["image_sha256"], what))))
            else:
                negatives.append(editor.Negative(question=negative["question"]))
        return editor.Fact(image, fact.question, fact.answer, rephrases=tuple(fact.rephrases),
                           negatives=tuple(negatives), fact_id=fact.id)
