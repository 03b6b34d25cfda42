"""Train a length-adaptive QA model from a recipe.

    python -m qala.train RECIPE.yaml [key.sub=value ...] [~key.sub ...] [--resume | --force-resume]

Runs the stages the recipe lists, in order, each in its own folder under run.output_dir:
  finetune    cross-entropy on start/end (+ distillation from model.teacher if given);
  lengthdrop  LengthDrop with the sandwich rule: per step the full model (task loss, + teacher KD),
              the smallest sub-model and N random sub-models, the sub-models taught in place by the
              full model's logits (Kim & Cho 2021, as used by QuaLA-MiniLM).
A finished stage (its model/ folder written for the same fingerprint: the stage's recipe sections and
the CONTENT of its inputs, i.e. the weights it starts from, the training questions, tokenizer and
teacher) is skipped on rerun; an interrupted one continues from its last checkpoint with --resume,
which refuses checkpoints started with another recipe or other inputs (exit 2, naming what changed)
unless --force-resume (both recipes are then recorded). One run per run.output_dir at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model
from transformers import (
    AutoModelForQuestionAnswering,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainerState,
    set_seed,
)

from qala.cli import recipe_parser, run_main
from qala.data import load_split, windows
from qala.evaluate import evaluate_features
from qala.lengths import constant_config, constant_name, sandwich
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize.artifact import check_finite
from qala.quantize.load import load_tokenizer
from qala.recipe import Recipe, RecipeError, StageConfig, changed_keys, fingerprint, make_training_arguments
from qala.stage import stage_lock, stored_record, write_recipe
from qala.utils import (
    IntegrityError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    content_hash,
    environment_info,
    examples_hash,
    new_file_mode,
    resolve_model_path,
    write_manifest,
)

logger = logging.getLogger(__name__)

TRAINING_INFO = "training_info.json"
EVAL_NAME = "eval.json"
# In a stage's checkpoints folder: the fingerprint, recipe and input hashes its first checkpoint was made with.
STARTED_WITH = "started_with.json"


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities over real positions only: padding carries no probability mass."""
    return F.log_softmax((logits / temperature).masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)


def distillation_loss(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: str = "forward_kl",
) -> torch.Tensor:
    """KL between teacher and student span distributions, averaged over start and end.

    forward_kl = KL(p_teacher || p_student), the usual knowledge-distillation objective (Hinton et al.;
    equal to soft-target cross-entropy up to a constant). Its gradient on the student logits is
    (p_student - p_teacher): every position the teacher believes in pulls the student, even one the
    student currently gives ~0 probability. reverse_kl = KL(p_student || p_teacher), what the issue
    says the LAT reference computes, is mode-seeking: its gradient is weighted by p_student, so a
    sub-model that has put its mass on a wrong span gets almost no signal towards the full model's
    span. We default to forward_kl for that reason; both are selectable per stage in the recipe.
    """
    mask = mask.bool()
    losses = []
    for s, t in zip(student, teacher, strict=True):
        log_p_student = masked_log_softmax(s.float(), mask, temperature)
        log_p_teacher = masked_log_softmax(t.detach().float(), mask, temperature)
        if direction == "forward_kl":
            kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none")
        else:
            kl = F.kl_div(log_p_teacher, log_p_student, log_target=True, reduction="none")
        losses.append(kl.masked_fill(~mask, 0.0).sum(-1).mean())
    # temperature**2 keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    return (losses[0] + losses[1]) / 2 * temperature**2


