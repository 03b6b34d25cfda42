"""INT8 quantization of a trained length-adaptive model, driven by the recipe's `quantization` section.

    python -m qala.tune RECIPE.yaml [key.sub=value ...]

approach static   post-training static INT8 (INC 3.x StaticQuantConfig, PT2E + X86InductorQuantizer),
                  calibrated on the TRAINING file; with tuning enabled, Intel Neural Compressor's
                  TuningConfig expands the recipe's config_set into trials and stops at the first
                  one within tolerable_loss (relative F1) of the fp32 model, or after max_trials.
approach dynamic  INC DynamicQuantConfig (activation scales computed per call); tuned the same way.
approach qat      quantization-aware training (torchao prepare_qat_pt2e, the same X86 quantizer),
                  trained with the LengthDrop sandwich so the INT8 model stays length-adaptive.
The quantizer is chosen by the recipe's quantization.backend, by name (QUANTIZERS): "pt2e" is the one
above; an optional backend lives in its own module, imported only when a recipe names it.

Writes OUTPUT_DIR/model (the INT8 artifact), OUTPUT_DIR/trials/trial-N.json (one per trial; a rerun
skips trials already scored for the same inputs), OUTPUT_DIR/fp32_eval_cache.json (the fp32 model's
scores) and OUTPUT_DIR/report.json (every trial's config, F1 and latency, the chosen one, and F1/EM +
latency of fp32 and INT8 at full length and each eval_keep_ratio). Trials and fp32 scores are reused
only for the same inputs BY CONTENT (model files, evaluation questions, calibration batches, the
settings that shape them): a model retrained or a data file replaced at the same path is scored again.
One run per OUTPUT_DIR at a time.
Exit status 0 when the goal is met, 3 when no trial met it (the best model found is still saved). Against
an fp32 F1 of 0 (an untrained model) the goal cannot be judged: report.json says goal_met null, a warning
says why, exit 0.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import DataCollatorWithPadding

from qala.cli import recipe_parser, run_main
from qala.data import load_split, question_subset, windows
from qala.evaluate import evaluate_features
from qala.lengths import config_json, config_kwargs, constant_config, constant_name, sample_length_config
from qala.model import batch_inputs
from qala.quantize import CompiledQA, convert_qat_, prepare_qat_, quantize_, save_quantized
from qala.quantize.load import load_model, load_tokenizer
from qala.recipe import QuantizationConfig, Recipe, RecipeError, make_training_arguments
from qala.stage import stage_inputs, stage_lock, stored_record, write_recipe
from qala.utils import (
    BackendUnavailableError,
    atomic_write_json,
    content_hash,
    environment_info,
    examples_hash,
    median_latency_ms,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

EXIT_GOAL_NOT_MET = 3
FP32_CACHE_NAME = "fp32_eval_cache.json"
# quantization.backend -> the module that quantizes for it, imported only when a recipe names it (an optional
# backend's library may need an environment of its own). Each has check_recipe(recipe), run before model and
# data load; quantize_and_score(tuner, out) -> (report, exit status), which writes OUTPUT_DIR/report.json; and
# ARTIFACT_NAME, the summary's name for what it saved. "pt2e" is this module.
QUANTIZERS = {"pt2e": __name__, "ipex": "qala.quantize.ipex"}
ARTIFACT_NAME = "INT8 artifact"


def calibration_batches(recipe: Recipe, tokenizer, num_layers: int) -> list[dict[str, Any]]:
    """Calibration inputs from the training file, padded to max_seq_length like deployment inputs.

    With length_configs=mixed, two batches in three carry a LengthDrop-sampled length configuration.
    """
    q, d = recipe.quantization, recipe.data
    examples = load_split(d, "train")
    # Shuffled with the run seed: the first windows of a file all come from one article.
    order = list(range(len(examples)))
    random.Random(recipe.run.seed).shuffle(order)
    features = windows(examples.select(order[: q.calibration.samples]), tokenizer, d, train=False)
    features = features.select(range(min(q.calibration.samples, len(features))))
    rng = random.Random(recipe.run.seed)
    bound = q.calibration.length_drop_ratio_bound
    batches = []
    for i in range(0, len(features), q.calibration.batch_size):
        rows = features[i : i + q.calibration.batch_size]
        batch: dict[str, Any] = batch_inputs(rows)
        mixed = q.calibration.length_configs == "mixed" and len(batches) % 3 != 0
        batch["length_config"] = sample_length_config(d.max_seq_length, num_layers, bound, rng) if mixed else None
        batches.append(batch)
    return batches


def batches_hash(batches: list[dict[str, Any]]) -> str:
    """SHA-256 (16 hex digits) of calibration batches: token ids, masks and length configurations."""
    digest = hashlib.sha256()
    for batch in batches:
        for name, value in sorted(batch.items()):
            if isinstance(value, torch.Tensor):
                digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode() + value.cpu().numpy().tobytes())
            else:
                digest.update(f"{name}{json.dumps(value)}".encode())
    return digest.hexdigest()[:16]


# The INC local-config name that stands for the word-embedding table: a local config with int8 weights
# and fp32 activations is INC's own way of saying "weight-only int8 for this op".
EMBEDDINGS_LOCAL_NAME = "word_embeddings"
_QALA_KEYS = ("fp32_units", "int8_embeddings", "fp32_unit_weights")


def inc_config(approach: str, entry: dict[str, Any]):
    """One recipe config_set entry -> an INC config.

    `fp32_units` become INC local (per-name) fp32 configs; `int8_embeddings: true` a weight-only int8
    local config for the word-embedding table (qala.quantize.embedding), so both survive INC's
    expansion of list values into trials. `fp32_unit_weights: int8` stores the fp32 units' weights
    int8 (weight-only: their local configs get int8 weights and fp32 activations).
    """
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig

    cls = {"static": StaticQuantConfig, "dynamic": DynamicQuantConfig}[approach]
    params = {k: v for k, v in entry.items() if k not in _QALA_KEYS}
    # INC's configs accept unknown keyword arguments silently; a typo must not become a default trial.
    known = set(cls().params_list) - {"white_list", "model_info"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise RecipeError(
            "quantization.tuning.config_set",
            [f"{entry}: {unknown} are not fields of INC {cls.__name__}; expected some of {sorted(known)}"],
        )
    if entry.get("fp32_unit_weights", "fp32") not in ("fp32", "int8"):
        raise RecipeError(
            "quantization.tuning.config_set", [f"{entry}: fp32_unit_weights must be fp32 or int8 (not a list)"]
        )
    if not isinstance(entry.get("int8_embeddings", False), bool):
        raise RecipeError(
            "quantization.tuning.config_set", [f"{entry}: int8_embeddings must be true or false (not a list)"]
        )
    config = cls(**params)
    unit_weights = entry.get("fp32_unit_weights", "fp32")
    for pattern in entry.get("fp32_units", []):
        config.set_local(pattern, cls(w_dtype=unit_weights, act_dtype="fp32"))
    if entry.get("int8_embeddings", False):
        config.set_local(EMBEDDINGS_LOCAL_NAME, cls(w_dtype="int8", act_dtype="fp32"))
    return config


def fp32_units_of(config) -> list[str]:
    """Unit patterns whose activations stay fp32 (weights fp32, or int8 weight-only)."""
    locals_ = getattr(config, "local_config", None) or {}
    return [name for name, local in locals_.items() if local.act_dtype == "fp32" and name != EMBEDDINGS_LOCAL_NAME]


def fp32_unit_weights_of(config) -> str:
    locals_ = getattr(config, "local_config", None) or {}
    int8 = [n for n in fp32_units_of(config) if locals_[n].w_dtype == "int8"]
    return "int8" if int8 else "fp32"


def int8_embeddings_of(config) -> bool:
    local = (getattr(config, "local_config", None) or {}).get(EMBEDDINGS_LOCAL_NAME)
    return local is not None and local.w_dtype == "int8"


def describe(config) -> dict[str, Any]:
    """The settings that distinguish trials, for the report."""
    keys = ("w_dtype", "w_sym", "w_granularity", "w_algo", "act_dtype", "act_sym", "act_granularity", "act_algo")
    return {
        "type": type(config).__name__,
        **{k: getattr(config, k) for k in keys if hasattr(config, k)},
        "fp32_units": fp32_units_of(config),
        "int8_embeddings": int8_embeddings_of(config),
        "fp32_unit_weights": fp32_unit_weights_of(config),
    }


class Tuner:
    """Quantize, score and time; one object so trials share the fp32 model, data and eval features."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        q: QuantizationConfig = recipe.quantization
        self.q = q
        self.out = Path(q.output_dir)
        model_dir = resolve_model_path(q.model)
        # In the output folder (never the model's: a shared reference model's folder is read-only).
        self.fp32_cache = self.out / FP32_CACHE_NAME
        self.fp32 = load_model(model_dir, expect="fp32")  # an INT8 artifact here is refused, with what to do
        self.tokenizer = load_tokenizer(model_dir)
        d = recipe.data
        examples = load_split(d, "eval")
        self.examples = examples
        self.features = windows(examples, self.tokenizer, d, train=False)
        self.tune_examples, self.tune_features = question_subset(
            examples, self.features, q.tuning.eval_samples, recipe.run.seed
        )
        self.calibration = calibration_batches(recipe, self.tokenizer, self.fp32.num_layers)
        # What the fp32 scores and the trials depend on, by content (hashed once per run); stored with each.
        self.fp32_inputs = stage_inputs(
            {
                "model": content_hash(model_dir),
                "eval_data": examples_hash(examples),
                "data": {"max_seq_length": d.max_seq_length, "doc_stride": d.doc_stride},
                "run": {"seed": recipe.run.seed},  # picks the tuning subset
                "eval": {"batch_size": recipe.eval.batch_size},
                "quantization": {"tuning": {"eval_samples": q.tuning.eval_samples}},
            }
        )
        self.inputs = stage_inputs(
            {
                **self.fp32_inputs,
                "calibration_batches": batches_hash(self.calibration),
                "quantization": {
                    "approach": q.approach,
                    "calibration": dataclasses.asdict(q.calibration),
                    "eval_length_config": q.eval_length_config,
                    "tuning": {"eval_samples": q.tuning.eval_samples},
                },
            }
        )
        self.fp32_scores = self._cached_fp32_scores()

    def _cached_fp32_scores(self) -> dict[str, Any]:
        cached, why = stored_record(self.fp32_cache, self.fp32_inputs)
        if why is not None:
            logger.info("%s: fp32 scores of other inputs (%s): scoring again", self.fp32_cache, why)
        return cached["scores"] if cached is not None else {}

    def _drop_stale_trials(self, trials_dir: Path) -> None:
        """Delete trial records scored for other inputs (another model, data or calibration), saying why once."""
        stale = {}
        for path in sorted(trials_dir.glob("trial-*.json")):
            _, why = stored_record(path, self.inputs)
            if why is not None:
                stale[path] = why
        if stale:
            why = next(iter(stale.values()))
            logger.info("%s: %d trials scored for other inputs (%s): scoring again", trials_dir, len(stale), why)
            for path in stale:
                path.unlink()

    # -- scoring

    def f1(self, model, length_config=None, *, full: bool = False, keep_ratios=None) -> dict[str, Any]:
        examples, features = (self.examples, self.features) if full else (self.tune_examples, self.tune_features)
        # The fp32 model's scores do not change between runs on the same inputs (self.fp32_inputs): cached.
        cache_key = None
        if model is self.fp32:
            cache_key = json.dumps({"full": full, "length_config": length_config, "keep_ratios": keep_ratios})
            if cache_key in self.fp32_scores:
                return self.fp32_scores[cache_key]
        metrics, _ = evaluate_features(
            model,
            examples,
            features,
            length_config=length_config,
            keep_ratios=keep_ratios,
            batch_size=self.recipe.eval.batch_size,
            progress=False,
        )
        if cache_key is not None:
            self.fp32_scores[cache_key] = metrics
            atomic_write_json(self.fp32_cache, {"inputs": self.fp32_inputs, "scores": self.fp32_scores})
        return metrics

    def latency(self, model, length_config, batch_size: int) -> dict[str, Any]:
        rows = self.features[:batch_size]
        inputs = batch_inputs(rows)
        with torch.no_grad():
            return median_latency_ms(
                lambda: model(**inputs, length_config=length_config), warmup=2, repeats=self.q.latency_repeats
            )

    # -- quantizing

    def quantize(self, config):
        model = copy.deepcopy(self.fp32)
        # The embeddings entry is qala's (INC's PT2E prepare knows no weight-only local config): off INC's copy.
        # Nor one with int8 weights and fp32 activations: weight-only units are plain fp32 units to INC.
        inc = copy.deepcopy(config)
        inc.local_config.pop(EMBEDDINGS_LOCAL_NAME, None)
        for name in fp32_units_of(config):
            inc.local_config[name] = type(config)(w_dtype="fp32", act_dtype="fp32")
        quantize_(
            model,
            inc,
            self.calibration,
            fp32_units=fp32_units_of(config),
            int8_embeddings=int8_embeddings_of(config),
            fp32_unit_weights=fp32_unit_weights_of(config),
        )
        return model

    def tune(self) -> tuple[Any, Any, dict[str, Any]]:
        """INC's tuning loop over the recipe's config_set; returns (model, config, report)."""
        from neural_compressor.common.base_tuning import init_tuning
        from neural_compressor.torch.quantization import TuningConfig as IncTuningConfig

        t = self.q.tuning
        config_set = [inc_config(self.q.approach, entry) for entry in t.config_set]
        if not t.enabled:
            config_set = config_set[:1]
        # INC's own loop (neural_compressor.torch.quantization.autotune) calls INC's quantize() on a
        # single exported graph; a length-adaptive model is many graphs with Python between them, so we
        # drive INC's trial expansion and stopping rule (init_tuning) with qala's quantize_ instead.
        loader, _, monitor = init_tuning(
            tuning_config=IncTuningConfig(
                config_set=config_set, tolerable_loss=t.tolerable_loss, max_trials=t.max_trials if t.enabled else 1
            )
        )
        length_config = self.q.eval_length_config
        baseline = self.f1(self.fp32, length_config)
        monitor.set_baseline(baseline["f1"])
        trials_dir = self.out / "trials"
        self._drop_stale_trials(trials_dir)
        trials, best = [], None
        for index, config in enumerate(loader, 1):
            path = trials_dir / f"trial-{index}.json"
            record = json.loads(path.read_text()) if path.is_file() else None
            if record is None or record["config"] != describe(config):
                model = self.quantize(config)
                metrics = self.f1(model, length_config)
                record = {
                    "trial": index,
                    "inputs": self.inputs,
                    "config": describe(config),
                    "f1": metrics["f1"],
                    "exact_match": metrics["exact_match"],
                    "relative_loss": (baseline["f1"] - metrics["f1"]) / max(baseline["f1"], 1e-9),
                }
                if self.q.latency_batch_sizes:  # no latency_batch_sizes: nothing is timed (shared CPUs)
                    record["latency_batch1_eager_qdq"] = self.latency(model, length_config, 1)
                atomic_write_json(path, record)
            else:
                logger.info("trial %d already scored (%s), reusing", index, path)
            trials.append(record)
            if best is None or record["f1"] > best[1]["f1"]:
                best = (config, record)
            if baseline["f1"] <= 0:
                # INC's trial table divides by the baseline; by INC's own rule (F1 >= baseline * (1 - loss))
                # any trial meets the goal against an fp32 F1 of 0 (an untrained model), so this one stops.
                break
            monitor.add_trial_result(index, record["f1"], config)
            if monitor.need_stop():
                break
        config, record = best
        # A relative loss against F1 0 is 0/0: "met" would be vacuous, "not met" just as empty.
        met = record["relative_loss"] <= t.tolerable_loss if baseline["f1"] > 0 else None
        if met is None:
            logger.warning(
                "the fp32 model scores F1 %.2f: an accuracy goal relative to it cannot be judged (goal_met: null); "
                "train the model first",
                baseline["f1"],
            )
        report = {
            "baseline": baseline,
            "trials": trials,
            "chosen": record,
            "goal_met": met,
            "tolerable_loss": t.tolerable_loss,
            "eval_length_config": length_config,
        }
        return self.quantize(config), config, report

    def qat(self) -> tuple[Any, dict[str, Any]]:
        from qala.train import QalaTrainer

        d = self.recipe.data
        train_features = windows(load_split(d, "train"), self.tokenizer, d, train=True)
        model = copy.deepcopy(self.fp32)
        example = {k: v for k, v in self.calibration[0].items() if k != "length_config"}
        prepare_qat_(model, example)
        stage = self.q.qat
        trainer = QalaTrainer(
            model=model,
            args=make_training_arguments(
                stage.training_args, output_dir=str(self.out / "qat_checkpoints"), seed=self.recipe.run.seed
            ),
            train_dataset=train_features,
            # The fake-quant units were exported with dynamic batch and sequence dims: dynamic padding works.
            data_collator=DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=8),
            stage=stage,
            lengthdrop=True,
        )
        result = trainer.train()
        convert_qat_(model)
        return model, {"train_metrics": result.metrics, "global_step": trainer.state.global_step}

    # -- the report

    def final_report(self, int8, *, compiled: bool | None = None) -> dict[str, Any]:
        """F1/EM on the whole eval file and latency, fp32 vs INT8, at full length and each keep ratio.

        `int8` is a converted model (timed through CompiledQA) or, with compiled=False, any callable
        already fit for timing (another backend's graphs, traced per padded length configuration).
        """
        # Constant keep ratios in the paper's padded form (timed) and, where the scorer can follow them, in
        # qala's units of each window's real length (model.py keep_ratios): scored, not timed (their cost
        # depends on each input's length, so one padded batch does not stand for them). A graph another
        # backend traced per padded length configuration cannot follow them (compiled is not None).
        layers, seq = self.fp32.num_layers, self.recipe.data.max_seq_length
        configs: dict[str, dict[str, Any]] = {"full": {"length_config": None}}
        for r in self.q.eval_keep_ratios:
            configs[constant_name(r, padded=True)] = constant_config(r, layers, seq)
        for r in self.q.eval_keep_ratios if compiled is None else ():
            configs[constant_name(r)] = config_json(**constant_config(r, layers))
        timed = CompiledQA(int8, compile=self.q.compile) if compiled is None else int8
        rows = {}
        for name, config in configs.items():
            fp32_metrics = self.f1(self.fp32, full=True, **config_kwargs(**config))
            int8_metrics = self.f1(int8, full=True, **config_kwargs(**config))
            row = {
                **config,
                "fp32": {"f1": fp32_metrics["f1"], "exact_match": fp32_metrics["exact_match"]},
                "int8": {"f1": int8_metrics["f1"], "exact_match": int8_metrics["exact_match"]},
                "relative_f1_loss": (fp32_metrics["f1"] - int8_metrics["f1"]) / max(fp32_metrics["f1"], 1e-9),
                "latency": {},
            }
            for bs in self.q.latency_batch_sizes if config.get("keep_ratios") is None else ():
                row["latency"][f"batch{bs}"] = {
                    "fp32_eager": self.latency(self.fp32, config["length_config"], bs),
                    "int8": self.latency(timed, config["length_config"], bs),
                }
            rows[name] = row
            logger.info("%s: fp32 F1 %.2f int8 F1 %.2f", name, row["fp32"]["f1"], row["int8"]["f1"])
            atomic_write_json(self.out / "final_rows.json", rows)  # progress, for an interrupted run
        return {
            "rows": rows,
            "int8_compiled": self.q.compile if compiled is None else compiled,
            # F1 of INT8 is measured on the uncompiled converted model (the same quantized arithmetic;
            # compiled logits agree to ~0.03 on MiniLM); latency on the compiled one.
            "int8_f1_measured_on": "uncompiled converted model",
            "compile_seconds": {str(k): round(v, 2) for k, v in getattr(timed, "compile_seconds", {}).items()},
            "threads": torch.get_num_threads(),
        }


