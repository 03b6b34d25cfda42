"""qala.train under failure (issue 20): a diverged stage saves nothing, a checkpoint cut off by a kill is skipped,
a damaged one is named, saved files follow the umask. Tiny random models, a few steps each."""

import os
import shutil

import pytest

import qala.train as qt
from qala.recipe import StageConfig, load_recipe
from tests.conftest import REPO, kill_9_when
from tests.test_train import _interrupt_after_checkpoint_2, assert_same_weights, make_recipe

ONE = ["train.stages=[finetune]"]


def test_a_diverged_stage_stops_naming_the_step_and_saves_no_model(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Silent before: kd_temperature=0 trained to all-NaN weights, saved them with a manifest and exited 0."""
    monkeypatch.chdir(REPO)
    path = make_recipe(tmp_path, tiny_checkpoint)
    teacher = [*ONE, f"model.teacher={tiny_checkpoint}"]
    assert qt.main([str(path), *teacher, "train.finetune.kd_temperature=0"]) == 2
    assert "train.finetune.kd_temperature: expected a number > 0, got 0.0" in capsys.readouterr().err
    # Past the recipe check (as a recipe from before it was added), the run itself must stop.
    monkeypatch.setattr(StageConfig, "__post_init__", lambda self: None)
    assert qt.main([str(path), *teacher, "train.finetune.kd_temperature=0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: train.finetune diverged at step 1: ")
    assert "NaN" in errors[0] and "nothing was saved as a model" in errors[0]
    stage = tmp_path / "run" / "finetune"
    assert not (stage / "model").exists() and not (stage / "eval.json").exists()
    assert not list((stage / "checkpoints").glob("checkpoint-*"))  # step 1 was never checkpointed


def test_an_incomplete_checkpoint_is_skipped_and_a_damaged_one_named(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Before: a checkpoint cut off while being written (no trainer_state.json) made every --resume fail, and a
    damaged optimizer.pt gave a traceback."""
    monkeypatch.chdir(REPO)
    straight = load_recipe(make_recipe(tmp_path, tiny_checkpoint, steps=4, name="straight"), ONE)
    qt.run(straight)
    path = make_recipe(tmp_path, tiny_checkpoint, steps=4)
    _interrupt_after_checkpoint_2(monkeypatch, lambda: qt.run(load_recipe(path, ONE)))
    checkpoints = tmp_path / "run" / "finetune" / "checkpoints"
    complete = checkpoints / "checkpoint-2"

    # A kill while checkpoint-3 was being written: weights there, optimizer cut short, no trainer_state.json.
    partial = checkpoints / "checkpoint-3"
    shutil.copytree(complete, partial)
    (partial / "trainer_state.json").unlink()
    optimizer = partial / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size * 2 // 3])
    # A damaged optimizer.pt in a checkpoint that looks complete: named, exit 2, nothing resumed.
    saved = (complete / "optimizer.pt").read_bytes()
    (complete / "optimizer.pt").write_bytes(saved[: len(saved) // 2])
    assert qt.main([str(path), "--resume", *ONE]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {complete / 'optimizer.pt'}: damaged (")
    assert f"delete {complete} to resume from the one before it" in errors[0]
    assert not partial.exists()  # the incomplete one was removed on the way (said in a warning)

    shutil.copytree(complete, partial)  # again, with checkpoint-2 intact
    (partial / "trainer_state.json").unlink()
    (complete / "optimizer.pt").write_bytes(saved)
    warnings = []
    monkeypatch.setattr(qt.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    result = qt.run(load_recipe(path, ONE), resume=True)
    expected = f"{partial} is incomplete (no trainer_state.json: the run was stopped while writing it): removed"
    assert any(line.startswith(expected) for line in warnings), warnings
    assert result["finetune"]["resumed_from"] == "checkpoint-2" and result["finetune"]["global_step"] == 4
    assert_same_weights(tmp_path / "run" / "finetune", tmp_path / "straight" / "finetune")


def test_saved_model_files_follow_the_umask(tmp_path, tiny_checkpoint, monkeypatch):
    """Before: model.safetensors was written 0600 whatever the umask (a shared model folder others could not read)."""
    monkeypatch.chdir(REPO)
    previous = os.umask(0o022)
    try:
        qt.run(load_recipe(make_recipe(tmp_path, tiny_checkpoint), ONE))
    finally:
        os.umask(previous)
    model_dir = tmp_path / "run" / "finetune" / "model"
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in model_dir.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct(model_dir.stat().st_mode & 0o777) == "0o755"


@pytest.mark.slow  # a training process of its own: ~10-20 s of imports before its first step
@pytest.mark.skip(
    reason="fails since 2026-12-03 (the killed run exits 0 before checkpoint-3 appears, in CI and locally); "
    "cause not found yet: see the issue-20 note"
)
def test_kill_9_around_checkpoint_writes_then_resume_matches_an_uninterrupted_run(
    tmp_path, tiny_checkpoint, monkeypatch
):
    """A real process killed with SIGKILL within 0.2 s of starting to write checkpoint-3 (a checkpoint every step:
    the kill lands in one being written, or between two), then --resume: the weights of an uninterrupted run."""
    monkeypatch.chdir(REPO)
    every_step = [*ONE, "train.finetune.training_args.save_steps=1", "train.finetune.training_args.logging_steps=5"]
    qt.run(load_recipe(make_recipe(tmp_path, tiny_checkpoint, steps=12, name="straight"), ONE))
    path = make_recipe(tmp_path, tiny_checkpoint, steps=12)
    stage = tmp_path / "run" / "finetune"
    kill_9_when(stage / "checkpoints" / "checkpoint-3", ["-m", "qala.train", str(path), *every_step], "checkpoint-3")
    assert not (stage / "model").exists()
    result = qt.run(load_recipe(path, every_step), resume=True)
    assert result["finetune"]["global_step"] == 12 and result["finetune"]["resumed_from"]
    assert_same_weights(stage, tmp_path / "straight" / "finetune")
