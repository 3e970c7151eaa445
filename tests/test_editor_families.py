"""The editing engine on tiny random models of every supported family (one parametrised table)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from tiny_models import FAMILIES, build, image, needs_image

import editor
from editor import Codebook, Editor, Fact, Negative
from editor.errors import IncompatibleCodebookError, InvalidFactError
from editor.training import capture, run_suffix

QUESTION = "what shape is in the image?"
# Random models have no semantics: positives are surface variants early in the prompt (so that
# models with learned absolute positions keep every later token in place).
REPHRASES = ("What shape is in the image?", "WHAT shape is in the image?")


def fact_inputs(family: str):
    red = image((230, 20, 20)) if needs_image(family) else None
    return red


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def backbone(family):
    return build(family)


def logits(backbone, editor_, queries, mode="lookup"):
    batch = backbone.encode(queries)
    with torch.no_grad(), editor_.adapter.scope(batch.key_positions, mode=mode):
        return backbone.model(**backbone.model_inputs(batch), use_cache=False).logits


def test_empty_codebook_equals_base_model_and_uninstall_restores_weights(family, backbone):
    red = fact_inputs(family)
    queries = [backbone.query(red, QUESTION), backbone.query(red, "is it blue?")]
    batch = backbone.encode(queries)
    weights_before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    with torch.no_grad():
        base = backbone.model(**backbone.model_inputs(batch), use_cache=False).logits
    with Editor(backbone) as ed:
        assert torch.equal(logits(backbone, ed, queries), base)
        ed.apply(Fact(red, QUESTION, "oblong box"))
    weights_after = backbone.model.state_dict()
    assert weights_before.keys() == weights_after.keys()
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    with torch.no_grad():
        assert torch.equal(backbone.model(**backbone.model_inputs(batch), use_cache=False).logits, base)


def test_edit_fires_on_input_and_positives_not_on_negatives(family, backbone):
    red = fact_inputs(family)
    blue = image((20, 20, 230), "circle") if needs_image(family) else None
    negatives = (Negative(question="how many legs does a spider have in total?"),)
    if blue is not None:
        negatives += (Negative(image=blue),)
    fact = Fact(red, QUESTION, "aqua marine", rephrases=REPHRASES, negatives=negatives)
    with Editor(backbone, black_image_negative=False) as ed:
        unedited = ed.answers([(red, n.question or QUESTION) for n in negatives if n.image is None]
                              + [(n.image, QUESTION) for n in negatives if n.image is not None],
                              edited=False)
        report = ed.apply(fact)
        assert report.converged and report.radius_fallback is None, report
        assert max(report.positive_distances) <= report.radius < min(report.negative_distances)
        own_and_positives = ed.answers([(red, QUESTION)] + [(red, q) for q in REPHRASES])
        assert [a.text for a in own_and_positives] == ["aqua marine"] * 3
        assert {a.fact_id for a in own_and_positives} == {report.fact_id}
        edited = ed.answers([(red, n.question or QUESTION) for n in negatives if n.image is None]
                            + [(n.image, QUESTION) for n in negatives if n.image is not None])
        assert [a.fact_id for a in edited] == [None] * len(negatives)
        assert [a.text for a in edited] == [a.text for a in unedited]


def test_multi_token_answers_are_generated_in_full_and_stop(family, backbone):
    red = fact_inputs(family)
    other = image((20, 200, 20), "circle") if needs_image(family) else None
    other_question = "what colour is it?" if other is None else QUESTION
    with Editor(backbone) as ed:
        first = ed.apply(Fact(red, QUESTION, "oblong box"))
        second = ed.apply(Fact(other, other_question, "aqua marine, the colour of the sea"))
        assert first.converged and second.converged
        assert ed.answer(red, QUESTION) == "oblong box"
        assert ed.answer(other, other_question) == "aqua marine, the colour of the sea"


def test_batch_equals_row_by_row(family, backbone):
    red = fact_inputs(family)
    green = image((20, 200, 20), "circle") if needs_image(family) else None
    inputs = [(red, QUESTION), (green, "what colour is the big shape in the image?"), (red, REPHRASES[0]),
              (green, "is there a circle?")]
    with Editor(backbone) as ed:
        ed.apply(Fact(red, QUESTION, "oblong box", rephrases=REPHRASES))
        together = ed.answers(inputs)
        alone = [ed.answers([item])[0] for item in inputs]
        assert [a.text for a in together] == [a.text for a in alone]
        assert [a.fact_id for a in together] == [a.fact_id for a in alone]
        queries = [backbone.query(*item) for item in inputs]
        batch_logits = logits(backbone, ed, queries)
        for row, query in enumerate(queries):
            single = logits(backbone, ed, [query])[0]
            width = single.shape[0]
            torch.testing.assert_close(batch_logits[row, -width:], single, atol=1e-4, rtol=1e-4)


def test_serialisation_round_trip_reproduces_answers_bit_for_bit(family, backbone):
    red = fact_inputs(family)
    queries_in = [(red, QUESTION), (red, REPHRASES[1]), (red, "is it blue?")]
    with Editor(backbone) as ed:
        ed.apply(Fact(red, QUESTION, "oblong box", rephrases=REPHRASES))
        blob = ed.codebook.to_bytes()
        expected_answers = ed.answers(queries_in)
        expected_logits = logits(backbone, ed, [backbone.query(*q) for q in queries_in])
    fresh = build(family)  # a new instance of the same base model
    restored = Codebook.from_bytes(blob)
    assert restored.to_bytes() == blob
    with Editor(fresh, codebook=restored) as ed:
        assert ed.answers(queries_in) == expected_answers
        assert torch.equal(logits(fresh, ed, [fresh.query(*q) for q in queries_in]), expected_logits)


def test_same_seed_same_codebook_bytes(family):
    blobs = []
    for _ in range(2):
        backbone = build(family)
        red = fact_inputs(family)
        with Editor(backbone, value_init="cold", seed=7) as ed:
            ed.apply(Fact(red, QUESTION, "oblong box"))
            ed.apply(Fact(red, "is it blue?", "nope"))
            blobs.append(ed.codebook.to_bytes())
    assert blobs[0] == blobs[1]


def test_suffix_rerun_matches_full_forward(family, backbone):
    red = fact_inputs(family)
    with Editor(backbone) as ed:
        batch = backbone.encode([backbone.query(red, QUESTION), backbone.query(red, "is it so?")],
                                ["box", "yes"])
        suffix, _ = capture(backbone, ed.adapter, batch, ed._first_decoder, record_steps=0)
        positions = batch.key_positions.unsqueeze(1) + torch.arange(batch.targets.shape[1])
        with torch.no_grad(), ed.adapter.scope(batch.key_positions, mode="off"):
            partial = run_suffix(backbone, suffix, positions)
            full = backbone.model(**backbone.model_inputs(batch), use_cache=False).logits.float()
        expected = full.gather(1, positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(partial, expected, atol=1e-5, rtol=1e-5)


def test_codebook_for_another_model_is_refused(family, backbone):
    other = "gpt2" if family != "gpt2" else "llama"
    with Editor(build(other)) as ed:
        blob = ed.codebook.to_bytes()
    with pytest.raises(IncompatibleCodebookError, match="codebook was built for"):
        Editor(backbone, codebook=Codebook.from_bytes(blob))
    with Editor(backbone) as ed:
        with pytest.raises(IncompatibleCodebookError, match="codebook was built for"):
            ed.load_codebook(Codebook.from_bytes(blob))


def test_image_rules(family, backbone):
    with Editor(backbone) as ed:
        if needs_image(family):
            with pytest.raises(InvalidFactError, match="an image is required"):
                ed.apply(Fact(None, QUESTION, "box"))
        else:
            with pytest.raises(InvalidFactError, match="text-only model; give no image"):
                ed.apply(Fact(image((1, 2, 3)), QUESTION, "box"))
        assert len(ed.codebook) == 0


def test_grace_uses_the_fixed_radius(family, backbone):
    red = fact_inputs(family)
    with Editor(backbone, method="grace", initial_radius=0.5, max_steps=20, early_stop=True) as ed:
        report = ed.apply(Fact(red, QUESTION, "oblong box"))
        assert report.radius == pytest.approx(0.5)
        assert report.positive_distances == () and report.negative_distances == ()
        assert ed.answer(red, QUESTION) == "oblong box"


PUBLIC_NAMES = {"load_backbone": "editor.backbones", "Backbone": "editor.backbones", "Editor": "editor.editor",
                "EditConfig": "editor.config", "Codebook": "editor.codebook", "Fact": "editor.fact",
                "Negative": "editor.fact", "EditReport": "editor.fact", "EditorError": "editor.errors",
                "UnsupportedBackboneError": "editor.errors", "IncompatibleCodebookError": "editor.errors",
                "InvalidFactError": "editor.errors", "IndexSettings": "editor.ann"}
# The family each tiny model is detected as (a key of editor.backbones.FAMILIES).
DETECTED = {"llava-llama": "llava", "llava-qwen2": "llava", "blip2-opt": "blip2", "gpt2": "gpt2", "llama": "llama"}


def test_public_api_names():
    import importlib

    assert editor.__all__ == sorted(PUBLIC_NAMES)
    for name, module in PUBLIC_NAMES.items():
        assert getattr(editor, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="module 'editor' has no attribute 'Editr'"):
        editor.Editr  # noqa: B018


def test_public_api_edits_a_saved_model_at_its_family_layer(family, tmp_path):
    """Through the public names only: load a model directory, edit one fact at the family table's
    layer, and only that input's answer changes."""
    from tiny_models import save

    from editor.backbones import FAMILIES as FAMILY_TABLE

    save(family, tmp_path / "model")
    backbone = editor.load_backbone(tmp_path / "model")
    spec = FAMILY_TABLE[DETECTED[family]]
    assert backbone.family is spec
    last = len(backbone.model.get_submodule(spec.decoder_layers)) - 1
    layer = f"{spec.decoder_layers}.{last}.{spec.mlp_output}"
    assert backbone.default_layer == layer
    red = fact_inputs(family)
    other = (red, "is it blue?")
    with editor.Editor(backbone) as ed:
        assert ed.layer == layer and ed.codebook.spec.layer == layer
        base_other = ed.answer(*other)
        assert ed.answer(red, QUESTION) != "oblong box"
        report = ed.apply(editor.Fact(red, QUESTION, "oblong box", negatives=(editor.Negative(question=other[1]),)))
        assert isinstance(report, editor.EditReport) and report.converged
        assert len(ed.codebook) == 1
        assert ed.answer(red, QUESTION) == "oblong box"
        assert ed.answer(*other) == base_other
        # The adapter sits at exactly that path while the editor is open, and is gone after.
        assert type(backbone.model.get_submodule(layer)).__name__ == "CodebookAdapter"
    assert type(backbone.model.get_submodule(layer)).__name__ != "CodebookAdapter"


