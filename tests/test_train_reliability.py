"""qala.train under failure (issue 20): a diverged stage saves nothing, a checkpoint cut off by a kill is skipped,
a damaged one is named, saved files follow the umask. Tiny random models, a few steps each."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qala.train as qt
from qala.recipe import StageConfig, load_recipe
from qala.train import read_training_info
from tests import kill_moments
from tests.conftest import REPO, kill_9_when
from tests.kill_moments import read_log
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


def test_a_temperature_that_silences_the_teacher_is_refused(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Found by the issue-20 re-check: kd_temperature=1e-30 (> 0, so accepted) trained the quickstart with exit 0 as
    if there were no teacher: the distillation loss is scaled by the temperature's square and underflowed to 0."""
    student = (torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True))
    teacher_logits, mask = (torch.randn(2, 8), torch.randn(2, 8)), torch.ones(2, 8, dtype=torch.bool)
    assert float(qt.distillation_loss(student, teacher_logits, mask, temperature=1e-30)) == 0.0
    assert float(qt.distillation_loss(student, teacher_logits, mask, temperature=0.1)) > 0.0
    monkeypatch.chdir(REPO)
    path = make_recipe(tmp_path, tiny_checkpoint)
    teacher = [*ONE, f"model.teacher={tiny_checkpoint}"]
    assert qt.main([str(path), *teacher, "train.finetune.kd_temperature=1e-30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith("got 1e-30"), err
    assert "train.finetune.kd_temperature: expected a number >= 0.1 (" in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_an_incomplete_checkpoint_is_skipped_and_a_damaged_one_named(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Before: a checkpoint cut off while being written (no trainer_state.json) made every --resume fail, and a
    damaged optimizer.pt gave a traceback."""
    monkeypatch.chdir(REPO)
    straight = qt.run(load_recipe(make_recipe(tmp_path, tiny_checkpoint, steps=4, name="straight"), ONE))
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
    # Issue 20, item 9: the train_loss of all 4 steps (the Trainer's was the mean of steps 3-4 after a resume),
    # the mean of the per-step losses the uninterrupted run logged (logging_steps=1).
    loss = result["finetune"]["train_metrics"]["train_loss"]
    assert loss == straight["finetune"]["train_metrics"]["train_loss"]
    state = json.loads(
        (tmp_path / "straight" / "finetune" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text()
    )
    logged = [row["loss"] for row in state["log_history"] if "loss" in row]
    assert len(logged) == 4 and loss == pytest.approx(sum(logged) / 4, rel=1e-6)


def test_a_stage_stopped_after_its_last_checkpoint_resumes_to_the_same_model(tmp_path, tiny_checkpoint, monkeypatch):
    """Found by the kill probe: killed between the last checkpoint and the model's save, --resume let the Trainer
    run a step past max_steps (global_step 5 of 4). With a decayed learning rate only train_loss showed it; with
    a constant one the weights changed too."""
    monkeypatch.chdir(REPO)
    constant = [*ONE, "train.finetune.training_args.lr_scheduler_type=constant"]
    straight = qt.run(load_recipe(make_recipe(tmp_path, tiny_checkpoint, steps=4, name="straight"), constant))
    path = make_recipe(tmp_path, tiny_checkpoint, steps=4)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill")

    with monkeypatch.context() as patch:
        patch.setattr(qt, "_save_stage_model", killed)
        with pytest.raises(KeyboardInterrupt):
            qt.run(load_recipe(path, constant))
    assert (tmp_path / "run" / "finetune" / "checkpoints" / "checkpoint-4").is_dir()
    result = qt.run(load_recipe(path, constant), resume=True)["finetune"]
    assert result["resumed_from"] == "checkpoint-4" and result["global_step"] == 4
    assert_identical_weights(tmp_path / "run" / "finetune", tmp_path / "straight" / "finetune")
    assert result["train_metrics"]["train_loss"] == straight["finetune"]["train_metrics"]["train_loss"]


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
    # A checkpoint's weights too (0600 before, found by the issue-20 re-check): a shared run folder resumes.
    checkpoint = tmp_path / "run" / "finetune" / "checkpoints" / "checkpoint-2"
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in checkpoint.iterdir()}
    assert modes["model.safetensors"] == "0o644" and set(modes.values()) == {"0o644"}, modes


def assert_identical_weights(stage, reference_stage):
    """The model a stage folder holds equals another's bit for bit (assert_same_weights allows 1e-6)."""
    weights = load_file(stage / "model" / "model.safetensors")
    reference = load_file(reference_stage / "model" / "model.safetensors")
    assert weights.keys() == reference.keys()
    different = [name for name, tensor in reference.items() if not torch.equal(weights[name], tensor)]
    assert not different, f"{stage}: {different} differ from {reference_stage}"


def train_to_the_end(root, log, args) -> int:
    """`python -m qala.train args...` in a fresh process (forked, see kill_moments.start): its exit code."""
    process = kill_moments.start(root, log, "-", Path(log).with_suffix(".unused"), args)
    process.join()
    return process.exitcode


EVERY_STEP = [*ONE, "train.finetune.training_args.save_steps=1", "train.finetune.training_args.logging_steps=5"]


@pytest.mark.slow  # a forkserver that imports qala.train once: ~10-20 s before the first run starts
def test_kill_9_while_a_checkpoint_is_written_then_resume_matches_an_uninterrupted_run(
    tmp_path, tiny_checkpoint, monkeypatch
):
    """A real process killed with SIGKILL half way through writing checkpoint-3's optimizer.pt (no
    trainer_state.json yet), then --resume: checkpoint-3 is skipped, and the weights and the train_loss are the
    uninterrupted run's, bit for bit.

    tests.kill_moments stops the run at that moment for the kill. The test this replaces polled every 0.2 s for
    checkpoint-3 to appear and killed the run then; but the tiny run's steps take ~50 ms, and with
    save_total_limit=2 checkpoint-3 is removed when checkpoint-5 is written ~0.1 s later, so the poll mostly
    missed it and the run ended first (exit 0, "the run ended before checkpoint-3")."""
    monkeypatch.chdir(REPO)
    straight, killed = (make_recipe(tmp_path, tiny_checkpoint, steps=6, name=name) for name in ("straight", "run"))
    assert train_to_the_end(tmp_path / "straight", tmp_path / "straight.log", [straight, *EVERY_STEP]) == 0

    marker, log = tmp_path / "stopped", tmp_path / "killed.log"
    moment = "partial write finetune/checkpoints/checkpoint-3/optimizer.pt"
    process = kill_moments.start(tmp_path / "run", log, moment, marker, [killed, *EVERY_STEP])
    kill_9_when(marker, process, moment, timeout=900)
    assert " ".join(read_log(log)[-1][1:]) == moment
    checkpoints = tmp_path / "run" / "finetune" / "checkpoints"
    cut = checkpoints / "checkpoint-3"
    assert not (cut / "trainer_state.json").exists() and not (tmp_path / "run" / "finetune" / "model").exists()
    assert 0 < (cut / "optimizer.pt").stat().st_size < (checkpoints / "checkpoint-2" / "optimizer.pt").stat().st_size

    assert train_to_the_end(tmp_path / "run", tmp_path / "resumed.log", [killed, "--resume", *EVERY_STEP]) == 0
    info = read_training_info(tmp_path / "run" / "finetune")
    reference = read_training_info(tmp_path / "straight" / "finetune")
    assert info["resumed_from"] == "checkpoint-2" and info["global_step"] == 6
    assert_identical_weights(tmp_path / "run" / "finetune", tmp_path / "straight" / "finetune")
    # Issue 20, item 9: the Trainer's own figure was the mean of steps 3-6 only.
    assert info["train_metrics"]["train_loss"] == reference["train_metrics"]["train_loss"]


KILLS = int(os.environ.get("QALA_KILL_PROBE") or 0)


@pytest.mark.slow
@pytest.mark.skipif(
    not KILLS,
    reason="the issue-20 kill -9 probe, off by default (a run and a resume per kill, ~10 s each): "
    "QALA_KILL_PROBE=20 python -m pytest tests/test_train_reliability.py -k random_moments -s",
)
def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_checkpoint, monkeypatch):
    """QALA_KILL_PROBE=N kills of a two-stage run (finetune 12 steps, lengthdrop 4), each at a moment drawn
    (seed QALA_KILL_PROBE_SEED, 20 by default) from those of an uninterrupted run: a quarter at the start of an
    optimizer step, the rest among its file writes, renames and deletions (before, half done, after; checkpoint
    writes and rotation included). Each killed run is then resumed with --resume in a new process: every resume
    must exit 0 with both stages' weights and train_loss bit for bit the uninterrupted run's. One line per kill."""
    monkeypatch.chdir(REPO)
    overrides = ["train.lengthdrop.training_args.max_steps=4", "data.max_eval_samples=2"]
    straight = make_recipe(tmp_path, tiny_checkpoint, steps=12, name="straight")
    assert train_to_the_end(tmp_path / "straight", tmp_path / "straight.log", [straight, *overrides]) == 0
    moments = read_log(tmp_path / "straight.log")
    steps = [m for m in moments if m[1] == "at"]
    files = [m for m in moments if m[1] != "at"]
    rng = random.Random(int(os.environ.get("QALA_KILL_PROBE_SEED") or 20))
    chosen = sorted(rng.sample(steps, min(KILLS // 4, len(steps))))
    chosen = sorted(chosen + rng.sample(files, KILLS - len(chosen)))

    failures = []
    for kill, (index, phase, what) in enumerate(chosen):
        name = f"kill{kill:02d}"
        recipe, root = make_recipe(tmp_path, tiny_checkpoint, steps=12, name=name), tmp_path / name
        log, marker = tmp_path / f"{name}.log", tmp_path / f"{name}.stopped"
        process = kill_moments.start(root, log, str(index), marker, [recipe, *overrides])
        kill_9_when(marker, process, f"moment {index}", timeout=1800)
        row = {"kill": kill, "moment": f"{index} {phase} {what}", "landed": read_log(log)[-1] == (index, phase, what)}
        row["left"] = {
            stage: sorted(p.name for p in (root / stage / "checkpoints").glob("checkpoint-*"))
            + (["model"] if (root / stage / "model").is_dir() else [])
            for stage in ("finetune", "lengthdrop")
        }
        row["exit"] = train_to_the_end(root, tmp_path / f"{name}.resumed.log", [recipe, "--resume", *overrides])
        ok = row["landed"] and row["exit"] == 0
        for stage in ("finetune", "lengthdrop") if row["exit"] == 0 else ():
            info, reference = read_training_info(root / stage), read_training_info(tmp_path / "straight" / stage)
            try:
                assert_identical_weights(root / stage, tmp_path / "straight" / stage)
                weights = "equal"
            except AssertionError as e:
                weights, ok = str(e), False
            loss = info["train_metrics"]["train_loss"]
            same_loss = loss == reference["train_metrics"]["train_loss"]
            ok = ok and same_loss
            if info["global_step"] != reference["global_step"]:
                ok = False
            row[stage] = {
                "resumed_from": info["resumed_from"],
                "global_step": info["global_step"],
                "weights": weights,
                "train_loss": "equal" if same_loss else [loss, reference["train_metrics"]["train_loss"]],
            }
        print(json.dumps(row), flush=True)
        if not ok:
            failures.append(row)
    assert not failures, failures
