"""One explicit description per model family: how to build inputs and where the layers are.

Supported: LLaVA (`LlavaForConditionalGeneration`, Llama / Qwen2 / Mistral text model), BLIP-2
(`Blip2ForConditionalGeneration`, OPT text model) and text-only causal LMs (GPT-2, Llama, Qwen2,
Mistral, OPT) for facts without an image.

A model directory may carry `kb_backbone.json` (family, prompt template, answer prefix, default
edited layer); otherwise the family's defaults below apply.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from editor.errors import EditorError, InvalidFactError, UnsupportedBackboneError
from editor.fact import ImageInput
from editor.families import (  # noqa: F401  (names of this module's public API)
    _CAUSAL_BY_MODEL_TYPE,
    _LLAVA_TEXT_TYPES,
    BACKBONE_FILE,
    BLIP2,
    FAMILIES,
    GPT2,
    LLAMA_LM,
    LLAVA,
    OPT_LM,
    FamilySpec,
    family_of_config,
    model_directory,
)
from editor.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, read_image_file


def share_repeated_images(vision: nn.Module) -> None:
    """Make `vision` encode each distinct image of a batch once and repeat the result per row.

    An edit feeds the same image with many questions (rephrasings, other questions about the
    image); the encoder's output for a row depends only on that row's pixels, so identical rows
    are computed once. Done with hooks: the module, its parameters and their names are unchanged.
    """
    if getattr(vision, "_kb_shares_images", False):
        return
    pending: list[torch.Tensor | None] = []

    def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        pixels = args[0] if args else kwargs.get("pixel_values")
        inverse = None
        if isinstance(pixels, torch.Tensor) and pixels.shape[0] > 1 and not pixels.requires_grad:
            unique, inverse = torch.unique(pixels.flatten(1), dim=0, return_inverse=True)
            if unique.shape[0] == pixels.shape[0]:
                inverse = None
            else:
                unique = unique.view(-1, *pixels.shape[1:])
                if args:
                    args = (unique, *args[1:])
                else:
                    kwargs = {**kwargs, "pixel_values": unique}
        pending.append(inverse)
        return args, kwargs

    def after(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        inverse = pending.pop()
        if inverse is None:
            return output
        return _repeat_rows(output, inverse, int(inverse.max()) + 1)

    vision.register_forward_pre_hook(before, with_kwargs=True)
    vision.register_forward_hook(after, with_kwargs=True)
    vision._kb_shares_images = True  # type: ignore[assignment]


def drop_word_cache(tokenizer: Any) -> None:
    """Turn off the word cache of a fast tokenizer's BPE or Unigram model, if it has one.

    The `tokenizers` library keeps the result of every "word" it has split, up to 10,000 of them,
    for the life of the process. What counts as a word depends on the pre-tokenizer: the demo
    model's byte-level tokenizer (like any tokenizer with no splitting pre-tokenizer) takes a whole
    text of up to 256 characters as one word, and word-splitting tokenizers still keep every
    distinct name and number. A daemon tokenizes texts that seldom repeat (each fact's answer,
    its rephrasings), so the cache only grows until it is full, and is never given back: measured,
    2.2 KB per distinct 55-character text, 22 MB once 10,000 are kept (longer texts, from 256
    characters, are not kept). Splitting a text again costs microseconds against the
    milliseconds of a forward pass.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    resize = getattr(getattr(backend, "model", None), "_resize_cache", None)
    if resize is not None:  # None: a slow tokenizer, or a model kind without a cache (WordPiece, WordLevel)
        resize(0)