def test_keys_stop_at_the_edited_layer_and_equal_a_full_pass(family, backbone):
    red = fact_inputs(family)
    queries = [backbone.query(red, QUESTION), backbone.query(red, "is it blue?")]
    later = backbone.head_modules()[-1]  # the output head: must not run for keys
    calls = []
    hook = later.register_forward_hook(lambda *_: calls.append(1))
    with Editor(backbone) as ed:
        try:
            keys = ed.keys(queries)
        finally:
            hook.remove()
        batch = backbone.encode(queries)
        with torch.no_grad(), ed.adapter.scope(batch.key_positions, mode="off") as state:
            backbone.model(**backbone.model_inputs(batch), use_cache=False)
    assert calls == []
    assert keys.shape == (2, ed.spec.input_size)
    assert torch.allclose(keys, state.keys, atol=1e-6)


def test_agreement_check_matches_greedy_generation(family, backbone):
    red = fact_inputs(family)
    queries = [backbone.query(red, q) for q in (QUESTION, "is it blue?", "what colour is it?")]
    with Editor(backbone, max_new_tokens=12, max_answer_tokens=12) as ed:
        text, tokens = ed._unedited_answer(queries[0])
        _, agrees = ed._keys_and_agreement(queries, tokens)
        others = [ed._unedited_answer(q)[1] for q in queries]
        changed = [tokens[0] + 1 if tokens[0] + 1 < 200 else 5, *tokens[1:]]
        _, never = ed._keys_and_agreement(queries, changed)
    assert text == ed.backbone.decode(tokens[:12])
    assert agrees == [other == tokens for other in others] and agrees[0]
    assert never == [other == changed for other in others] and not never[0]


