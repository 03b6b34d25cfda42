"""End-to-end training on a tiny random model: both stages, stage skipping, resume after a kill, KD."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import qala.train as qt
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.recipe import RecipeError, load_recipe
from qala.train import distillation_loss
from qala.utils import content_hash
from tests.conftest import REPO, build_tiny_qa_checkpoint

RECIPE = """
run: {{output_dir: {out}, seed: 7}}
data:
  train: package://qala/samples/squad_sample_train.json
  eval: package://qala/samples/squad_sample_dev.json
  max_seq_length: 128
  doc_stride: 64
  max_train_samples: 24
  max_eval_samples: 8
model: {{name_or_path: {model}}}
train:
  stages: [finetune, lengthdrop]
  finetune:
    training_args: {{max_steps: {steps}, per_device_train_batch_size: 4, learning_rate: 1.0e-3, save_steps: 2,
                    logging_steps: 1, disable_tqdm: true}}
  lengthdrop:
    num_sandwich: 1
    layer_dropout_prob: 0.3
    training_args: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-3, save_steps: 2,
                    disable_tqdm: true}}
eval: {{keep_ratios: [0.5], batch_size: 8}}
"""


def make_recipe(tmp_path, model, steps=2, name="run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(out=tmp_path / name, model=model, steps=steps))
    return path


def test_two_stages_end_to_end_then_skipped_on_rerun(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path = make_recipe(tmp_path, tiny_checkpoint)
    assert qt.main([str(path)]) == 0
    out = tmp_path / "run"
    for stage in ("finetune", "lengthdrop"):
        model_dir = out / stage / "model"
        for name in (
            "config.json",
            "qala_config.json",
            "model.safetensors",
            "tokenizer.json",
            "recipe.yaml",
            "training_info.json",
        ):
            assert (model_dir / name).is_file(), f"{stage}: {name} missing"
        evaluation = json.loads((out / stage / "eval.json").read_text())
        assert set(evaluation["results"]) == {"full", "keep_0.5"}
        assert evaluation["results"]["keep_0.5"]["keep_ratios"] == [0.5, 0.25]  # ratio units by default
        assert evaluation["results"]["full"]["n"] == 8
        assert "versions" in evaluation["environment"]
        info = json.loads((model_dir / "training_info.json").read_text())
        assert info["global_step"] == 2
    assert load_recipe(out / "recipe.yaml") is not None  # the resolved recipe is itself a valid recipe
    printed = capsys.readouterr().out
    assert "lengthdrop  keep_0.5" in printed

    # The stage-2 model really changed the stage-1 weights.
    w1 = load_file(out / "finetune" / "model" / "model.safetensors")
    w2 = load_file(out / "lengthdrop" / "model" / "model.safetensors")
    assert not torch.equal(w1["qa_outputs.weight"], w2["qa_outputs.weight"])

    # Rerun with the same recipe: nothing is retrained.
    before = (out / "lengthdrop" / "model" / "model.safetensors").stat().st_mtime_ns
    assert qt.main([str(path)]) == 0
    assert (out / "lengthdrop" / "model" / "model.safetensors").stat().st_mtime_ns == before


class _KillAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    one_stage = ["train.stages=[finetune]"]
    straight = load_recipe(make_recipe(tmp_path, tiny_checkpoint, steps=4, name="straight"), one_stage)
    qt.run(straight)

    killed_path = make_recipe(tmp_path, tiny_checkpoint, steps=4, name="killed")
    original_init = qt.QalaTrainer.__init__

    def init_with_kill(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(_KillAtStep(2))  # after checkpoint-2 is written

    monkeypatch.setattr(qt.QalaTrainer, "__init__", init_with_kill)
    with pytest.raises(KeyboardInterrupt):
        qt.run(load_recipe(killed_path, one_stage))
    monkeypatch.setattr(qt.QalaTrainer, "__init__", original_init)

    checkpoints = tmp_path / "killed" / "finetune" / "checkpoints"
    assert (checkpoints / "checkpoint-2").is_dir()
    assert (checkpoints / "checkpoint-2" / "qala_elapsed.json").is_file()
    assert not (tmp_path / "killed" / "finetune" / "model").exists()

    # Without --resume the run refuses to overwrite the checkpoints.
    with pytest.raises(RecipeError, match="pass --resume"):
        qt.run(load_recipe(killed_path, one_stage))

    result = qt.run(load_recipe(killed_path, one_stage), resume=True)
    assert result["finetune"]["resumed_from"] == "checkpoint-2"
    assert result["finetune"]["global_step"] == 4
    assert result["finetune"]["wall_seconds"] > 0
    assert_same_weights(tmp_path / "killed" / "finetune", tmp_path / "straight" / "finetune")


def assert_same_weights(stage, reference_stage):
    """The model a stage folder holds equals another's, tensor by tensor (resumed vs uninterrupted runs)."""
    resumed = load_file(stage / "model" / "model.safetensors")
    reference = load_file(reference_stage / "model" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_teacher_must_share_the_vocabulary(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    other = tmp_path / "other-teacher"
    build_tiny_qa_checkpoint(other)
    vocab = (other / "vocab.txt").read_text().splitlines()
    (other / "vocab.txt").write_text("\n".join(vocab[:-5]) + "\n")
    (other / "tokenizer.json").unlink()
    path = make_recipe(tmp_path, tiny_checkpoint)
    with pytest.raises(RecipeError, match="must share the student's vocabulary"):
        qt.run(load_recipe(path, [f"model.teacher={other}", "train.stages=[finetune]"]))


def test_training_with_a_teacher_runs(tmp_path, tiny_checkpoint, monkeypatch):
    """The teacher is the student's own starting checkpoint and kd_alpha=1: the loss is the KD term alone, ~0
    (only dropout tells them apart). A teacher that is ignored leaves the cross-entropy, ~4.8 (ln of ~120
    positions, for start and end)."""
    monkeypatch.chdir(REPO)
    path = make_recipe(tmp_path, tiny_checkpoint)
    result = qt.run(load_recipe(path, [f"model.teacher={tiny_checkpoint}", "train.finetune.kd_alpha=1.0"]))
    assert result["lengthdrop"]["global_step"] == 2
    loss = result["finetune"]["train_metrics"]["train_loss"]
    assert 0 < loss < 0.05, loss


def test_distillation_loss_properties():
    torch.manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    s = (torch.randn(2, 6), torch.randn(2, 6))
    assert distillation_loss(s, s, mask).item() == pytest.approx(0.0, abs=1e-6)
    t = (torch.randn(2, 6), torch.randn(2, 6))
    assert distillation_loss(s, t, mask).item() > 0
    assert distillation_loss(s, t, mask, direction="reverse_kl").item() > 0
    # Padding logits do not matter.
    t_pad = (t[0].clone(), t[1].clone())
    t_pad[0][1, 4:] = 100.0
    torch.testing.assert_close(distillation_loss(s, t, mask), distillation_loss(s, t_pad, mask))


def test_lengthdrop_step_runs_sub_models(tiny_checkpoint, monkeypatch, tmp_path):
    """The sandwich calls the model once in full and 1 + num_sandwich times with a length config."""
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint)
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("length_config"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    recipe = load_recipe(
        make_recipe(tmp_path, tiny_checkpoint),
        ["train.lengthdrop.num_sandwich=2", "data.length_units=absolute"],
    )
    from qala.recipe import make_training_arguments

    trainer = qt.QalaTrainer(
        model=model,
        args=make_training_arguments({"max_steps": 1}, output_dir=str(tmp_path / "o"), seed=1),
        stage=recipe.train.lengthdrop,
        lengthdrop=True,
        padded_units=recipe.data.length_units == "absolute",
    )
    model.train()
    inputs = {
        "input_ids": torch.randint(5, 50, (2, 40)),
        "attention_mask": torch.ones(2, 40, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 40, dtype=torch.long),
        "start_positions": torch.tensor([3, 4]),
        "end_positions": torch.tensor([5, 6]),
    }
    loss = trainer.compute_loss(model, inputs)
    assert loss.requires_grad
    assert calls[0] is None and len(calls) == 4
    smallest = calls[1]
    assert smallest == [32, 26]  # ceil(40 * 0.8), ceil(32 * 0.8)
    for lengths in calls[2:]:
        assert 32 <= lengths[0] <= 40 and lengths[1] <= lengths[0]


def _ragged_batch() -> dict[str, torch.Tensor]:
    """Three labelled windows of 40 slots; the second has 25 real tokens (rows of different real lengths)."""
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    return {
        "input_ids": torch.randint(5, 50, (3, 40)),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(3, 40, dtype=torch.long),
        "start_positions": torch.tensor([3, 4, 5]),
        "end_positions": torch.tensor([5, 6, 7]),
    }


def test_lengthdrop_samples_keep_ratios_per_row(tiny_checkpoint, monkeypatch, tmp_path):
    """Default units: the smallest sub-model as ratios for all rows, then one ratio row per window."""
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint)
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("keep_ratios"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    recipe = load_recipe(make_recipe(tmp_path, tiny_checkpoint), ["train.lengthdrop.num_sandwich=2"])
    from qala.recipe import make_training_arguments

    trainer = qt.QalaTrainer(
        model=model,
        args=make_training_arguments({"max_steps": 1}, output_dir=str(tmp_path / "o"), seed=1),
        stage=recipe.train.lengthdrop,
        lengthdrop=True,
    )
    model.train()
    inputs = _ragged_batch()
    loss = trainer.compute_loss(model, inputs)
    assert loss.requires_grad
    assert calls[0] is None and len(calls) == 4
    assert calls[1] == pytest.approx([0.8, 0.64])  # the sandwich's smallest: the bound at every layer
    for table in calls[2:]:
        assert table.shape == (3, 2)
        assert ((table[:, 0] >= 0.8) & (table[:, 1] <= table[:, 0]) & (table[:, 1] >= 0.64)).all()
    assert not torch.equal(calls[2][0], calls[2][1])  # each row draws its own sub-model


def _lengthdrop_losses(
    tiny_checkpoint, tmp_path, term: str, num_sandwich: int, extra: tuple[str, ...] = ()
) -> dict[float, float]:
    """The LengthDrop loss of one ragged batch with the recipe weight `term` at 0 and at 2, same dropout masks."""
    from qala.recipe import make_training_arguments

    model = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint)
    model.train()
    inputs = _ragged_batch()
    losses = {}
    for weight in (0.0, 2.0):
        recipe = load_recipe(
            make_recipe(tmp_path, tiny_checkpoint),
            [
                f"train.lengthdrop.num_sandwich={num_sandwich}",
                "train.lengthdrop.attention_dropout_prob=0",
                f"train.lengthdrop.{term}={weight}",
                *extra,
            ],
        )
        trainer = qt.QalaTrainer(
            model=model,
            args=make_training_arguments({"max_steps": 1}, output_dir=str(tmp_path / "o"), seed=1),
            stage=recipe.train.lengthdrop,
            lengthdrop=True,
        )
        torch.manual_seed(0)  # the same dropout masks for both weights
        losses[weight] = trainer.compute_loss(model, dict(inputs)).item()
    return losses


def test_hidden_distillation_adds_the_state_error_of_each_sub_model(tiny_checkpoint, tmp_path):
    """hidden_distillation > 0 adds weight x MSE(sub-model's last states, full model's) over the tokens each
    sub-model kept to the last layer; 0 leaves the loss as it was."""
    losses = _lengthdrop_losses(tiny_checkpoint, tmp_path, "hidden_distillation", num_sandwich=1)
    assert losses[2.0] > losses[0.0]
    # The term itself: zero for identical states, the mean over kept tokens only.
    student, teacher = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    kept = torch.tensor([[True, True, False]])
    assert qt.hidden_distillation_loss(teacher, teacher, kept).item() == 0.0
    assert qt.hidden_distillation_loss(student, teacher, kept).item() == pytest.approx((1 + 4) / 2)


def test_selection_distillation_trains_every_layers_ranking_toward_the_full_models_span(tiny_checkpoint, tmp_path):
    """selection_distillation > 0 adds weight x the mean over layers of KL(full model's final span
    distribution || span head on that layer's attention output); its gradient reaches the encoder; 0 leaves
    the loss as it was."""
    losses = _lengthdrop_losses(tiny_checkpoint, tmp_path, "selection_distillation", num_sandwich=0)
    assert losses[2.0] > losses[0.0]
    # No layer left to train (layer indices need every layer run: no LayerDrop).
    past_last = ("train.lengthdrop.selection_distillation_from_layer=99", "train.lengthdrop.layer_dropout_prob=0")
    losses = _lengthdrop_losses(tiny_checkpoint, tmp_path, "selection_distillation", num_sandwich=0, extra=past_last)
    assert losses[2.0] == pytest.approx(losses[0.0])
    # The term itself: the mean of the per-layer KLs, zero when a layer already ranks like the full model.
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint).eval()
    out = model(**_ragged_batch(), output_selection_logits=True)
    assert len(out.selection_logits) == model.num_layers
    mask = _ragged_batch()["attention_mask"].bool()
    target = (out.start_logits, out.end_logits)
    agreeing = torch.stack([out.start_logits, out.end_logits], dim=-1)
    assert qt.selection_distillation_loss((agreeing,), target, mask).item() == pytest.approx(0.0, abs=1e-6)
    per_layer = [qt.distillation_loss((x[..., 0], x[..., 1]), target, mask) for x in out.selection_logits]
    expected = sum(per_layer) / len(per_layer)
    loss = qt.selection_distillation_loss(out.selection_logits, target, mask)
    assert loss.item() == pytest.approx(expected.item())
    model.zero_grad()
    loss.backward()
    assert model.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # selection_distillation_from_layer=k leaves layers before k out: from the last layer, only its KL counts.
    assert qt.selection_distillation_loss(out.selection_logits[-1:], target, mask).item() == pytest.approx(
        per_layer[-1].item()
    )
    assert qt.selection_distillation_loss((), target, mask).item() == 0.0
    with pytest.raises(ValueError, match="full-length"):
        model(**_ragged_batch(), keep_ratios=[0.5] * model.num_layers, output_selection_logits=True)


