"""The model families kb-daemon edits, as data: where the layers are, what a prompt looks like.

Imports nothing heavy (no torch, no transformers), so that a model directory's family can be read
before, or without, loading its weights (see `editor.text_side`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editor.errors import EditorError, UnsupportedBackboneError

BACKBONE_FILE = "kb_backbone.json"


@dataclass(frozen=True)
class FamilySpec:
    """Where things are in one architecture family (live module paths, transformers 5.x)."""

    name: str
    decoder_layers: str  # the nn.ModuleList of decoder layers
    head: tuple[str, ...]  # modules after the decoder stack, applied in order (absent ones skipped)
    mlp_output: str  # the MLP output projection inside one decoder layer
    needs_image: bool
    passes_position_ids: bool  # False where the model derives positions from the attention mask
    prompt_template: str
    answer_prefix: str
    vision: str = ""  # the vision encoder, whose forward sees each distinct image once per batch
    # The module whose output is the image as the text decoder receives it (B, tokens, D): the
    # image part of a key under `image_key_weight` is its mean over the tokens.
    image_features: str = ""


LLAVA = FamilySpec(
    "llava", "model.language_model.layers", ("model.language_model.norm", "lm_head"),
    "mlp.down_proj", True, True, "USER: <image>\n{question} ASSISTANT:", " ", "model.vision_tower",
    "model.multi_modal_projector",
)
BLIP2 = FamilySpec(
    "blip2", "language_model.model.decoder.layers",
    ("language_model.model.decoder.final_layer_norm", "language_model.model.decoder.project_out",
     "language_model.lm_head"),
    "fc2", True, False, "Question: {question} Answer:", " ", "vision_model", "language_projection",
)
GPT2 = FamilySpec(
    "gpt2", "transformer.h", ("transformer.ln_f", "lm_head"), "mlp.c_proj", False, True,
    "Q: {question}\nA:", " ",
)
LLAMA_LM = FamilySpec(
    "llama", "model.layers", ("model.norm", "lm_head"), "mlp.down_proj", False, True,
    "Q: {question}\nA:", " ",
)
OPT_LM = FamilySpec(
    "opt", "model.decoder.layers",
    ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    "fc2", False, False, "Q: {question}\nA:", " ",
)
FAMILIES = {f.name: f for f in (LLAVA, BLIP2, GPT2, LLAMA_LM, OPT_LM)}
_CAUSAL_BY_MODEL_TYPE = {"gpt2": GPT2, "llama": LLAMA_LM, "qwen2": LLAMA_LM, "mistral": LLAMA_LM,
                         "opt": OPT_LM}
_LLAVA_TEXT_TYPES = {"llama", "qwen2", "mistral"}


def family_of_config(config: Any) -> FamilySpec:
    """The family of a model from its config alone (`detect_family` without the weights): a
    transformers config object or the dict of its config.json."""
    model_type = _field(config, "model_type")
    text_type = _field(_field(config, "text_config"), "model_type")
    if model_type == "llava":
        if text_type not in _LLAVA_TEXT_TYPES:
            raise UnsupportedBackboneError(
                f"LLaVA with a {text_type!r} text model is not supported; supported: "
                f"{', '.join(sorted(_LLAVA_TEXT_TYPES))}"
            )
        return LLAVA
    if model_type == "blip-2":
        if text_type != "opt":
            raise UnsupportedBackboneError(f"BLIP-2 with a {text_type!r} text model is not supported; use OPT")
        return BLIP2
    spec = _CAUSAL_BY_MODEL_TYPE.get(model_type or "")
    if spec is None:
        raise UnsupportedBackboneError(
            f"model_type {model_type!r} is not supported; supported: llava, blip-2, and causal LMs of type "
            + ", ".join(sorted(_CAUSAL_BY_MODEL_TYPE))
        )
    return spec


def _field(config: Any, name: str) -> Any:
    if config is None:
        return None
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def model_directory(path: str | os.PathLike[str]) -> Path:
    if str(path) == "demo":
        from editor.demo import DEMO_MODEL_DIR

        directory = Path(DEMO_MODEL_DIR)
    else:
        directory = Path(path)
    if not (directory / "config.json").is_file():
        raise EditorError(f"{str(directory)!r} is not a model directory (no config.json)")
    return directory