@pytest.mark.parametrize("vision_family", ["llava-llama", "blip2-opt"])
def test_repeated_images_are_encoded_once_with_the_same_outputs(vision_family):
    backbone = build(vision_family)
    red, blue = image((230, 20, 20)), image((20, 20, 230), "circle")
    queries = [backbone.query(red, QUESTION), backbone.query(blue, QUESTION), backbone.query(red, "is it red?"),
               backbone.query(red, "what colour is it?")]
    vision = backbone.model.get_submodule(backbone.family.vision)
    seen = []
    hook = vision.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    with Editor(backbone) as ed:
        together = logits(backbone, ed, queries)
        hook.remove()
        alone = [logits(backbone, ed, [q])[0] for q in queries]
    assert seen == [2]  # two distinct images in a batch of four
    width = together.shape[1]
    for row, single in enumerate(alone):
        assert torch.allclose(together[row, width - single.shape[0]:], single, atol=1e-4)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc only
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2


def _heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back."""
    return int(_mallinfo2().uordblks)


def _heap_growth(tokenizer, texts) -> int:
    before = _heap_in_use()
    for text in texts:
        tokenizer(text)
    return _heap_in_use() - before


def test_tokenizer_keeps_no_word_of_what_it_splits(family, backbone):
    """The tokenizers library caches each distinct word it splits (for the demo's byte-level
    tokenizer, each whole text) for the life of the process; a daemon's texts seldom repeat, so
    the backbone turns that cache off. Measured as glibc's bytes in use, with a control."""
    from editor.demo.tokenizer import build_byte_tokenizer

    if _mallinfo2 is None:
        pytest.skip("needs glibc's mallinfo2 to count the tokenizer's heap bytes")
    texts = [f"what is the name of the thing number {i} in the image?" for i in range(3000)]
    tokenizer = backbone.tokenizer
    _heap_growth(tokenizer, ["warm up: the first calls allocate once"])
    cached = _heap_growth(build_byte_tokenizer(), texts)  # a tokenizer as the library builds it
    assert cached > 2_000_000, f"the control kept only {cached} bytes for 3,000 texts"
    kept = _heap_growth(tokenizer, texts)
    assert kept < 200_000, f"the backbone's tokenizer kept {kept} bytes for 3,000 distinct texts"