def hidden_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, reached_last: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a sub-model's last-layer states and the full model's (detached), over the
    tokens that reached the last layer. The dropped ones are left out: their restored state is an earlier
    layer's, and pulling it toward the last layer's would retrain the early layers to skip the later ones."""
    per_token = (student.float() - teacher.detach().float()).pow(2).mean(-1)
    return per_token[reached_last].mean() if bool(reached_last.any()) else per_token.sum() * 0.0


def selection_distillation_loss(
    layer_logits: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Forward KL from the full model's final span distributions to each layer's span-head logits (the scores
    the "span" rule ranks tokens by), averaged over layers. Without it the span head was only ever trained on
    last-layer states, and reading it on a middle layer is a guess; with it each layer learns to rate high the
    tokens the finished model will answer with, which are the ones a dropping layer must keep (the supervised
    skim predictors of Block-Skim and Transkimmer, here with no new parameters, so every engine runs it as is)."""
    if not layer_logits:  # selection_distillation_from_layer past the last layer: nothing to train
        return target[0].float().sum() * 0.0
    losses = [distillation_loss((logits[..., 0], logits[..., 1]), target, mask) for logits in layer_logits]
    return torch.stack(losses).mean()


class StageClock(TrainerCallback):
    """Training wall time that survives a kill: stored in every checkpoint, resumed from the last one.

    QalaTrainer writes it into a checkpoint before the Trainer's own files (see QalaTrainer._save_checkpoint),
    so every complete checkpoint has it."""

    FILE = "qala_elapsed.json"

    def __init__(self, resumed_from: str | None) -> None:
        previous = Path(resumed_from or "") / self.FILE
        self.before = json.loads(previous.read_text())["seconds"] if resumed_from and previous.is_file() else 0.0
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def save(self, folder: Path) -> None:
        atomic_write_json(folder / self.FILE, {"seconds": round(self.seconds, 1)})


class DivergedError(ValueError):
    """A stage whose loss or weights stopped being finite; nothing of it is saved as a model."""


class DivergenceGuard(TrainerCallback):
    """Stops a stage at the first optimizer step that leaves a non-finite weight, or the first logged non-finite
    loss or gradient norm, naming the step and the tensor: a diverged model must never be saved as a result.

    Checked after every step, before the Trainer saves a checkpoint of it: one isfinite pass over the
    weights (a few ms for MiniLM) against a step of hundreds of ms.
    """

    def __init__(self, stage_name: str, checkpoints: Path) -> None:
        self.stage_name, self.checkpoints = stage_name, checkpoints

    def _stop(self, step: int, what: str) -> None:
        raise DivergedError(
            f"train.{self.stage_name} diverged at step {step}: {what}; nothing was saved as a model. Lower "
            f"train.{self.stage_name}.training_args.learning_rate (or check kd_temperature and kd_alpha), then "
            f"delete {self.checkpoints} to start the stage again"
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()] if model else []
        if not params:
            return
        finite = torch.stack([torch.isfinite(p).all() for _, p in params])
        if not bool(finite.all()):
            name, p = params[int((~finite).nonzero()[0])]
            self._stop(state.global_step, f"weight {name} holds {int((~torch.isfinite(p)).sum())} NaN/inf values")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(state.global_step, f"the training {key.replace('_', ' ')} is {value}")


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: without it, a checkpoint is incomplete
CHECKPOINT_WEIGHTS = "model.safetensors"  # the model's weights in a checkpoint (the Trainer's name)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint in `folder` that the Trainer finished writing, or None.

    A checkpoint without a readable trainer_state.json was cut off while being written (a kill): that is
    said in one line, it is removed, and the one before it is used. One that has it but whose weights,
    optimizer, scheduler or RNG file does not read back whole was damaged afterwards: IntegrityError naming
    the file (resuming from it would end in a traceback).
    """
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), path) for path in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(path.name))),
        reverse=True,
    )
    for _, path in found:
        if not path.is_dir():
            continue
        try:
            json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError) as e:
            reason = f"no {TRAINER_STATE}" if isinstance(e, FileNotFoundError) else f"{TRAINER_STATE} unreadable"
            logger.warning(
                "%s is incomplete (%s: the run was stopped while writing it): removed, not resumed from",
                path,
                reason,
            )
            shutil.rmtree(path, ignore_errors=True)
            continue
        _check_checkpoint_files(path)
        return str(path)
    return None


def _trained_every_step(checkpoint: str | Path, args) -> bool:
    """Whether `checkpoint` holds the stage's weights after its last step (global_step reached max_steps)."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    max_steps = args.max_steps if args.max_steps > 0 else state.get("max_steps", 0)
    return 0 < max_steps <= state["global_step"] and (Path(checkpoint) / CHECKPOINT_WEIGHTS).is_file()


