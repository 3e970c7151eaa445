"""Admission: a fact the worker would refuse for its shape is refused before it is queued."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
from daemon_harness import Daemon
from PIL import Image
from tiny_models import FAMILIES, needs_image, save

from editor.backbones import load_backbone, load_text_side
from editor.text_side import read_text_side
from kb_daemon.admission import admit, text_side
from kb_daemon.config import Settings
from kb_daemon.db import Database
from kb_daemon.errors import InvalidInput
from kb_daemon.queue import FactInput, check_fact_limits, get_model

ANSWERS = ("ring", "x", "a longer answer, with café and 漢字 in it", "y" * 300, "  spaced   out  ")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A home with the demo model, a tiny vision model (max_answer_tokens=8) and a tiny text model."""
    root = tmp_path_factory.mktemp("admission")
    save("llava-llama", root / "vision")
    save("gpt2", root / "text")
    d = Daemon(root / "home")
    d.kbctl("init")
    d.kbctl("model", "add", "vision", str(root / "vision"), "--hparam", "max_answer_tokens=8")
    d.kbctl("model", "add", "text", str(root / "text"))
    settings = Settings.from_env(d.env)
    database = Database(settings)
    yield settings, database
    database.dispose()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _admit(settings: Settings, database: Database, name: str, fact: FactInput) -> None:
    with database.session() as session:
        admit(settings, get_model(session, name), fact.cleaned())


@pytest.mark.parametrize("family", [*FAMILIES, "demo"])
def test_answer_token_count_is_the_editors(tmp_path, family):
    path = "demo" if family == "demo" else str(save(family, tmp_path / family))
    backbone = load_backbone(path)
    # Both readers: the one with transformers, and the one without torch that admission uses.
    for side in (load_text_side(path), read_text_side(path)):
        assert side.needs_image == (family == "demo" or needs_image(family))
        for answer in ANSWERS:
            assert side.count_answer_tokens(answer) == len(backbone.answer_ids(answer)), answer


def test_admission_reads_the_tokenizer_without_torch():
    code = ("import sys; from kb_daemon.admission import text_side; "
            "side = text_side('demo', 'demo'); assert side.count_answer_tokens('ring') > 1; "
            "print(sorted(m for m in ('torch', 'transformers', 'editor.backbones') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_admit_accepts_a_fact_the_worker_takes(registered):
    settings, database = registered
    _admit(settings, database, "vision", FactInput(_png(), "what shape?", "ring"))
    _admit(settings, database, "text", FactInput(None, "what shape?", "ring"))
    _admit(settings, database, "demo", FactInput(_png(), "what shape?", "ring"))


@pytest.mark.parametrize(
    ("name", "fact", "message"),
    [
        ("vision", FactInput(None, "what shape?", "ring"),
         "model vision answers about images: the fact needs an image (--image)"),
        ("text", FactInput(_png(), "what shape?", "ring"), "model text is a text-only model: the fact takes no image"),
        ("text", FactInput(None, "what shape?", "ring", negative_images=(_png(),)),
         "model text is a text-only model: the fact takes no image"),
        # The tiny models' byte tokenizer: one token per byte, no prefix for LLaVA, plus the end of sequence.
        ("vision", FactInput(_png(), "what shape?", "a ring, red"),
         "answer is 12 tokens long; model vision allows 8 (max_answer_tokens; change it with "
         "`kbctl model set vision --hparam max_answer_tokens=N`)"),
        ("vision", FactInput(_png(), "what shape?", "r", rephrases=("q?",) * 33),
         "33 rephrases; the limit is 32 (KB_MAX_REPHRASES)"),
        ("vision", FactInput(_png(), "what shape?", "r", negative_images=(_png(),) * 20,
                             negative_questions=("q?",) * 13),
         "33 negatives (images and questions); the limit is 32 (KB_MAX_NEGATIVES)"),
    ],
    ids=["no image on a vision model", "image on a text model", "negative image on a text model",
         "answer over max_answer_tokens", "too many rephrases", "too many negatives"],
)
def test_admit_refuses_with_one_line(registered, name, fact, message):
    settings, database = registered
    with pytest.raises(InvalidInput) as raised:
        _admit(settings, database, name, fact)
    assert str(raised.value) == message


def test_answer_at_the_limit_is_admitted(registered):
    settings, database = registered
    _admit(settings, database, "vision", FactInput(_png(), "what shape?", "a ring!"))  # 7 bytes + eos = 8


def test_caps_follow_the_settings():
    fact = FactInput(None, "q?", "a", rephrases=("r?",) * 3, negative_questions=("n?",) * 2)
    check_fact_limits(fact, Settings.from_env({"KB_HOME": "/tmp/kb", "KB_MAX_REPHRASES": "3",
                                               "KB_MAX_NEGATIVES": "2"}))
    with pytest.raises(InvalidInput, match=r"^3 rephrases; the limit is 2 \(KB_MAX_REPHRASES\)$"):
        check_fact_limits(fact, Settings.from_env({"KB_HOME": "/tmp/kb", "KB_MAX_REPHRASES": "2"}))
    with pytest.raises(InvalidInput, match=r"^2 negatives \(images and questions\); the limit is 0 "):
        check_fact_limits(fact, Settings.from_env({"KB_HOME": "/tmp/kb", "KB_MAX_NEGATIVES": "0"}))


@pytest.mark.parametrize("value", ["-1", "many", "2.5"])
def test_a_bad_cap_setting_is_one_clear_line(value):
    with pytest.raises(InvalidInput) as raised:
        Settings.from_env({"KB_HOME": "/tmp/kb", "KB_MAX_REPHRASES": value})
    assert str(raised.value) == f"KB_MAX_REPHRASES must be an integer >= 0, got {value!r}"


def test_default_caps():
    settings = Settings.from_env({"KB_HOME": "/tmp/kb"})
    assert (settings.max_rephrases_per_fact, settings.max_negatives_per_fact) == (32, 32)


def test_an_unreadable_model_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InvalidInput) as raised:
        text_side("broken", str(tmp_path))
    assert str(raised.value).startswith(f"model broken: cannot read the tokenizer of {str(tmp_path)!r} (")
    assert "\n" not in str(raised.value)


def test_the_tokenizer_is_loaded_once_per_model(registered):
    settings, database = registered
    fact = FactInput(_png(), "what shape?", "ring").cleaned()
    with database.session() as session:
        model = get_model(session, "vision")
        admit(settings, model, fact)
        assert text_side(model.name, model.path) is text_side(model.name, model.path)
        started = time.perf_counter()
        for _ in range(100):
            admit(settings, model, fact)
        assert time.perf_counter() - started < 2.0
