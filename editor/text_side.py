"""What a model directory says about its inputs, read without torch or the weights.

`read_text_side` gives whether every question needs an image and how many target tokens an answer
takes (`len(Backbone.answer_ids(answer))`: the answer prefix and the answer tokenised without
special tokens, plus the end of sequence). It reads `config.json`, `kb_backbone.json` and, where
the directory has one, `tokenizer.json` through the `tokenizers` library: a few tens of
milliseconds, where loading the processor through transformers costs seconds (torch included).
Directories without a `tokenizer.json` fall back to `editor.backbones.load_text_side`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from editor.families import BACKBONE_FILE, family_of_config, model_directory


@dataclass(frozen=True)
class InputRules:
    needs_image: bool
    count_answer_tokens: Callable[[str], int]


def read_text_side(path: str | os.PathLike[str]) -> InputRules:
    """The input rules of "demo" or a model directory (see the module docstring)."""
    directory = model_directory(path)
    family = family_of_config(json.loads((directory / "config.json").read_text()))
    settings = json.loads((directory / BACKBONE_FILE).read_text()) if (directory / BACKBONE_FILE).is_file() else {}
    prefix = settings.get("answer_prefix")
    prefix = prefix if prefix is not None else family.answer_prefix
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        from editor.backbones import load_text_side

        side = load_text_side(directory)
        return InputRules(side.needs_image, side.count_answer_tokens)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def count(answer: str) -> int:
        return len(tokenizer.encode(prefix + answer, add_special_tokens=False).ids) + 1  # + end of sequence

    return InputRules(family.needs_image, count)