def _repeat_rows(value: Any, inverse: torch.Tensor, unique_rows: int) -> Any:
    """Every tensor in `value` with `unique_rows` rows, expanded back to one row per input."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == unique_rows:
            return value.index_select(0, inverse.to(value.device))
        return value
    if isinstance(value, dict):  # ModelOutput is an ordered dict of its set fields
        for key in list(value.keys()):
            value[key] = _repeat_rows(value[key], inverse, unique_rows)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_rows(v, inverse, unique_rows) for v in value)
    return value


def detect_family(model: nn.Module) -> FamilySpec:
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if kind == "LlavaForConditionalGeneration":
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        if text_type not in _LLAVA_TEXT_TYPES:
            raise UnsupportedBackboneError(
                f"LLaVA with a {text_type!r} text model is not supported; supported: "
                f"{', '.join(sorted(_LLAVA_TEXT_TYPES))}"
            )
        return LLAVA
    if kind == "Blip2ForConditionalGeneration":
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        if text_type != "opt":
            raise UnsupportedBackboneError(f"BLIP-2 with a {text_type!r} text model is not supported; use OPT")
        return BLIP2
    model_type = getattr(config, "model_type", None)
    if kind.endswith("ForCausalLM") or kind == "GPT2LMHeadModel":
        spec = _CAUSAL_BY_MODEL_TYPE.get(model_type or "")
        if spec is not None:
            return spec
    raise UnsupportedBackboneError(
        f"{kind} (model_type {model_type!r}) is not supported; supported: LlavaForConditionalGeneration, "
        "Blip2ForConditionalGeneration, and causal LMs of type " + ", ".join(sorted(_CAUSAL_BY_MODEL_TYPE))
    )


def end_of_sequence_id(tokenizer: Any, generation_config: Any) -> int:
    """The token that ends an answer: the tokenizer's, else the generation config's (the first
    of a list)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise UnsupportedBackboneError("the tokenizer has no end-of-sequence token")
    return int(eos)


def answer_token_ids(tokenizer: Any, answer_prefix: str, eos_token_id: int, answer: str) -> list[int]:
    """An answer's target tokens: `answer_prefix + answer` without special tokens, then the end
    of sequence."""
    ids = tokenizer(answer_prefix + answer, add_special_tokens=False)["input_ids"]
    return list(ids) + [eos_token_id]


@dataclass(frozen=True)
class TextSide:
    """What a model directory says about its inputs without loading its weights: whether every
    question needs an image, and how many target tokens an answer takes (`Backbone.answer_ids`)."""

    name: str
    family: FamilySpec
    tokenizer: Any
    answer_prefix: str
    eos_token_id: int

    @property
    def needs_image(self) -> bool:
        return self.family.needs_image

    def count_answer_tokens(self, answer: str) -> int:
        """len(Backbone.answer_ids(answer)) for the same directory: the answer's tokens plus the
        end of sequence, the length `max_answer_tokens` limits."""
        return len(answer_token_ids(self.tokenizer, self.answer_prefix, self.eos_token_id, answer))


def load_text_side(path: str | os.PathLike[str]) -> TextSide:
    """The `TextSide` of "demo" or a model directory: its config, `kb_backbone.json`, tokenizer
    (a vision model's processor's) and generation config, no weights. Chooses the family, answer
    prefix and end of sequence exactly as `load_backbone` does, so the counts agree."""
    import transformers

    directory = model_directory(path)
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    family = family_of_config(config)
    settings: dict[str, Any] = {}
    if (directory / BACKBONE_FILE).is_file():
        settings = json.loads((directory / BACKBONE_FILE).read_text())
    if family.needs_image:
        processor = transformers.AutoProcessor.from_pretrained(directory, local_files_only=True)
        tokenizer = getattr(processor, "tokenizer", processor)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    drop_word_cache(tokenizer)
    # What `from_pretrained` gives a model: generation_config.json, else one derived from config.
    try:
        generation = transformers.GenerationConfig.from_pretrained(directory, local_files_only=True)
    except OSError:
        generation = transformers.GenerationConfig.from_model_config(config)
    prefix = settings.get("answer_prefix")
    return TextSide(
        name=str(directory), family=family, tokenizer=tokenizer,
        answer_prefix=prefix if prefix is not None else family.answer_prefix,
        eos_token_id=end_of_sequence_id(tokenizer, generation),
    )


ScoresProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Query:
    """One model input: an optional image and a question."""

    image: Image.Image | None
    question: str


@dataclass
class Batch:
    """Left-padded inputs. With answers, each row is prompt + answer tokens + end of sequence."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (B, C, H, W)
    key_positions: torch.Tensor  # (B,) last prompt token of each row
    targets: torch.Tensor | None = None  # (B, L) answer ids + eos, predicted at key + 0..L-1

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def load_image(image: ImageInput) -> Image.Image:
    """Open and validate an image (size, pixel count, a complete file) and return it as RGB."""
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise InvalidFactError(
                f"image of {image.width}x{image.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS:,}"
            )
        return image.convert("RGB")
    if image is None:
        raise InvalidFactError("an image is required for this model")
    _, opened = read_image_file(image, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS)
    return opened.convert("RGB")


def image_bytes(image: Image.Image | None) -> bytes | None:
    """Canonical bytes of an image (mode, size, raw pixels) for fingerprints."""
    if image is None:
        return None
    buffer = io.BytesIO()
    buffer.write(f"{image.mode}:{image.width}x{image.height}:".encode())
    buffer.write(image.tobytes())
    return buffer.getvalue()


class Backbone:
    """A frozen model plus what it takes to feed it (Query, answer) pairs."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        family: FamilySpec | None = None,
        prompt_template: str | None = None,
        answer_prefix: str | None = None,
        edit_layer: str | None = None,
        name: str | None = None,
        model_id: str | None = None,
    ) -> None:
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.family = family or detect_family(model)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        drop_word_cache(self.tokenizer)
        self.prompt_template = prompt_template if prompt_template is not None else self.family.prompt_template
        self.answer_prefix = answer_prefix if answer_prefix is not None else self.family.answer_prefix
        self.name = name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        if "{question}" not in self.prompt_template:
            raise UnsupportedBackboneError(f"prompt template {self.prompt_template!r} lacks '{{question}}'")
        self.eos_token_id = self._eos_token_id()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.eos_token_id
        self.default_layer = edit_layer or self._default_layer()
        self._model_id: str | None = model_id
        if self.family.vision:
            share_repeated_images(self.model.get_submodule(self.family.vision))

    # ----- structure ------------------------------------------------------------------------
    def _eos_token_id(self) -> int:
        return end_of_sequence_id(self.tokenizer, getattr(self.model, "generation_config", None))

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.decoder_layers)  # type: ignore[return-value]

    def _default_layer(self) -> str:
        last = len(self.decoder_layers) - 1
        return f"{self.family.decoder_layers}.{last}.{self.family.mlp_output}"

    def decoder_index(self, layer_path: str) -> int:
        """Index of the decoder layer that contains `layer_path`."""
        prefix = self.family.decoder_layers + "."
        if layer_path.startswith(prefix):
            index = layer_path[len(prefix):].split(".", 1)[0]
            if index.isdigit() and int(index) < len(self.decoder_layers):
                return int(index)
        raise UnsupportedBackboneError(
            f"layer {layer_path!r} is not inside the text decoder ({prefix}<i>...); edit a linear layer "
            f"of a decoder layer, e.g. {self.default_layer!r}"
        )

    def head_modules(self) -> list[nn.Module]:
        modules = []
        for path in self.family.head:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            if module is not None:
                modules.append(module)
        return modules

    @property
    def model_id(self) -> str:
        """Fingerprint of the base model: family, config and the last decoder layer's weights.

        Models loaded from a directory are fingerprinted from the checkpoint files, so the same
        checkpoint has the same id in any dtype and on any device (a bf16 GPU worker and a CPU
        `kbctl ask` share codebooks); model objects from the weights they hold.
        """
        if self._model_id is None:
            digest = hashlib.sha256(self.family.name.encode())
            config = getattr(self.model, "config", None)
            if config is not None:
                digest.update(_config_text(config).encode())
            for _, tensor in sorted(self.decoder_layers[-1].state_dict().items()):
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            self._model_id = digest.hexdigest()[:32]
        return self._model_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----- inputs ---------------------------------------------------------------------------
    def query(self, image: ImageInput, question: str) -> Query:
        if self.family.needs_image:
            return Query(load_image(image), question)
        if image is not None:
            raise InvalidFactError(f"{self.name} is a text-only model; give no image")
        return Query(None, question)

    def _encode_prompt(self, item: Query) -> tuple[list[int], torch.Tensor | None]:
        text = self.prompt_template.format(question=item.question)
        if not self.family.needs_image:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            return list(ids), None
        if item.image is None:
            raise InvalidFactError(f"{self.name} needs an image with every question")
        if self.family is BLIP2:
            # Built here rather than by Blip2Processor, whose text path breaks on tokenizers that
            # carry `image_token` as a string (transformers 5.x): the query tokens go first.
            pixels = self.processor.image_processor(images=[item.image], return_tensors="pt")["pixel_values"]
            config = self.model.config
            text_ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            ids = torch.tensor([self._image_token_id()] * int(config.num_query_tokens) + list(text_ids))
        else:
            encoded = self.processor(text=[text], images=[item.image], return_tensors="pt")
            ids, pixels = encoded["input_ids"][0], encoded["pixel_values"]
        self._check_image_tokens(ids)
        return ids.tolist(), pixels[0]

    def _image_token_id(self) -> int:
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = getattr(config, "image_token_index", None)
        if token is None:
            raise UnsupportedBackboneError(f"{self.name} config names no image token id")
        return int(token)

    def _check_image_tokens(self, ids: torch.Tensor) -> None:
        found = int((ids == self._image_token_id()).sum())
        if self.family is BLIP2:
            expected = int(self.model.config.num_query_tokens)
            if found != expected:
                # transformers 5 ignores the image silently otherwise.
                raise UnsupportedBackboneError(
                    f"BLIP-2 prompt holds {found} image tokens, the model needs {expected} "
                    "(config.num_query_tokens)"
                )
        elif found == 0:
            raise UnsupportedBackboneError(
                f"prompt template {self.prompt_template!r} puts no image token in the prompt"
            )

    def answer_ids(self, answer: str) -> list[int]:
        return answer_token_ids(self.tokenizer, self.answer_prefix, self.eos_token_id, answer)

    def encode(self, items: Sequence[Query], answers: Sequence[str | Sequence[int]] | None = None) -> Batch:
        """Left-pad prompts (and answers, when given) into one batch.

        An answer is a string (tokenised with the end of sequence appended) or the exact target
        token ids (the last one is predicted, never fed).
        """
        rows: list[list[int]] = []
        prompt_lengths: list[int] = []
        targets: list[list[int]] = []
        pixels: list[torch.Tensor] = []
        for i, item in enumerate(items):
            ids, pixel_values = self._encode_prompt(item)
            prompt_lengths.append(len(ids))
            if answers is not None:
                answer = answers[i]
                target = self.answer_ids(answer) if isinstance(answer, str) else list(answer)
                targets.append(target)
                ids = ids + target[:-1]  # the eos is predicted, never fed
            rows.append(ids)
            if pixel_values is not None:
                pixels.append(pixel_values)
        if answers is not None and len({len(t) for t in targets}) > 1:
            raise EditorError("answers in one batch must have the same token length")
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        key_positions = torch.zeros(len(rows), dtype=torch.long)
        for b, ids in enumerate(rows):
            pad = width - len(ids)
            input_ids[b, pad:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, pad:] = 1
            key_positions[b] = pad + prompt_lengths[b] - 1
        return Batch(
            input_ids, attention_mask, torch.stack(pixels) if pixels else None, key_positions,
            torch.tensor(targets, dtype=torch.long) if answers is not None else None,
        )

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        device = self.device
        inputs = {
            "input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
        }
        if batch.pixel_values is not None:
            dtype = next(self.model.parameters()).dtype
            inputs["pixel_values"] = batch.pixel_values.to(device=device, dtype=dtype)
        if self.family.passes_position_ids:
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
            inputs["position_ids"] = positions.to(device)
        return inputs

    def generate_ids(self, batch: Batch, max_new_tokens: int,
                     logits_processor: ScoresProcessor | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt (call inside an adapter scope when edited);
        `logits_processor(ids so far (B, T), scores (B, V))` may change the scores of every step
        before the greedy choice."""
        from transformers import LogitsProcessorList

        inputs = self.model_inputs(batch)
        inputs.pop("position_ids", None)  # generate derives them from the attention mask
        extra = {"logits_processor": LogitsProcessorList([logits_processor])} if logits_processor else {}
        output = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, use_cache=True, **extra,
        )
        new_tokens = output[:, batch.input_ids.shape[1]:].tolist()
        result = []
        for row in new_tokens:
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            result.append(row)
        return result

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): the first CUDA GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise EditorError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EditorError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" (or None): bfloat16 on a GPU that supports it, else float32. The codebook's keys,
    values and distances stay float32 whatever the base weights are."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise EditorError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _config_text(config: Any) -> str:
    """The model config as JSON without its dtype fields (at any depth)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("dtype", "torch_dtype")}
        return value

    return json.dumps(strip(config.to_dict()), sort_keys=True, default=str)