def _interrupt_after_checkpoint_2(monkeypatch, run):
    """`run()` until checkpoint-2 is written, then stop it there as a kill would."""
    original_init = qt.QalaTrainer.__init__

    def init_with_kill(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(_KillAtStep(2))

    monkeypatch.setattr(qt.QalaTrainer, "__init__", init_with_kill)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(qt.QalaTrainer, "__init__", original_init)


def test_resume_with_a_changed_recipe_is_refused_naming_the_keys_and_forced_on_request(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    path, one = make_recipe(tmp_path, tiny_checkpoint, steps=4), ["train.stages=[finetune]"]
    _interrupt_after_checkpoint_2(monkeypatch, lambda: qt.run(load_recipe(path, one)))
    out = tmp_path / "run"
    recorded = (out / "recipe.yaml").read_text()
    changed = "train.finetune.training_args.learning_rate=1e-4"

    assert qt.main([str(path), "--resume", *one, changed]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2 was started with another recipe or other inputs: pass --force-resume" in err
    assert "changed train.finetune.training_args.learning_rate: 0.001 -> 1e-4" in err
    assert (out / "recipe.yaml").read_text() == recorded  # the refused start relabels nothing
    assert not (out / "finetune" / "model").exists()

    assert qt.main([str(path), "--force-resume", *one, changed]) == 0
    info = qt.read_training_info(out / "finetune")
    assert info["resumed_from"] == "checkpoint-2" and info["global_step"] == 4
    assert info["forced_resume"]["changes"] == ["train.finetune.training_args.learning_rate: 0.001 -> 1e-4"]
    assert info["forced_resume"]["started_with"]["train"]["finetune"]["training_args"]["learning_rate"] == 0.001
    previous = load_recipe(out / "finetune" / "recipe.previous.yaml")
    assert previous.train.finetune.training_args["learning_rate"] == 0.001
    resumed = load_recipe(out / "finetune" / "model" / "recipe.yaml")
    assert resumed.train.finetune.training_args["learning_rate"] == "1e-4"


def test_a_stage_is_trained_again_when_its_source_weights_change_at_the_same_path(
    tmp_path, tiny_checkpoint, monkeypatch, caplog
):
    monkeypatch.chdir(REPO)
    source = Path(shutil.copytree(tiny_checkpoint, tmp_path / "base"))
    path, one = make_recipe(tmp_path, source), ["train.stages=[finetune]"]
    qt.run(load_recipe(path, one))
    stage = tmp_path / "run" / "finetune"
    first = qt.read_training_info(stage)
    assert first["inputs"]["source"] == content_hash(source)
    trained_at = (stage / "model" / "model.safetensors").stat().st_mtime_ns

    build_tiny_qa_checkpoint(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", source / "model.safetensors")  # retrained in place
    with caplog.at_level("INFO", logger="qala.train"):
        qt.run(load_recipe(path, one))
    assert f"inputs.source: {content_hash(tiny_checkpoint)} -> {content_hash(source)}" in caplog.text
    again = qt.read_training_info(stage)
    assert again["inputs"]["source"] == content_hash(source) != first["inputs"]["source"]
    assert (stage / "model" / "model.safetensors").stat().st_mtime_ns != trained_at
    # eval.json is keyed by the stage model's content, so it was scored again too.
    assert json.loads((stage / "eval.json").read_text())["key"]["model"] == content_hash(stage / "model")
