"""Byte-level tokenizer of the demo model (vocabulary of 260, no merges).

Ids: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<image>`` = 3, then the 256 byte symbols of
``tokenizers.pre_tokenizers.ByteLevel.alphabet()`` in sorted order (ids 4..259). Any string encodes,
including unseen words and non-ASCII text. No BOS/EOS is added on encode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 3
VOCAB_SIZE = 260


def build_byte_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """Build the 260-token byte-level tokenizer (pure function, no files, no network).

    ``padding_side`` is saved with the tokenizer (setting the attribute later is not); the shipped
    demo checkpoint uses "left", which batched generation needs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i, sym in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[sym] = len(SPECIAL_TOKENS) + i
    assert len(vocab) == VOCAB_SIZE, len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side=padding_side,
    )
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [PAD_ID, BOS_ID, EOS_ID, IMAGE_ID]
    return tokenizer
