"""Tiny random models of every supported family, built in code (no download), for tests."""

from __future__ import annotations

import torch
from PIL import Image

from editor.backbones import Backbone, load_backbone
from editor.demo.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer

IMAGE_SIZE = 32
FAMILIES = ("llava-llama", "llava-qwen2", "blip2-opt", "gpt2", "llama")


def _image_processor(kind: str):
    from transformers import BlipImageProcessorPil, CLIPImageProcessorPil

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if kind == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=size)
    return BlipImageProcessorPil(size=size)


def _text_config(kind: str, vocab: int, hidden: int = 48):
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if kind == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           **common)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           **common)
    return OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512, word_embed_proj_dim=hidden, **common)


def build(family: str, seed: int = 0) -> Backbone:
    """A tiny model of `family` with random weights (seeded), wrapped as a Backbone."""
    import transformers as tf

    torch.manual_seed(seed)
    tokenizer = build_byte_tokenizer()
    if family.startswith("llava"):
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8)
        config = tf.LlavaConfig(vision_config=vision, text_config=_text_config(family.split("-")[1], VOCAB_SIZE),
                                image_token_index=IMAGE_ID, vision_feature_layer=-1,
                                vision_feature_select_strategy="default", image_seq_length=16)
        model = tf.LlavaForConditionalGeneration(config)
        processor = tf.LlavaProcessor(image_processor=_image_processor("clip"), tokenizer=tokenizer,
                                      patch_size=8, vision_feature_select_strategy="default",
                                      image_token="<image>", num_additional_image_tokens=1)
        return load_backbone(model, processor, prompt_template="<image>{question}\n", answer_prefix="")
    if family == "blip2-opt":
        vision = tf.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8)
        qformer = tf.Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, encoder_hidden_size=32)
        config = tf.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=_text_config("opt", VOCAB_SIZE).to_dict(), num_query_tokens=32,
                                image_token_index=IMAGE_ID)
        model = tf.Blip2ForConditionalGeneration(config)
        processor = tf.Blip2Processor(image_processor=_image_processor("blip"), tokenizer=tokenizer,
                                      num_query_tokens=32)
        return load_backbone(model, processor)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=48, n_layer=2, n_head=4, n_positions=512,
                               bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        return load_backbone(tf.GPT2LMHeadModel(config), tokenizer)
    if family == "llama":
        return load_backbone(tf.LlamaForCausalLM(_text_config("llama", VOCAB_SIZE)), tokenizer)
    raise ValueError(family)


def image(colour: tuple[int, int, int], shape: str = "square") -> Image.Image:
    """A small test picture: a coloured shape on white."""
    from PIL import ImageDraw

    picture = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    if shape == "circle":
        draw.ellipse((4, 4, 27, 27), fill=colour)
    else:
        draw.rectangle((6, 6, 25, 25), fill=colour)
    return picture


def needs_image(family: str) -> bool:
    return family.startswith(("llava", "blip2"))


def save(family: str, directory, seed: int = 0):
    """Write a tiny model of `family` as a model directory that `load_backbone(path)` loads."""
    import json
    from pathlib import Path

    backbone = build(family, seed)
    directory = Path(directory)
    backbone.model.save_pretrained(directory)
    backbone.processor.save_pretrained(directory)
    settings = {"format_version": 1, "prompt_template": backbone.prompt_template,
                "answer_prefix": backbone.answer_prefix}
    (directory / "kb_backbone.json").write_text(json.dumps(settings))
    return directory