def _check_checkpoint_files(path: Path) -> None:
    """IntegrityError naming the first file of a checkpoint that does not read back whole: safetensors whose
    data ends before its header says, torch files (optimizer, scheduler, RNG) whose zip is cut or fails its CRC."""
    hint = f"the checkpoint cannot be resumed from; delete {path} to resume from the one before it"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with file.open("rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if file.stat().st_size < 8 + size + end:
                    raise ValueError(f"{file.stat().st_size} bytes, its header needs {8 + size + end}")
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"{bad} fails its CRC check")
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
            raise IntegrityError(f"{file}: damaged ({e}); {hint}") from None


class QalaTrainer(Trainer):
    """transformers' Trainer with two changes: the loss (KD and the LengthDrop sandwich), and a train_loss that
    is the same however often the stage was killed and resumed (`stage_train_loss`).

    The Trainer's own train_loss is the mean over the steps run since the last (re)start: a resumed run reports
    the mean of its last steps only (issue 20, item 9). QalaTrainer sums every step's loss in step order in
    float64, stores the running sum in each checkpoint (LOSS_FILE, written before the Trainer's files so a
    complete checkpoint always has it) and continues it on resume: the same additions in the same order,
    hence bit for bit the uninterrupted run's figure.
    """

    LOSS_FILE = "qala_train_loss.json"

    def __init__(
        self,
        *args,
        stage: StageConfig,
        lengthdrop: bool,
        teacher: torch.nn.Module | None = None,
        padded_units: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.lengthdrop = lengthdrop
        self.padded_units = padded_units  # data.length_units: absolute (LAT's LengthDrop on padded positions)
        self.teacher = teacher.to(self.args.device).eval() if teacher is not None else None
        # The loss of each optimizer step from `_loss_first_step` on, summed in step order (see the class doc).
        self._loss_sum, self._loss_first_step, self._pending_losses = 0.0, 0, []

    def resume_train_loss(self, checkpoint: str | Path) -> None:
        """Continue the loss sum of `checkpoint`; one written before qala recorded it covers the steps after it."""
        path = Path(checkpoint) / self.LOSS_FILE
        step = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["global_step"]
        if path.is_file():
            record = json.loads(path.read_text())
            self._loss_sum, self._loss_first_step = float(record["loss_sum"]), int(record["first_step"])
        else:
            logger.warning("%s has no %s: train_loss covers the steps after it only", checkpoint, self.LOSS_FILE)
            self._loss_sum, self._loss_first_step = 0.0, step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Kept on the device and read back only at checkpoints and the end: no host sync per step.
        self._pending_losses.append(loss.detach())
        return loss

    def _fold_losses(self) -> None:
        if self._pending_losses:
            for value in torch.stack(self._pending_losses).tolist():  # in step order: a resumed sum continues
                self._loss_sum += value
            self._pending_losses = []

    def stage_train_loss(self) -> float:
        """The mean training loss per optimizer step over the whole stage, resumes included (the Trainer's
        train_loss covers the steps since the last start). This process's losses only: in a distributed run
        _train_stage keeps the Trainer's figure, which averages the processes' losses at each log."""
        self._fold_losses()
        steps = self.state.global_step - self._loss_first_step
        return self._loss_sum / steps if steps > 0 else 0.0

    def _save_checkpoint(self, model, trial) -> None:
        # qala's own records first: the Trainer writes trainer_state.json last, and a checkpoint without it is
        # treated as incomplete (last_complete_checkpoint), so a complete one always has these too.
        self._fold_losses()
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            record = {"global_step": self.state.global_step, "first_step": self._loss_first_step}
            atomic_write_json(folder / self.LOSS_FILE, {**record, "loss_sum": self._loss_sum})
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, StageClock):
                    callback.save(folder)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # transformers writes the weights 0600: the umask's permissions, as a model's
            for file in folder.glob("*.safetensors"):
                os.chmod(file, new_file_mode())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = {k: inputs.pop(k) for k in ("start_positions", "end_positions")}
        hidden_weight = self.stage.hidden_distillation if self.lengthdrop and model.training else 0.0
        selection_weight = self.stage.selection_distillation if self.lengthdrop and model.training else 0.0
        full = model(
            **inputs, **labels, output_hidden_states=hidden_weight > 0, output_selection_logits=selection_weight > 0
        )
        loss = full.loss
        mask = inputs["attention_mask"].bool()
        if self.teacher is not None:
            with torch.no_grad():
                taught = self.teacher(**inputs)
            kd = distillation_loss(
                (full.start_logits, full.end_logits),
                (taught.start_logits, taught.end_logits),
                mask,
                temperature=self.stage.kd_temperature,
            )
            loss = self.stage.kd_alpha * kd + (1 - self.stage.kd_alpha) * loss

        if self.lengthdrop and model.training:
            unwrapped = self.accelerator.unwrap_model(model)
            seq_length, num_layers = inputs["input_ids"].size(1), unwrapped.num_layers
            bound = self.stage.length_drop_ratio_bound
            # Seeded by (seed, step): a resumed run draws the same sub-models it would have drawn.
            rng = random.Random(self.args.seed * 1_000_003 + self.state.global_step)
            sub_configs = sandwich(
                num_layers,
                self.stage.length_drop_layer_bounds or bound,
                self.stage.num_sandwich,
                rng,
                batch_size=inputs["input_ids"].size(0),
                padded_length=seq_length if self.padded_units else None,
                margin_draws=self.stage.margin_draws,
                margin_range=self.stage.margin_range,
            )
            target = (full.start_logits, full.end_logits)
            if selection_weight > 0:
                layer_logits = full.selection_logits[self.stage.selection_distillation_from_layer :]
                loss = loss + selection_weight * selection_distillation_loss(layer_logits, target, mask)
            for sub_config in sub_configs:
                sub = model(**inputs, **sub_config, output_hidden_states=hidden_weight > 0)
                loss = loss + distillation_loss(
                    (sub.start_logits, sub.end_logits), target, mask, direction=self.stage.inplace_distillation
                )
                if hidden_weight > 0:
                    loss = loss + hidden_weight * hidden_distillation_loss(
                        sub.hidden_states[-1], full.hidden_states[-1], sub.reached_last
                    )
        return (loss, full) if return_outputs else loss