def read_report(path: str | Path) -> dict[str, dict[str, Any]]:
    """The final table of a report.json that run() wrote: configuration name ("full", "padded_keep_0.8",
    "keep_0.8", ...) -> {"length_config", "keep_ratios", "fp32": {"f1", "exact_match"}, "int8": {"f1",
    "exact_match"}, "relative_f1_loss", "latency"}. Readers (qala.bench, benchmarks/) call this rather than
    digging through the file. Reports written before 2026-12-05 name the padded rows "keep_0.8" and the ratio
    rows "ratio_0.8"."""
    return json.loads(Path(path).read_text())["final"]["rows"]


def run(recipe: Recipe) -> tuple[dict[str, Any], int]:
    """Quantize with the recipe's backend and score; returns (report, exit status). Holds OUTPUT_DIR's lock
    throughout."""
    q = recipe.quantization
    quantizer = load_quantizer(q.backend)
    with stage_lock(q.output_dir):
        quantizer.check_recipe(recipe)  # a bad recipe or a missing library fails before model and data load
        tuner = Tuner(recipe)
        write_recipe(q.output_dir, recipe)
        return quantizer.quantize_and_score(tuner, Path(q.output_dir))


def load_quantizer(backend: str) -> ModuleType:
    """The module of QUANTIZERS that quantizes for `backend`, imported now."""
    return importlib.import_module(QUANTIZERS[backend])


