"""Models for the benchmarks, built in code (no download): a ~100M-parameter random LLaVA."""

from __future__ import annotations

IMAGE_SIZE = 112
PATCH = 14


def build_random_llava(seed: int = 0, dtype=None):
    """A LLaVA (CLIP vision 4x512, Llama 12x768, byte vocabulary) with random weights, as a Backbone.

    About 100M parameters; 64 image tokens per prompt (112x112 pixels, 14x14 patches).
    """
    import torch
    import transformers as tf

    from editor.backbones import load_backbone
    from editor.demo.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer

    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                 num_attention_heads=8, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12, max_position_embeddings=512, vocab_size=VOCAB_SIZE,
                          pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
    model = tf.LlavaForConditionalGeneration(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=size),
        tokenizer=build_byte_tokenizer(), patch_size=PATCH, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1)
    return load_backbone(model, processor, prompt_template="<image>{question}\n", answer_prefix="")


def parameter_count(backbone) -> int:
    return sum(p.numel() for p in backbone.model.parameters())


if __name__ == "__main__":
    print(parameter_count(build_random_llava()))