def _use_fused_attention(model: LengthAdaptiveForQuestionAnswering, attention_dropout_prob: float | None) -> None:
    """Train with SDPA attention when no dropout falls on the attention probabilities.

    SDPA's CPU flash kernel has no dropout (with p > 0 it falls back to the unfused math path), and
    eager attention with dropout measured 6.7x slower per layer than SDPA without (forward + backward,
    batch 32 x 184 tokens, 2 threads). Token selection then recomputes the probabilities it needs
    without gradient (model.recompute_attention_probs). Saved models load with eager attention again.
    """
    if attention_dropout_prob is None:
        return
    model.config.attention_probs_dropout_prob = attention_dropout_prob
    for layer in model.backbone.encoder.layer:
        layer.attention.self.dropout.p = attention_dropout_prob
    if attention_dropout_prob == 0.0:
        model.backbone.set_attn_implementation("sdpa")


def load_teacher(recipe: Recipe, tokenizer) -> torch.nn.Module | None:
    """The teacher must tokenize exactly like the student: KD compares logits position by position."""
    if not recipe.model.teacher:
        return None
    path = resolve_model_path(recipe.model.teacher)
    teacher_tokenizer = load_tokenizer(path)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab() or type(teacher_tokenizer) is not type(tokenizer):
        raise RecipeError(
            "model.teacher",
            [
                f"{recipe.model.teacher}: its tokenizer differs from the student's; distillation compares "
                "span logits token by token, so the teacher must share the student's vocabulary and tokenizer "
                "(e.g. a BERT-base-uncased SQuAD teacher for an uncased BERT-vocabulary MiniLM)"
            ],
        )
    return AutoModelForQuestionAnswering.from_pretrained(path)