def check_recipe(recipe: Recipe) -> None:
    """Every config_set entry is a valid INC config (QAT has none)."""
    q = recipe.quantization
    if q.approach != "qat":
        for entry in q.tuning.config_set:
            inc_config(q.approach, entry)


def quantize_and_score(tuner: Tuner, out: Path) -> tuple[dict[str, Any], int]:
    """qala's own backend: INC tuning over the config_set (or QAT), the INT8 artifact saved, then the whole-file
    report; exit status EXIT_GOAL_NOT_MET when no trial met the goal."""
    recipe, q = tuner.recipe, tuner.q
    if q.approach == "qat":
        int8, report = tuner.qat()
        config_record: dict[str, Any] = {"approach": "qat"}
        goal_met = True
    else:
        int8, config, report = tuner.tune()
        config_record = describe(config)
        goal_met = report["goal_met"]
    # The artifact is written before the long whole-file evaluation, so an interrupted report still
    # leaves the model (and the rows scored so far, final_rows.json).
    layers, seq = tuner.fp32.num_layers, recipe.data.max_seq_length
    served = [constant_config(r, layers, seq)["length_config"] for r in q.eval_keep_ratios]
    size = save_quantized(
        int8,
        out / "model",
        approach=q.approach,
        fp32_units=config_record.get("fp32_units", []),
        served_length_configs=served,
        tokenizer=tuner.tokenizer,
        extra={"tuning": config_record},
        extra_files={"recipe.yaml": recipe.to_yaml()},  # inside the artifact's manifest
    )
    report["final"] = tuner.final_report(int8)
    report.update(approach=q.approach, artifact=str(out / "model"), artifact_bytes=size, environment=environment_info())
    report["inputs"] = tuner.inputs  # content hashes and settings the trials and fp32 scores were keyed by
    atomic_write_json(out / "report.json", report)
    return report, EXIT_GOAL_NOT_MET if goal_met is False else 0


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m qala.tune", __doc__, "YAML recipe with a quantization section, e.g. recipes/squad_int8.yaml"
    )
    # An optional backend's library missing or unfit here: its message says what to install.
    return run_main(parser, argv, _main, errors=(BackendUnavailableError,))


