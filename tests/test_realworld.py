"""Real-world SQuAD-like files (COVID-QA's quirks) through the CLIs: evaluate and train with skip_invalid,
and files with nothing usable refused in one line, exit 2.

tests/fixtures/covid_like.json mimics deepset's COVID-QA (text written for these tests): integer ids, no
article titles, document_id and is_impossible fields, answers ending with a space, and two of its nine
answers with COVID-QA's usual offset error (the text starts with a space, answer_start after it).
"""

import json
from pathlib import Path

import pytest

import qala.evaluate as qe
import qala.train as qt
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "covid_like.json"
NO_QUESTIONS = "no questions (expected articles with paragraphs and qas in 'data')"
KEPT = ["101", "102", "104", "201", "202", "301", "302"]  # 103 and 203 have offsets off by one space

RECIPE = """
run: {{output_dir: {out}, seed: 7}}
data: {{train: {train}, eval: {eval}, max_seq_length: 96, doc_stride: 32{extra}}}
model: {{name_or_path: {model}}}
train:
  stages: [finetune]
  finetune:
    training_args: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-3, save_steps: 2,
                    disable_tqdm: true}}
eval: {{keep_ratios: [0.5], batch_size: 8}}
"""


def write_recipe(tmp_path: Path, model: Path, train: Path = FIXTURE, eval: Path = FIXTURE, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run", train=train, eval=eval, model=model, extra=extra))
    return path


def error_line(capsys) -> str:
    """The one `error: ...` line a refused input gives, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_evaluate_refuses_covid_like_file_naming_its_flag_then_skips_with_it(tiny_checkpoint, tmp_path, capsys):
    args = [str(tiny_checkpoint), str(FIXTURE), "--max-seq-length", "96", "--doc-stride", "32"]
    assert qe.main(args) == 2
    line = error_line(capsys)
    assert "question 103: answers[0].answer_start=845 does not match the context" in line
    assert line.endswith("[and 1 more problem(s) in " + str(FIXTURE) + "; --skip-invalid skips invalid questions]")

    out = tmp_path / "predictions.json"
    assert qe.main([*args, "--skip-invalid", "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == len(KEPT) and metrics["windows"] > len(KEPT)  # ~1.3k-character contexts: many windows
    predictions = json.loads(out.read_text())
    assert sorted(predictions) == KEPT  # integer ids, scored and written as strings


def test_training_runs_on_covid_like_file_with_skip_invalid(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_checkpoint)
    assert qt.main([str(path)]) == 2  # without skip_invalid: the recipe key to set, in one line
    assert error_line(capsys).endswith("; data.skip_invalid=true skips invalid questions]")

    assert qt.main([str(path), "data.skip_invalid=true"]) == 0
    info = json.loads((tmp_path / "run" / "finetune" / "model" / "training_info.json").read_text())
    assert info["global_step"] == 2 and info["num_train_features"] > len(KEPT)
    evaluation = json.loads((tmp_path / "run" / "finetune" / "eval.json").read_text())
    assert evaluation["results"]["full"]["n"] == len(KEPT)


def _every_offset_wrong(tmp_path: Path) -> Path:
    document = json.loads(FIXTURE.read_text())
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["answers"][0]["answer_start"] += 1
    path = tmp_path / "all_invalid.json"
    path.write_text(json.dumps(document))
    return path


def test_training_with_every_question_skipped_is_one_line_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Was `error: num_samples should be a positive integer value, but got num_samples=0` from the sampler."""
    monkeypatch.chdir(REPO)
    all_invalid = _every_offset_wrong(tmp_path)
    assert qt.main([str(write_recipe(tmp_path, tiny_checkpoint, train=all_invalid)), "data.skip_invalid=true"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {all_invalid}: no valid question to use, all skipped (9 problem(s)); the first: ")
    assert not (tmp_path / "run" / "finetune" / "model").exists()


@pytest.mark.parametrize("which", ["train", "eval"])
def test_training_on_an_empty_file_is_one_line_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys, which):
    monkeypatch.chdir(REPO)
    empty = tmp_path / "empty.json"
    empty.write_text('{"data": []}')
    recipe = write_recipe(tmp_path, tiny_checkpoint, extra=", skip_invalid: true", **{which: empty})
    assert qt.main([str(recipe)]) == 2
    assert error_line(capsys) == f"error: {empty}: {NO_QUESTIONS}"


def test_evaluate_on_an_empty_file_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    """Was `error: Column 'input_ids' doesn't exist.`"""
    empty = tmp_path / "empty.json"
    empty.write_text('{"data": []}')
    for extra in ([], ["--skip-invalid"]):
        assert qe.main([str(tiny_checkpoint), str(empty), *extra]) == 2
        assert error_line(capsys) == f"error: {empty}: {NO_QUESTIONS}"


def _long_question_file(tmp_path: Path) -> Path:
    document = json.loads(FIXTURE.read_text())
    qa = document["data"][0]["paragraphs"][0]["qas"][0]
    qa["question"] = " ".join(["how many households were followed in the two coastal towns"] * 12) + "?"
    path = tmp_path / "long_question.json"
    path.write_text(json.dumps(document))
    return path


def test_a_question_longer_than_the_window_is_one_line_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    long_question = _long_question_file(tmp_path)
    args = [str(tiny_checkpoint), str(long_question), "--skip-invalid", "--max-seq-length", "96", "--doc-stride", "32"]
    assert qe.main(args) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {long_question}: question 101 is ")
    assert "long, longer than the window: max_seq_length=96" in line

    monkeypatch.chdir(REPO)
    recipe = write_recipe(tmp_path, tiny_checkpoint, train=long_question, extra=", skip_invalid: true")
    assert qt.main([str(recipe)]) == 2
    assert error_line(capsys).startswith(f"error: {long_question}: question 101 is ")