def stage_fingerprint(recipe: Recipe, stage_name: str, inputs: dict[str, str]) -> str:
    """What a trained stage depends on: its recipe sections and the content hashes of its inputs."""
    return fingerprint(
        {"recipe": recipe.fingerprint("run.seed", "data", "model", f"train.{stage_name}"), "inputs": inputs}
    )


def stage_changes(recorded: dict[str, Any], recipe: Recipe, stage_name: str, inputs: dict[str, str]) -> list[str]:
    """`key: old -> new` for each recipe key and input of a stage that differs from a record of an earlier
    start ({"recipe": to_dict(), "inputs": {...}})."""
    if not isinstance(recorded.get("recipe"), dict):
        return ["(no record of the recipe it was started with)"]

    def sections(data: dict[str, Any]) -> dict[str, Any]:
        train = data.get("train") or {}
        return {
            "run": {"seed": (data.get("run") or {}).get("seed")},
            "data": data.get("data"),
            "model": data.get("model"),
            "train": {stage_name: train.get(stage_name)},
        }

    return changed_keys(sections(recorded["recipe"]), sections(recipe.to_dict())) + changed_keys(
        recorded.get("inputs") or {}, inputs, "inputs"
    )


def run(recipe: Recipe, *, resume: bool = False, force_resume: bool = False) -> dict[str, Any]:
    """Run every stage of the recipe; returns {stage: {training info and evaluation}}.

    Holds run.output_dir's lock throughout (on the main process of a distributed run).
    `force_resume` continues checkpoints started with another recipe or other inputs.
    """
    with stage_lock(recipe.run.output_dir):
        return _run_stages(recipe, resume=resume or force_resume, force=force_resume)


def _run_stages(recipe: Recipe, *, resume: bool, force: bool) -> dict[str, Any]:
    out = Path(recipe.run.output_dir)
    set_seed(recipe.run.seed)

    d = recipe.data
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.tokenizer or recipe.model.name_or_path))
    train_examples, eval_examples = load_split(d, "train"), load_split(d, "eval")
    train_features = windows(train_examples, tokenizer, d, train=True)
    eval_features = windows(eval_examples, tokenizer, d, train=False, padded=d.length_units == "absolute")
    teacher = load_teacher(recipe, tokenizer)
    logger.info(
        "train: %d questions -> %d features; eval: %d questions",
        len(train_examples),
        len(train_features),
        len(eval_examples),
    )
    # Stages are keyed by content, not paths: weights or data replaced at the same path are new inputs.
    # (A tokenizer from the model's own folder is part of the first stage's source, and saved into each stage's.)
    shared = {"train_data": examples_hash(train_examples)}
    for key in ("tokenizer", "teacher"):
        if getattr(recipe.model, key):
            shared[key] = content_hash(getattr(recipe.model, key))
    eval_data = examples_hash(eval_examples)

    results: dict[str, Any] = {}
    source = resolve_model_path(recipe.model.name_or_path)
    source_hash = content_hash(source)
    for stage_name in recipe.train.stages:
        stage: StageConfig = getattr(recipe.train, stage_name)
        stage_dir = out / stage_name
        inputs = {"source": source_hash, **shared}
        fingerprint = stage_fingerprint(recipe, stage_name, inputs)
        info = _finished(stage_dir, fingerprint, recipe, inputs)
        if info is not None:
            logger.info("%s: already trained for this recipe (%s), skipping", stage_name, stage_dir / "model")
        else:
            info = _train_stage(
                recipe,
                stage_name,
                stage,
                source,
                stage_dir,
                fingerprint,
                inputs,
                tokenizer=tokenizer,
                train_features=train_features,
                teacher=teacher,
                resume=resume,
                force=force,
            )
        source, source_hash = str(stage_dir / "model"), content_hash(stage_dir / "model")
        info["eval"] = _evaluate_stage(recipe, stage_dir, source_hash, eval_data, eval_examples, eval_features)
        results[stage_name] = info
    write_recipe(out, recipe)  # also written when a stage starts training
    return results