def _main(args, recipe: Recipe) -> int:
    report, status = run(recipe)
    return _summary(report, status, load_quantizer(recipe.quantization.backend).ARTIFACT_NAME)


def _summary(report: dict[str, Any], status: int, artifact_name: str) -> int:
    chosen = report.get("chosen")
    if chosen:
        print(
            f"chosen trial {chosen['trial']}: F1 {chosen['f1']:.2f} (fp32 {report['baseline']['f1']:.2f}, "
            f"relative loss {chosen['relative_loss']:.4f}, tolerance {report['tolerable_loss']})"
        )
    for name, row in report["final"]["rows"].items():
        lat = row["latency"].get("batch1", {})
        print(
            f"{name:>9}: fp32 F1 {row['fp32']['f1']:6.2f}  int8 F1 {row['int8']['f1']:6.2f}  "
            f"batch-1 ms fp32 {lat.get('fp32_eager', {}).get('median_ms', float('nan')):.1f} "
            f"int8 {lat.get('int8', {}).get('median_ms', float('nan')):.1f}"
        )
    print(f"{artifact_name}: {report['artifact']} ({report['artifact_bytes'] / 1e6:.1f} MB on disk)")
    if status == EXIT_GOAL_NOT_MET:
        print(
            f"goal NOT met: no trial within {report['tolerable_loss']:.2%} relative F1; kept the best one",
            file=sys.stderr,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
