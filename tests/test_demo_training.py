"""The demo model: the training command (smoke run) and the shipped checkpoint in editor/demo/model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "editor" / "demo" / "model"
KB_BACKBONE = {
    "format_version": 1,
    "family": "llava",
    "prompt_template": "<image>{question}\n",
    "answer_prefix": "",
    "edit_layer": "model.language_model.layers.2.mlp.down_proj",
}
SHAPES = {"circle", "rectangle", "triangle"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT))
    return env


def _qtype(answer: str) -> str:
    return "shape" if answer in SHAPES else "yes/no" if answer in ("yes", "no") else "color"


def _test_sample(per_type: int):
    """A fixed, stratified sample of easy-VQA TEST questions: (PIL image, question, answer)."""
    import easy_vqa
    from PIL import Image

    qs, ans, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    taken: dict[str, int] = {}
    out = []
    for q, a, i in zip(qs, ans, ids, strict=True):
        t = _qtype(a)
        if taken.get(t, 0) < per_type:
            taken[t] = taken.get(t, 0) + 1
            with Image.open(paths[i]) as im:
                out.append((im.convert("RGB"), q, a))
    return out


LOAD_AND_GENERATE = r"""
import sys, json
import easy_vqa
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
path = sys.argv[1]
model = LlavaForConditionalGeneration.from_pretrained(path).eval()
processor = AutoProcessor.from_pretrained(path)
processor.tokenizer.padding_side = "left"
qs, ans, ids = easy_vqa.get_test_questions()
image = Image.open(easy_vqa.get_test_image_paths()[ids[0]]).convert("RGB")
inputs = processor(text=["<image>" + qs[0] + "\n"], images=[image], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
new = out[0, inputs["input_ids"].shape[1]:]
print(json.dumps({"n_new": int(new.numel()), "answer": processor.tokenizer.decode(new, skip_special_tokens=True)}))
"""


def test_training_command_smoke_run(tmp_path):
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "editor.demo.train", "--out", str(out), "--steps", "2",
           "--train-images", "32", "--eval-limit", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage 2 step 2/2" in proc.stderr  # progress goes through logging (stderr)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "kb_backbone.json", "training_report.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "kb_backbone.json").read_text()) == KB_BACKBONE
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 2 and report["seed"] == 0
    assert report["test_greedy_exact_match"]["overall"]["total"] == 8

    # A fresh, offline process loads the checkpoint and generates for one easy-VQA image.
    gen = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr[-4000:]
    result = json.loads(gen.stdout.strip().splitlines()[-1])
    assert 1 <= result["n_new"] <= 16


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert SHIPPED.is_dir(), "editor/demo/model is missing: run python -m editor.demo.train --out editor/demo/model"
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED, local_files_only=True)
    return model, processor


def test_shipped_checkpoint_files_and_size():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "kb_backbone.json", "training_report.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    assert json.loads((SHIPPED / "kb_backbone.json").read_text()) == KB_BACKBONE
    report = json.loads((SHIPPED / "training_report.json").read_text())
    assert report["total_minutes"] <= 25 and not report["stopped_early"]
    acc = {k: v["accuracy"] for k, v in report["test_greedy_exact_match"].items()}
    assert acc["shape"] >= 0.97 and acc["color"] >= 0.97 and acc["yes/no"] >= 0.90, acc
    assert report["test_greedy_exact_match"]["overall"]["total"] == 9673  # the full TEST split


def test_byte_tokenizer_contract():
    from editor.demo.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    assert len(tok) == 260
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<image>"]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in ("aqua marine", "héllo", "what shape is in the image?\n", "日本"):
        ids = tok(text)["input_ids"]
        assert all(4 <= i < 260 for i in ids)  # bytes only: no BOS/EOS added
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_shipped_checkpoint_contract(shipped):
    model, processor = shipped
    tok = processor.tokenizer
    assert len(tok) == 260 and model.config.text_config.vocab_size == 260
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert processor.image_token_id == 3 == model.config.image_token_id
    for text in ("aqua marine", "héllo"):
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text
    assert KB_BACKBONE["edit_layer"] in dict(model.named_modules())

    (image, question, _), *_ = _test_sample(1)
    enc = processor(text=["<image>" + question + "\n"], images=[image], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids.count(3) == 64 and ids[:64] == [3] * 64  # "<image>" expands to 64 tokens, no BOS
    assert ids[64:] == tok(question + "\n")["input_ids"]
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)


def test_shipped_checkpoint_answers_test_questions(shipped):
    import torch

    model, processor = shipped
    sample = _test_sample(per_type=17)  # 51 TEST questions, all three types
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=["<image>" + q + "\n" for _, q, _ in sample], images=[im for im, _, _ in sample],
                       return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
    preds = [s.strip() for s in processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]
    right = sum(p == a for p, (_, _, a) in zip(preds, sample, strict=True))
    assert right >= 0.9 * len(sample), list(zip(preds, [a for _, _, a in sample], strict=True))

    # Left padding in a batch gives the same greedy answers as one prompt at a time.
    for k in (0, 20, 40):
        im, q, _ = sample[k]
        one = processor(text=["<image>" + q + "\n"], images=[im], return_tensors="pt")
        with torch.inference_mode():
            o = model.generate(**one, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        text = processor.tokenizer.decode(o[0, one["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text.strip() == preds[k]