def _finished(stage_dir: Path, fingerprint: str, recipe: Recipe, inputs: dict[str, str]) -> dict[str, Any] | None:
    """The training_info.json of the stage's model when it was trained for this fingerprint, else None."""

    def changes(info: dict[str, Any]) -> list[str]:  # the fingerprint covers recipe sections: name those too
        recorded = {"inputs": info.get("inputs")}
        with contextlib.suppress(OSError, yaml.YAMLError):
            recorded["recipe"] = yaml.safe_load((stage_dir / "model" / "recipe.yaml").read_text())
        return stage_changes(recorded, recipe, stage_dir.name, inputs)

    info, why = stored_record(stage_dir / "model" / TRAINING_INFO, inputs, fingerprint=fingerprint, changes=changes)
    if why is not None:
        logger.warning("%s was trained from another recipe or inputs (%s): training it again", stage_dir, why)
    return info


def _train_stage(
    recipe: Recipe,
    stage_name: str,
    stage: StageConfig,
    source: str,
    stage_dir: Path,
    fingerprint: str,
    inputs: dict[str, str],
    *,
    tokenizer,
    train_features,
    teacher,
    resume: bool,
    force: bool = False,
) -> dict[str, Any]:
    checkpoints = stage_dir / "checkpoints"
    last, forced = _resume_point(recipe, stage_name, stage_dir, fingerprint, inputs, resume=resume, force=force)
    # The stage starts for real (inputs loaded, resume checked): only now are the run's and stage's records replaced.
    write_recipe(stage_dir, recipe)
    write_recipe(stage_dir.parent, recipe)

    model, saved_attention_dropout = _stage_start_model(recipe, stage, source)
    args = make_training_arguments(stage.training_args, output_dir=str(checkpoints), seed=recipe.run.seed)
    trainer = QalaTrainer(
        model=model,
        args=args,
        train_dataset=train_features,
        # Dynamic padding: SQuAD windows average far below 384 tokens, so padding each batch only
        # to its longest row roughly halves training compute.
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        processing_class=tokenizer,
        stage=stage,
        lengthdrop=stage_name == "lengthdrop",
        teacher=teacher,
        padded_units=recipe.data.length_units == "absolute",
    )
    clock = StageClock(last if resume else None)
    trainer.add_callback(clock)
    trainer.add_callback(DivergenceGuard(stage_name, checkpoints))
    if resume and last:
        trainer.resume_train_loss(last)
    if resume and last and _trained_every_step(last, args):
        # Stopped after its last checkpoint, before its model was saved. From there Trainer.train would run one
        # step past max_steps (transformers 5.24 checks the end after a step, and a resumed epoch with batches
        # left has one more), changing the weights unless the learning rate has decayed to 0: the checkpoint's
        # weights are the stage's.
        load_model(model, Path(last) / CHECKPOINT_WEIGHTS, device=str(args.device))
        trainer.state = TrainerState.load_from_json(str(Path(last) / TRAINER_STATE))
        metrics = {"epoch": trainer.state.epoch}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=last if resume and last else None).metrics)
    try:  # also what no step checked (a stage of zero steps from a diverged checkpoint)
        check_finite(model.state_dict(), f"train.{stage_name}")
    except IntegrityError as e:
        raise DivergedError(f"{e}; nothing was saved as a model") from None

    if args.world_size == 1 or "train_loss" not in metrics:  # see stage_train_loss: else the Trainer's figure
        metrics["train_loss"] = trainer.stage_train_loss()  # every step of the stage, not those since a resume
    info = {
        "stage": stage_name,
        "fingerprint": fingerprint,
        "inputs": inputs,  # content hashes of the weights it started from, the questions, tokenizer, teacher
        "source": source,
        "wall_seconds": round(clock.seconds, 1),  # summed over interrupted runs
        "resumed_from": Path(last).name if resume and last else None,
        "train_metrics": metrics,
        "global_step": trainer.state.global_step,
        "num_train_features": len(train_features),
        "environment": environment_info(),
    }
    if forced is not None:  # what changed between the checkpoints' recipe and this one, and that recipe
        info["forced_resume"] = forced
    if trainer.is_world_process_zero():
        model.qala_config.layer_dropout_prob = 0.0  # LayerDrop is a training-time regulariser only
        model.config.attention_probs_dropout_prob = saved_attention_dropout  # the model's own, for later stages
        _save_stage_model(model, tokenizer, recipe, info, stage_dir / "model")
    return info


