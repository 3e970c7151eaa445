"""Bad input: one clear line on stderr, exit code 1, and nothing written (issue: reliability)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from daemon_harness import Daemon
from PIL import Image
from tiny_models import image, save

Q = "what shape is it?"
# Random tiny models never emit end-of-sequence: cap generation so the one edit stays cheap.
FAST = ("--hparam", "max_steps=3", "--hparam", "max_new_tokens=8", "--hparam", "max_answer_tokens=8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    save("llava-llama", root / "model")
    image((200, 10, 10)).save(root / "good.png")
    (root / "notes.txt").write_text("not an image")
    png = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("L", (4100, 4100)).save(root / "bomb.png")  # 16.8 M pixels > the 16 M limit
    (root / "folder").mkdir()
    d = Daemon(root / "home")
    d.kbctl("init")
    d.kbctl("model", "add", "tiny", str(root / "model"))
    # A second model with a version 1 and a fact of its own, applied by a real worker: the model
    # scoping cases below ask model tiny (at version 0) for them.
    other = Daemon(root / "home", model="other")
    other.kbctl("model", "add", "other", str(root / "model"), *FAST)
    other.start_worker("worker")
    try:
        applied = other.kbctl("submit-fact", "--image", str(root / "good.png"), "--question", Q, "--answer", "x",
                              "--wait", "--timeout", "120", "--json")
    finally:
        assert [code for _, code in other.stop_workers()] == [0], other.logs(tail=3000)
    assert applied["version"] == 1
    assert other.kbctl("show", "1", "--json")["added"] == [applied["fact_id"]]
    assert other.kbctl("ask", "--image", str(root / "good.png"), "--question", Q, "--version", "1",
                       "--json") == {"answer": "x", "version": 1, "fact_id": applied["fact_id"]}
    source = root / "source"
    source.mkdir()
    (source / "good.png").write_bytes(png)
    (root / "outside.png").write_bytes(png)
    os.symlink(root / "outside.png", source / "link.png")
    return root, d, applied["fact_id"]


def counts(d: Daemon) -> dict[str, int]:
    engine = sa.create_engine(d.env["KB_DATABASE_URL"])
    with engine.connect() as connection:
        result = {t: connection.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
                  for t in ("facts", "jobs", "versions", "blobs", "entries", "models")}
    engine.dispose()
    return result


def source_file(root: Path, name: str, lines: list[str]) -> str:
    path = root / "source" / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def good_line(key: str = "a", image_path: str = "good.png") -> str:
    return json.dumps({"key": key, "image": image_path, "question": Q, "answer": "ring"})


CASES = {
    "missing image": (["submit-fact", "--image", "{root}/nope.png", "--question", Q, "--answer", "a"],
                      "Error: image '{root}/nope.png' does not exist"),
    "directory": (["submit-fact", "--image", "{root}/folder", "--question", Q, "--answer", "a"],
                  "Error: image '{root}/folder' is not a regular file"),
    "not an image": (["submit-fact", "--image", "{root}/notes.txt", "--question", Q, "--answer", "a"],
                     "Error: image '{root}/notes.txt' is not a readable image (UnidentifiedImageError: "),
    "truncated png": (["submit-fact", "--image", "{root}/truncated.png", "--question", Q, "--answer", "a"],
                      "Error: image '{root}/truncated.png' is not a readable image"),
    "decompression bomb": (["submit-fact", "--image", "{root}/bomb.png", "--question", Q, "--answer", "a"],
                           "Error: image '{root}/bomb.png' has 4100x4100 pixels; the limit is 16,000,000"),
    "empty question": (["submit-fact", "--image", "{root}/good.png", "--question", "", "--answer", "a"],
                       "Error: question is empty"),
    "blank answer": (["submit-fact", "--image", "{root}/good.png", "--question", Q, "--answer", "  \t "],
                     "Error: answer is empty"),
    "huge question": (["submit-fact", "--image", "{root}/good.png", "--question", "q" * 100_000, "--answer", "a"],
                      "Error: question is 100,000 characters long; the limit is 2,000"),
    "invalid utf-8": (["submit-fact", "--image", "{root}/good.png", "--question", "caf\udce9?", "--answer", "a"],
                      "Error: question contains the lone surrogate U+DCE9 at position 3; remove it"),
    "right-to-left override in an answer": (
        ["submit-fact", "--image", "{root}/good.png", "--question", Q, "--answer", "ring\u202egnir"],
        "Error: answer contains the bidirectional control character U+202E at position 4; remove it"),
    "bell in an answer": (["submit-fact", "--image", "{root}/good.png", "--question", Q, "--answer", "ring\x07"],
                          "Error: answer contains the control character U+0007 at position 4; remove it"),
    "escape in a question": (
        ["submit-fact", "--image", "{root}/good.png", "--question", "\x1b[2Jwhat shape?", "--answer", "a"],
        "Error: question contains the control character U+001B at position 0; remove it"),
    "escape in a rephrase": (
        ["submit-fact", "--image", "{root}/good.png", "--question", Q, "--answer", "a", "--rephrase", "which\x1b?"],
        "Error: rephrase contains the control character U+001B at position 5; remove it"),
    "no image on a vision model": (["submit-fact", "--question", Q, "--answer", "a"],
                                   "Error: model tiny answers about images: the fact needs an image (--image)"),
    "answer longer than the model allows": (
        ["submit-fact", "--image", "{root}/good.png", "--question", Q, "--answer", "a" * 100],
        "Error: answer is 101 tokens long; model tiny allows 64 (max_answer_tokens; change it with "
        "`kbctl model set tiny --hparam max_answer_tokens=N`)"),
    "too many rephrasings": (["submit-fact", "--image", "{root}/good.png", "--question", Q, "--answer", "a",
                              *[arg for i in range(33) for arg in ("--rephrase", f"what shape, take {i}?")]],
                             "Error: 33 rephrases; the limit is 32 (KB_MAX_REPHRASES)"),
    "answer too long in a source": (["ingest", "@long.jsonl"],
                                    "Error: {root}/source/long.jsonl:2: answer is 101 tokens long; model tiny allows"),
    "unknown model": (["--model", "nope", "submit-fact", "--image", "{root}/good.png", "--question", Q,
                       "--answer", "a"], "Error: unknown model 'nope' (registered: demo, other, tiny)"),
    "rollback to a missing version": (["rollback", "99"], "Error: model 'tiny' has no version 99 (versions 0..0)"),
    # Model `other` has a version 1 and a fact; model tiny has neither.
    "rollback to another model's version": (["rollback", "1"],
                                            "Error: model 'tiny' has no version 1 (versions 0..0)"),
    "show another model's version": (["show", "1"], "Error: model 'tiny' has no version 1 (versions 0..0)"),
    "ask at another model's version": (["ask", "--image", "{root}/good.png", "--question", Q, "--version", "1"],
                                       "Error: model 'tiny' has no version 1 (versions 0..0)"),
    "export another model's version": (["export", "1", "{root}/export"],
                                       "Error: model 'tiny' has no version 1 (versions 0..0)"),
    "retract another model's fact": (["retract", "{other_fact}"], "Error: model 'tiny' has no fact '{other_fact}'"),
    "retract unknown fact": (["retract", "f-0000000000000000"],
                             "Error: model 'tiny' has no fact 'f-0000000000000000'"),
    "malformed source line": (["ingest", "@malformed.jsonl"], "Error: {root}/source/malformed.jsonl:2: malformed JSON"),
    "duplicate keys": (["ingest", "@duplicate.jsonl"],
                       "Error: {root}/source/duplicate.jsonl:2: duplicate key 'a' "
                       "(first at {root}/source/duplicate.jsonl:1)"),
    "path escaping the folder": (["ingest", "@escape.jsonl"],
                                 "Error: {root}/source/escape.jsonl:1: image path '../../etc/passwd' "
                                 "escapes the source folder"),
    "symlink pointing outside": (["ingest", "@symlink.jsonl"],
                                 "Error: {root}/source/symlink.jsonl:1: image path 'link.png' "
                                 "escapes the source folder"),
    "invalid utf-8 in a source": (["ingest", "@latin1.jsonl"], "Error: {root}/source/latin1.jsonl:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_cleanly(setup, case):
    root, d, other_fact = setup
    (root / "source" / "malformed.jsonl").write_text(good_line() + "\n{not json\n")
    source_file(root, "duplicate.jsonl", [good_line("a"), good_line("a")])
    source_file(root, "long.jsonl", [good_line("a"), json.dumps({"key": "b", "image": "good.png", "question": Q,
                                                                  "answer": "a" * 100})])
    source_file(root, "escape.jsonl", [good_line("a", "../../etc/passwd")])
    source_file(root, "symlink.jsonl", [good_line("a", "link.png")])
    (root / "source" / "latin1.jsonl").write_bytes(good_line().encode() + b'\n{"question": "caf\xe9"}\n')
    args, expected = CASES[case]
    args = [a.replace("{root}", str(root)).replace("{other_fact}", other_fact) for a in args]
    args = [str(root / "source" / a[1:]) if a.startswith("@") else a for a in args]
    expected = expected.replace("{root}", str(root)).replace("{other_fact}", other_fact)
    before = counts(d)
    result = d.kbctl(*args, expect=1)
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert "BytesIO" not in result.stderr  # an image is named as the user gave it
    assert counts(d) == before
    assert not (root / "export").exists()