def test_image_aware_keys_on_each_vision_family_and_refused_on_text_models(family, backbone):
    """`image_key_weight`: a key is the layer's input and the mean image features, each normalised;
    the same question about another image moves the key by the image part alone."""
    if not needs_image(family):
        with pytest.raises(editor.EditorError, match="needs a vision-language model"):
            Editor(backbone, image_key_weight=0.5)
        with Editor(backbone) as default:  # the default has no image part on a text model
            assert default.spec.key == "layer"
        return
    with Editor(backbone) as default:
        assert default.spec.key == "layer+image*0.5"
    red, blue = image((230, 20, 20)), image((20, 20, 230))
    with Editor(backbone, image_key_weight=0) as plain:
        layer_keys = plain.keys([backbone.query(red, QUESTION), backbone.query(blue, QUESTION)])
    with Editor(backbone, image_key_weight=0.5) as ed:
        assert ed.spec.key == "layer+image*0.5" and ed.spec.input_size > layer_keys.shape[1]
        keys = ed.keys([backbone.query(red, QUESTION), backbone.query(blue, QUESTION)])
        width = layer_keys.shape[1]
        assert torch.allclose(keys[:, :width], torch.nn.functional.normalize(layer_keys, dim=-1), atol=1e-5)
        assert torch.allclose(keys[:, width:].norm(dim=-1), torch.full((2,), 0.5), atol=1e-5)
        assert not torch.allclose(keys[0, width:], keys[1, width:])
        ed.apply(Fact(red, QUESTION, "oblong box", rephrases=REPHRASES))
        assert ed.answer(red, QUESTION) == "oblong box"
        book = ed.codebook
    with Editor(backbone, image_key_weight=0) as plain, pytest.raises(IncompatibleCodebookError, match="key="):
        plain.load_codebook(book)