def checkpoint_fingerprint(path: Path, family: FamilySpec, config: Any, last_layer: int) -> str:
    """Family, config (minus dtype) and the stored bytes of every checkpoint tensor of layer
    `last_layer` (text decoder and, for vision models, the tower's layer of that index)."""
    from safetensors import safe_open

    digest = hashlib.sha256(family.name.encode())
    digest.update(_config_text(config).encode())
    marker = f".layers.{last_layer}."
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in sorted(handle.keys()):
                if marker in f".{name}":
                    tensor = handle.get_tensor(name).contiguous()
                    digest.update(name.encode())
                    digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def load_backbone(
    path_or_model: str | os.PathLike[str] | nn.Module,
    processor: Any = None,
    *,
    prompt_template: str | None = None,
    answer_prefix: str | None = None,
    edit_layer: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Backbone:
    """A `Backbone` from "demo", a local model directory, or a model object plus its processor.

    Nothing is downloaded: directories must hold the weights (safetensors only), config and
    processor/tokenizer. `device` and `dtype` ("auto" picks a GPU and bfloat16 when there is one)
    apply to directory loads; a model object is used where and as it is.
    """
    if isinstance(path_or_model, nn.Module):
        if processor is None:
            raise EditorError("a model object needs its processor (or tokenizer for a text model)")
        return Backbone(path_or_model, processor, prompt_template=prompt_template,
                        answer_prefix=answer_prefix, edit_layer=edit_layer)
    path = model_directory(path_or_model)
    settings: dict[str, Any] = {}
    if (path / BACKBONE_FILE).is_file():
        settings = json.loads((path / BACKBONE_FILE).read_text())
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if not any(path.glob("*.safetensors")):
        raise EditorError(f"{str(path)!r} holds no .safetensors weights (pickled weights are not loaded)")
    target = resolve_device(device)
    # use_safetensors: never unpickle a checkpoint.
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True,
                              "dtype": resolve_dtype(dtype, target)}
    if config.model_type == "llava":
        model = transformers.LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    elif config.model_type == "blip-2":
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model = model.to(target)
    family = detect_family(model)
    if processor is None:
        if family.needs_image:
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        else:
            processor = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = Backbone(
        model, processor, family=family,
        prompt_template=prompt_template or settings.get("prompt_template"),
        answer_prefix=answer_prefix if answer_prefix is not None else settings.get("answer_prefix"),
        edit_layer=edit_layer or settings.get("edit_layer"),
        name=str(path),
        model_id=checkpoint_fingerprint(path, family, model.config,
                                        len(model.get_submodule(family.decoder_layers)) - 1),
    )
    return backbone
