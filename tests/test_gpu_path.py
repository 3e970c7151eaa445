"""The GPU path, checked on the CPU: device/dtype selection, half-precision base weights with
float32 codebook math, and codebooks shared between dtypes of the same checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

import editor
from editor.backbones import resolve_device, resolve_dtype
from editor.errors import EditorError
from kb_daemon.config import Settings
from kb_daemon.errors import InvalidInput

QUESTION = "what shape is in the image?"


@pytest.fixture(scope="module")
def picture():
    from easy_vqa import get_train_image_paths

    paths = get_train_image_paths()
    return paths[sorted(paths)[0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_with_float32_codebook(dtype, picture):
    half = editor.load_backbone("demo", dtype=dtype)
    assert next(half.model.parameters()).dtype == dtype
    full = editor.load_backbone("demo")
    assert half.model_id == full.model_id  # same checkpoint, any dtype
    with editor.Editor(half) as ed:
        colour_before = ed.answer(picture, "what color is the shape?")
        report = ed.apply(editor.Fact(picture, QUESTION, "oblong box"))
        assert report.converged
        assert ed.answer(picture, QUESTION) == "oblong box"
        assert ed.answer(picture, "what color is the shape?") == colour_before
        assert ed.codebook.keys.dtype == torch.float32
        assert all(e.values.dtype == torch.float32 and e.key.dtype == torch.float32 for e in ed.codebook.entries)
        data = ed.codebook.to_bytes()
    # The codebook made on half-precision weights loads onto the float32 model and fires there.
    with editor.Editor(full, codebook=editor.Codebook.from_bytes(data)) as ed:
        answer = ed.answers([(picture, QUESTION)])[0]
        assert answer.text == "oblong box" and answer.fact_id == report.fact_id


def test_device_and_dtype_selection():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EditorError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(EditorError, match="unknown device"):
        resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(EditorError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_settings_carry_device_and_dtype():
    settings = Settings.from_env({"KB_HOME": "/tmp/kb-x", "KB_DEVICE": "cuda:1", "KB_DTYPE": "float16"})
    assert (settings.device, settings.dtype) == ("cuda:1", "float16")
    assert (Settings.from_env({"KB_HOME": "/tmp/kb-x"}).device, Settings.from_env({"KB_HOME": "/tmp/kb-x"}).dtype) \
        == ("auto", "auto")
    with pytest.raises(InvalidInput, match="KB_DTYPE must be"):
        Settings.from_env({"KB_HOME": "/tmp/kb-x", "KB_DTYPE": "half"})


def test_pickled_checkpoints_are_not_loaded(tmp_path):
    from editor.demo import DEMO_MODEL_DIR

    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL_DIR / name, tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(EditorError, match="no .safetensors weights"):
        editor.load_backbone(tmp_path)
