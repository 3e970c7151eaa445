"""The edit-case format: validation (through `kbctl eval`, exact error line and exit code), round
trips, and the MMEdit E-VQA / OKEDIT readers on small files written here in those layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from editor.eval.cases import load_cases, load_reference_pool, write_cases
from editor.eval.errors import CaseFileError, EvalError
from editor.eval.readers import read_mmedit_evqa, read_okedit
from kb_daemon.eval_command import eval_command

Q = "what shape is in the image?"


def picture(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def case_record(case_id: str, image: str = "img/a.png") -> dict:
    return {
        "id": case_id,
        "scope": "class",
        "fact": {
            "image": image,
            "question": Q,
            "answer": "ring",
            "rephrases": ["what shape is present?"],
            "negatives": [{"image": "img/b.png"}, {"question": "what color is the shape?"}],
        },
        "reliability": [{"image": image, "question": Q, "answer": "ring"}],
        "t_gen": [{"image": image, "question": "what shape does the image contain?", "answer": "ring"}],
        "i_gen": [{"image": "img/b.png", "question": Q, "answer": "ring"}],
        "loc": [{"image": "img/b.png", "question": "what color is the shape?"}],
    }


@pytest.fixture
def case_dir(tmp_path: Path) -> Path:
    picture(tmp_path / "img" / "a.png")
    picture(tmp_path / "img" / "b.png", (30, 30, 200))
    return tmp_path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args: list[str], monkeypatch) -> object:
    calls = []
    import editor.eval.runner as runner

    monkeypatch.setattr(runner, "run_eval", lambda *a, **k: calls.append((a, k)))
    result = CliRunner().invoke(eval_command, args)
    assert not calls, "nothing may be evaluated when the input is refused"
    return result


def test_valid_file_loads_with_paths_relative_to_the_file(case_dir):
    path = write_lines(
        case_dir / "cases.jsonl", [json.dumps(case_record("c1")), "", json.dumps(case_record("c2"))]
    )
    cases = load_cases(path)
    assert [c.case_id for c in cases] == ["c1", "c2"]
    assert cases[0].fact.image == case_dir / "img" / "a.png"
    assert cases[0].fact.negatives[1].image is None and cases[0].fact.negatives[1].question
    assert cases[1].line == 3
    assert cases[0].loc[0].answer is None


def test_reliability_defaults_to_the_fact_input(case_dir):
    record = case_record("c1")
    del record["reliability"]
    cases = load_cases(write_lines(case_dir / "cases.jsonl", [json.dumps(record)]))
    assert cases[0].reliability[0].question == Q and cases[0].reliability[0].answer == "ring"


def test_write_then_load_round_trip(case_dir, tmp_path):
    cases = load_cases(write_lines(case_dir / "cases.jsonl", [json.dumps(case_record("c1"))]))
    out = write_cases(cases, tmp_path / "other" / "copy.jsonl")
    assert json.loads(out.read_text())["fact"]["image"] == "../img/a.png"
    assert load_cases(out) == cases


@pytest.mark.parametrize(
    "lines, line, message",
    [
        (
            [json.dumps(case_record("c1")), json.dumps(case_record("c2", "img/missing.png"))],
            2,
            "fact.image: image 'img/missing.png' not found",
        ),
        ([json.dumps(case_record("c1")), "", '{"id": "c3", "fact": '], 3, "malformed JSON"),
        ([json.dumps({**case_record("c1"), "tgen": []})], 1, "case: unknown field(s) tgen; valid: id, scope"),
        (
            [json.dumps(case_record("c1")), json.dumps(case_record("c1"))],
            2,
            "duplicate id 'c1' (first on line 1)",
        ),
        ([json.dumps({k: v for k, v in case_record("c1").items() if k != "fact"})], 1, "fact is missing"),
        (
            [json.dumps({**case_record("c1"), "t_gen": [{"image": "img/a.png", "question": Q}]})],
            1,
            "t_gen[0].answer is missing",
        ),
        (
            [json.dumps({**case_record("c1"), "loc": [{"image": "img/nope.png", "question": Q}]})],
            1,
            "loc[0].image: image 'img/nope.png' not found",
        ),
        (["[1, 2]"], 1, "expected a JSON object, got list"),
    ],
)
def test_bad_case_file_is_refused_with_file_line_and_exit_1(case_dir, monkeypatch, lines, line, message):
    path = write_lines(case_dir / "cases.jsonl", lines)
    with pytest.raises(CaseFileError) as caught:
        load_cases(path)
    assert caught.value.line == line
    result = run_cli([str(path), "--method", "balancedit"], monkeypatch)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"Error: {path}:{line}: {message}"), result.stderr


def test_unreadable_image_is_refused(case_dir, monkeypatch):
    (case_dir / "img" / "a.png").write_bytes(b"not a png")
    path = write_lines(case_dir / "cases.jsonl", [json.dumps(case_record("c1"))])
    result = run_cli([str(path), "--method", "ft"], monkeypatch)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: {path}:1: fact.image: image 'img/a.png' cannot be read as an image"
    )


def test_unknown_method_is_refused_before_the_file_is_used(case_dir, monkeypatch):
    path = write_lines(case_dir / "cases.jsonl", [json.dumps(case_record("c1"))])
    result = run_cli([str(path), "--method", "sgd"], monkeypatch)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: --method: unknown method 'sgd'; choose one of balancedit, grace, ft, mend, ike\n"
    )


@pytest.mark.parametrize(
    "hparam, message",
    [
        ("alpha", "Error: --hparam 'alpha' is not KEY=VALUE (e.g. --hparam alpha=0.1)\n"),
        ("alpah=0.1", "Error: unknown hyperparameter(s) alpah; valid: "),
        ("alpha=3", "Error: alpha must lie in [0, 1], got 3"),
    ],
)
def test_bad_hparam_is_refused(case_dir, monkeypatch, hparam, message):
    path = write_lines(case_dir / "cases.jsonl", [json.dumps(case_record("c1"))])
    result = run_cli([str(path), "--method", "balancedit", "--hparam", hparam], monkeypatch)
    assert result.exit_code == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_baseline_hparams_are_checked_too(case_dir, monkeypatch):
    path = write_lines(case_dir / "cases.jsonl", [json.dumps(case_record("c1"))])
    result = run_cli([str(path), "--method", "mend", "--hparam", "rank=0"], monkeypatch)
    assert result.exit_code == 1 and result.stderr == "Error: rank must be at least 1, got 0\n"
    result = run_cli([str(path), "--method", "ft", "--hparam", "alpha=0.1"], monkeypatch)
    assert result.exit_code == 1 and result.stderr.startswith(
        "Error: unknown hyperparameter(s) alpha for ft; valid:"
    )


def test_missing_case_file(tmp_path, monkeypatch):
    result = run_cli([str(tmp_path / "none.jsonl"), "--method", "grace"], monkeypatch)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'none.jsonl'}:0: file not found\n"


def test_help_ends_with_an_example_block():
    result = CliRunner().invoke(eval_command, ["--help"])
    assert result.exit_code == 0
    body = result.output.split("Options:")[0].rstrip()
    assert "Example:" in body and body.splitlines()[-1].strip().startswith("kbctl eval ")


def test_command_module_imports_no_torch_or_editor():
    code = (
        "import sys, kb_daemon.eval_command as m; assert m.eval_command.name == 'eval'; "
        "bad = [n for n in ('torch', 'editor', 'transformers') if n in sys.modules]; print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip() == "[]"


def test_reference_pool_file(case_dir):
    path = write_lines(
        case_dir / "pool.jsonl",
        [
            json.dumps({"image": "img/a.png", "question": Q, "answer": "x"}),
            json.dumps({"image": "img/zz.png", "question": Q}),
        ],
    )
    with pytest.raises(CaseFileError, match=r"pool.jsonl:2: item.image: image 'img/zz.png' not found"):
        load_reference_pool(path)


# ----- readers --------------------------------------------------------------------------------------
def test_mmedit_evqa_reader(tmp_path):
    coco = tmp_path / "coco"
    picture(coco / "val2014" / "COCO_1.jpg")
    picture(coco / "val2014" / "COCO_2.jpg")
    picture(tmp_path / "rephrase" / "r1.png")
    records = [
        {
            "src": "What is the man holding?",
            "pred": "bat",
            "alt": "umbrella",
            "rephrase": "What does the man hold?",
            "image": "val2014/COCO_1.jpg",
            "image_rephrase": "r1.png",
            "loc": "nq question: who wrote hamlet",
            "loc_ans": "shakespeare",
            "m_loc": "val2014/COCO_2.jpg",
            "m_loc_q": "What sport is this?",
            "m_loc_a": "tennis",
        },
        {
            "src": "skipped",
            "pred": "x",
            "alt": "",
            "rephrase": "y",
            "image": "val2014/COCO_1.jpg",
            "image_rephrase": "r1.png",
            "loc": "q",
            "loc_ans": "a",
            "m_loc": "val2014/COCO_2.jpg",
            "m_loc_q": "q",
            "m_loc_a": "a",
        },
    ]
    source = tmp_path / "vqa_eval.json"
    source.write_text(json.dumps(records))
    cases = read_mmedit_evqa(source, coco, rephrase_root=tmp_path / "rephrase")
    assert len(cases) == 1
    case = cases[0]
    assert (case.fact.question, case.fact.answer, case.fact.rephrases, case.fact.negatives) == (
        "What is the man holding?",
        "umbrella",
        (),
        (),
    )
    assert [(p.question, p.answer) for p in case.t_gen] == [("What does the man hold?", "umbrella")]
    assert (
        case.i_gen[0].image == tmp_path / "rephrase" / "r1.png"
        and case.i_gen[0].question == case.fact.question
    )
    assert [(p.image.name, p.question) for p in case.loc] == [("COCO_2.jpg", "What sport is this?")]
    with_text = read_mmedit_evqa(source, coco, rephrase_root=tmp_path / "rephrase", text_loc=True)[0]
    assert with_text.loc[1].image is None and with_text.loc[1].question == "nq question: who wrote hamlet"
    # Converted cases write and load as a case file.
    out = write_cases(cases, tmp_path / "out" / "evqa.jsonl")
    assert load_cases(out)[0].t_gen == case.t_gen
    records[0]["image_rephrase"] = "missing.png"
    source.write_text(json.dumps(records))
    with pytest.raises(EvalError, match="record 0: image_rephrase 'missing.png' not found"):
        read_mmedit_evqa(source, coco, rephrase_root=tmp_path / "rephrase")


def test_okedit_reader(tmp_path):
    picture(tmp_path / "coco" / "COCO_val2014_000000000042.jpg")
    for n in range(3):
        picture(tmp_path / "gen" / "7" / f"{n}.png")
    picture(tmp_path / "loc" / "7" / "0.png")
    record = {
        "question_id": 7,
        "prompt": "What breed is this dog?",
        "pred": "poodle",
        "target": "beagle",
        "rephrase_prompts": ["Which breed is the dog?", "The dog is of what breed?"],
        "image": "COCO_val2014_000000000042.jpg",
        "image_rephrases": [f"7/{n}.png" for n in range(3)],
        "multimodal_locality_image": "7/0.png",
        "multimodal_locality_ground_truth": "husky",
    }
    source = tmp_path / "okedit.jsonl"
    source.write_text(json.dumps(record) + "\n" + json.dumps({**record, "target": ""}) + "\n")
    cases = read_okedit(
        source, tmp_path / "coco", rephrase_root=tmp_path / "gen", locality_root=tmp_path / "loc"
    )
    assert len(cases) == 1
    case = cases[0]
    assert case.case_id == "okedit-7"
    assert [p.question for p in case.t_gen] == record["rephrase_prompts"]
    assert len(case.i_gen) == 3 and {p.question for p in case.i_gen} == {"What breed is this dog?"}
    assert case.loc[0].image == tmp_path / "loc" / "7" / "0.png"
    assert case.loc[0].question == "What breed is this dog?" and case.loc[0].answer == "husky"
    source.write_text(json.dumps({k: v for k, v in record.items() if k != "rephrase_prompts"}))
    with pytest.raises(EvalError, match="record 0: field 'rephrase_prompts' must be a list of strings"):
        read_okedit(source, tmp_path / "coco", rephrase_root=tmp_path / "gen", locality_root=tmp_path / "loc")