def _stage_start_model(
    recipe: Recipe, stage: StageConfig, source: str
) -> tuple[LengthAdaptiveForQuestionAnswering, float]:
    """The model a stage trains, set up with the stage's LayerDrop, selection rule and attention kernel,
    and the model's own attention dropout (restored before the stage saves it)."""
    set_seed(recipe.run.seed)  # the new QA head (if any) is initialised reproducibly
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(source, max_seq_length=recipe.data.max_seq_length)
    model.qala_config.length_config = None
    model.qala_config.layer_dropout_prob = stage.layer_dropout_prob
    if stage.selection is not None:
        model.qala_config.selection = stage.selection
    saved_attention_dropout = model.config.attention_probs_dropout_prob
    _use_fused_attention(model, stage.attention_dropout_prob)
    return model, saved_attention_dropout


def _save_stage_model(model, tokenizer, recipe: Recipe, info: dict[str, Any], folder: Path) -> None:
    """The stage's model folder: weights, tokenizer, recipe, training_info.json and the manifest over them.
    Built aside and swapped in whole: a kill while saving leaves no half model that looks finished."""
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
        atomic_write_json(tmp / TRAINING_INFO, info)
        # Last: SHA-256 of every file above, checked by qala.quantize.load.load_model on every load.
        write_manifest(tmp, format="qala-fp32")


def _resume_point(
    recipe: Recipe,
    stage_name: str,
    stage_dir: Path,
    fingerprint: str,
    inputs: dict[str, str],
    *,
    resume: bool,
    force: bool,
) -> tuple[str | None, dict[str, Any] | None]:
    """(the checkpoint to continue from or None, what --force-resume overrode or None). Refuses unfinished
    checkpoints without --resume, and checkpoints of another recipe or inputs without --force-resume; removes
    those of a finished model this run replaces; records what a fresh start started with."""
    checkpoints = stage_dir / "checkpoints"
    last = last_complete_checkpoint(checkpoints)
    path = checkpoints / STARTED_WITH
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    done = stage_dir / "model" / TRAINING_INFO
    if last and done.is_file() and json.loads(done.read_text()).get("fingerprint") == recorded.get("fingerprint"):
        # The checkpoints of the finished model that this run replaces (_finished said why), not an unfinished run.
        logger.info("%s: removing the checkpoints of the model trained for other inputs", checkpoints)
        shutil.rmtree(checkpoints)
        last, recorded = None, {}
    if last and not resume:
        raise RecipeError(
            str(stage_dir),
            [
                f"checkpoints of an unfinished run exist in {checkpoints}: pass --resume to continue from "
                f"{Path(last).name}, or delete that folder to start again"
            ],
        )
    forced = None
    if last:
        if recorded.get("fingerprint") != fingerprint:
            # Continuing would train a mix of two recipes and label it with the new one: only on request.
            changes = stage_changes(recorded, recipe, stage_name, inputs)
            if not force:
                raise RecipeError(
                    str(checkpoints),
                    [
                        f"{Path(last).name} was started with another recipe or other inputs: pass --force-resume "
                        "to continue it anyway (both recipes are recorded), or delete this folder to start again",
                        *(f"changed {change}" for change in changes),
                    ],
                )
            logger.warning("--force-resume: %s continues %s despite: %s", stage_name, last, "; ".join(changes))
            forced = {"changes": changes, "started_with": recorded.get("recipe")}
            if recorded.get("recipe"):
                previous = yaml.safe_dump(recorded["recipe"], sort_keys=False)
                atomic_write_text(stage_dir / "recipe.previous.yaml", previous)
        logger.info("resuming %s from %s", stage_name, last)
    else:
        atomic_write_json(path, {"fingerprint": fingerprint, "recipe": recipe.to_dict(), "inputs": inputs})
    return last, forced


