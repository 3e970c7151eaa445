"""The project's one text cleaning (`editor.fact.clean_text`) and image check (`editor.images`)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from editor.errors import InvalidFactError
from editor.fact import Fact, clean_text, normalise_answer
from editor.images import COMMON_IMAGE_FORMATS, check_image, read_image_file


@pytest.mark.parametrize(
    ("given", "cleaned"),
    [
        ("what shape is in the image?", "what shape is in the image?"),
        ("  what   shape\tis\nin the image?  ", "what shape is in the image?"),
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("a\u00a0b\u2003c", "a b c"),  # Unicode white space counts as white space
        ("a\x1cb", "a b"),  # ASCII separators are white space to str.split, so collapsed
    ],
)
def test_clean_text_normalises_and_collapses_white_space(given, cleaned):
    assert clean_text(given, "question", 100) == cleaned


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "answer is empty; give a non-blank answer"),
        (" \t\n ", "answer is empty; give a non-blank answer"),
        ("x" * 11, "answer is 11 characters long; the limit is 10"),
        ("ring\x07", "answer contains the control character U+0007 at position 4; remove it"),
        ("\x00ring", "answer contains the control character U+0000 at position 0; remove it"),
        ("ri\x7fng", "answer contains the control character U+007F at position 2; remove it"),
        ("ri\x9bng", "answer contains the control character U+009B at position 2; remove it"),
        ("a\u202eb", "answer contains the bidirectional control character U+202E at position 1; remove it"),
        ("a\u202ab", "answer contains the bidirectional control character U+202A at position 1; remove it"),
        ("a\u2066b", "answer contains the bidirectional control character U+2066 at position 1; remove it"),
        ("a\u2069b", "answer contains the bidirectional control character U+2069 at position 1; remove it"),
        ("caf\udce9", "answer contains the lone surrogate U+DCE9 at position 3; remove it"),
        # The position is the character's index in the text as given, before white space collapses.
        ("a   b\x01", "answer contains the control character U+0001 at position 5; remove it"),
    ],
)
def test_clean_text_refuses_with_a_message_naming_the_problem(given, message):
    with pytest.raises(InvalidFactError) as raised:
        clean_text(given, "answer", 10)
    assert str(raised.value) == message


def test_clean_text_keeps_neighbours_of_the_refused_ranges():
    # U+2029 and U+202F are white space (collapsed); U+2065, U+206A and U+00A1 are kept.
    kept = "a\u2029b\u202fc\u2065d\u206ae\u00a1f"
    assert clean_text(kept, "question", 100) == "a b c\u2065d\u206ae\u00a1f"


def test_clean_text_refuses_non_strings():
    with pytest.raises(InvalidFactError, match="question must be a string, got NoneType"):
        clean_text(None, "question", 10)  # type: ignore[arg-type]


def test_fact_cleans_question_answer_and_rephrases():
    fact = Fact(None, " what  shape? ", "oblong\tbox", rephrases=["which\nshape?"])
    assert (fact.question, fact.answer, fact.rephrases) == ("what shape?", "oblong box", ("which shape?",))
    with pytest.raises(InvalidFactError, match=r"rephrase contains the control character U\+0008 at position 1"):
        Fact(None, "q", "a", rephrases=["b\bx"])


def test_normalise_answer_is_the_answer_equality():
    assert normalise_answer("  Aqua \u00a0MARINE ") == normalise_answer("aqua marine")
    assert normalise_answer("cafe\u0301") == normalise_answer("CAF\u00c9")
    assert normalise_answer("aqua marine") != normalise_answer("aquamarine")


def _png(width: int = 4, height: int = 3, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_check_image_returns_the_decoded_image():
    image = check_image(_png(), "a.png", max_bytes=10_000, max_pixels=100)
    assert (image.size, image.getpixel((0, 0))) == ((4, 3), (10, 20, 30))


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (_png(), {"max_bytes": 10}, "image 'up.png' is {size} bytes; the limit is 10"),
        (_png(10, 10), {"max_pixels": 99}, "image 'up.png' has 10x10 pixels; the limit is 99"),
        (_png(fmt="TIFF"), {"allowed_formats": COMMON_IMAGE_FORMATS},
         "image 'up.png' is TIFF; use BMP, GIF, JPEG, PNG or WEBP"),
        (b"not an image", {}, "image 'up.png' is not a readable image (UnidentifiedImageError: "),
        (_png(64, 64)[:60], {}, "image 'up.png' is not a readable image"),
    ],
)
def test_check_image_refuses_naming_the_given_name(data, limits, message):
    with pytest.raises(InvalidFactError) as raised:
        check_image(data, "up.png", **limits)
    assert str(raised.value).startswith(message.format(size=f"{len(data):,}"))
    assert "BytesIO" not in str(raised.value)


def test_read_image_file_checks_the_file_before_reading_it(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_png())
    data, image = read_image_file(good)
    assert data == good.read_bytes() and image.size == (4, 3)
    with pytest.raises(InvalidFactError, match=r"^image 'shown\.png' is \d+ bytes; the limit is 10$"):
        read_image_file(good, "shown.png", max_bytes=10)
    with pytest.raises(InvalidFactError, match=r"does not exist$"):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(InvalidFactError, match=r"is not a regular file$"):
        read_image_file(tmp_path)


def test_fact_and_images_modules_stay_light():
    # The daemon's queue uses these two without loading torch.
    code = "import sys, editor.fact, editor.images; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