def _evaluate_stage(
    recipe: Recipe, stage_dir: Path, model_hash: str, eval_data: str, eval_examples, eval_features
) -> dict[str, Any]:
    """EM/F1 at full length and at each constant keep ratio; cached in eval.json, keyed by the content of the
    stage's model and of the evaluation questions (`model_hash`, `eval_data`) and the eval settings."""
    e = recipe.eval
    path = stage_dir / EVAL_NAME
    key = {"model": model_hash, "eval_data": eval_data, "eval": recipe.fingerprint("eval", "data")}
    cached, why = stored_record(path, key, field="key")
    if cached is not None:
        return cached
    if why is not None:
        logger.info("%s: scored for other inputs (%s), scoring again", path, why)
    # On the device the stage trained on (the Trainer's choice: a GPU when there is one), not always
    # the CPU: a whole-dev pass per length configuration took 46 s on 16 CPU cores, ~1 s on an H100.
    stage = getattr(recipe.train, stage_dir.name)
    device = make_training_arguments(stage.training_args, output_dir=str(stage_dir / "checkpoints"), seed=0).device
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(stage_dir / "model").to(device)
    configs: dict[str, dict[str, list]] = {"full": {}}
    padded = recipe.data.max_seq_length if recipe.data.length_units == "absolute" else None
    for ratio in e.keep_ratios:
        configs[constant_name(ratio, padded is not None)] = constant_config(ratio, model.num_layers, padded)
    rows = {}
    for name, config in configs.items():
        metrics, _ = evaluate_features(
            model,
            eval_examples,
            eval_features,
            **config,
            **e.evaluate_kwargs(),
        )
        logger.info("%s %s: EM %.2f F1 %.2f (%s)", stage_dir.name, name, metrics["exact_match"], metrics["f1"], config)
        rows[name] = metrics
    result = {"key": key, "data": recipe.data.eval, "results": rows, "environment": environment_info()}
    atomic_write_json(path, result)
    return result


def read_eval(path: str | Path) -> dict[str, Any]:
    """An eval.json that run() wrote (the file or its stage folder): {"data": the evaluation file,
    "results": configuration name ("full", "keep_0.8", "padded_keep_0.8", ...) -> {"exact_match", "f1", "n",
    "length_config", "keep_ratios", "seconds"}}. Readers (qala.bench, benchmarks/) call this rather than opening
    the file themselves."""
    path = Path(path)
    path = path / EVAL_NAME if path.is_dir() else path
    document = json.loads(path.read_text())
    if not isinstance(document.get("results"), dict):
        raise ValueError(f"{path} is not an eval.json of qala.train: no 'results' table")
    return {"data": document.get("data"), "results": document["results"]}


def read_training_info(path: str | Path) -> dict[str, Any]:
    """training_info.json of a trained stage (the stage folder, its model/ folder or the file): "stage",
    "wall_seconds", "global_step", "num_train_features", "train_metrics", "resumed_from", "environment"."""
    path = Path(path)
    for candidate in (path / "model" / TRAINING_INFO, path / TRAINING_INFO, path):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"{path}: no {TRAINING_INFO} (a stage folder written by python -m qala.train)")


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser("python -m qala.train", __doc__, "YAML recipe, e.g. recipes/squad_offline.yaml")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    parser.add_argument(
        "--force-resume",
        action="store_true",
        help="--resume even when the recipe or inputs changed since the checkpoints were started; the old recipe "
        "is kept as STAGE/recipe.previous.yaml and in training_info.json",
    )

    def body(args, recipe: Recipe) -> int:
        return _report(run(recipe, resume=args.resume, force_resume=args.force_resume))

    # Intermixed: `RECIPE --resume key=value` works as well as `--resume RECIPE key=value`.
    return run_main(parser, argv, body, intermixed=True)


def _report(results: dict[str, Any]) -> int:
    for stage, info in results.items():
        for name, m in info["eval"]["results"].items():
            print(f"{stage:>10} {name:>9}: EM {m['exact_match']:6.2f}  F1 {m['f1']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
