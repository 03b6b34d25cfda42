"""qala.tune end to end on a tiny model: INC-driven trials, report, artifact, exit codes."""

import json
import shutil
from pathlib import Path

import pytest

import qala.tune as qtune
from qala.quantize import load_quantized
from qala.utils import content_hash
from tests.conftest import REPO, build_tiny_qa_checkpoint, kill_9_when

RECIPE = """
run: {{output_dir: {out}, seed: 3}}
data:
  train: package://qala/samples/squad_sample_train.json
  eval: package://qala/samples/squad_sample_dev.json
  max_seq_length: 128
  doc_stride: 64
  max_eval_samples: 6
  max_train_samples: 16
model: {{name_or_path: {model}}}
quantization:
  model: {model}
  output_dir: {out}/int8
  approach: {approach}
  calibration: {{samples: 8, batch_size: 4, length_configs: mixed}}
  tuning:
    tolerable_loss: 0.01
    max_trials: 3
    eval_samples: 5
    config_set:
{config_set}
  eval_keep_ratios: [0.5]
  latency_batch_sizes: [1]
  latency_repeats: 2
  compile: false
  qat:
    num_sandwich: 1
    training_args: {{max_steps: 2, per_device_train_batch_size: 4, save_strategy: "no", disable_tqdm: true}}
eval: {{batch_size: 8}}
"""


# Three trials (INC expands act_sym's two values), every unit quantized.
ALL_UNITS = """\
      - {act_sym: [false, true], w_granularity: per_channel}
      - {w_granularity: per_channel, fp32_units: [qa_outputs]}
"""
# Three trials quantizing only the span head. For the tests of the tuning loop's bookkeeping (goal, stopping, reuse,
# resume, what trials are keyed by), which hold whatever a trial quantizes: a trial exports 1 unit instead of 7, and
# torch.export per unit is most of what a trial costs. The static end-to-end and embeddings tests keep ALL_UNITS.
HEAD_ONLY = """\
      - {act_sym: [false, true], w_granularity: per_channel, fp32_units: ["encoder.*"]}
      - {w_granularity: per_tensor, fp32_units: ["encoder.*"]}
"""


def write_recipe(tmp_path, model, approach="static", config_set=ALL_UNITS):
    path = tmp_path / f"{approach}.yaml"
    text = RECIPE.format(out=tmp_path / approach, model=model, approach=approach, config_set=config_set.rstrip("\n"))
    path.write_text(text)
    return path


def test_static_tuning_end_to_end(tmp_path, tiny_checkpoint, monkeypatch, capsys, caplog):
    monkeypatch.chdir(REPO)
    with caplog.at_level("WARNING", logger="qala.tune"):
        assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint))]) == 0
    out = tmp_path / "static" / "int8"
    report = json.loads((out / "report.json").read_text())
    # The random tiny model scores F1 ~0: a goal relative to it is 0/0, neither met nor missed (the goal rule
    # itself is tested below, on scores with a meaning).
    assert report["baseline"]["f1"] == 0 and report["goal_met"] is None and report["trials"]
    assert "an accuracy goal relative to it cannot be judged (goal_met: null)" in caplog.text
    first = report["trials"][0]
    assert first["config"]["type"] == "INT8StaticQuantConfig" and "f1" in first and "latency_batch1_eager_qdq" in first
    assert set(report["final"]["rows"]) == {"full", "padded_keep_0.5", "keep_0.5"}
    assert report["final"]["rows"]["keep_0.5"]["keep_ratios"] == [0.5, 0.25]
    row = report["final"]["rows"]["padded_keep_0.5"]
    assert row["length_config"] == [64, 32] and "fp32_eager" in row["latency"]["batch1"]
    assert report["artifact_bytes"] > 0 and "versions" in report["environment"]
    assert (out / "trials" / "trial-1.json").is_file()
    model = load_quantized(out / "model")
    assert json.loads((out / "model" / "quantization.json").read_text())["approach"] == "static"
    assert model.qala_config.max_seq_length == 128 or model.qala_config.max_seq_length == 384
    assert "INT8 artifact" in capsys.readouterr().out

    # qala.evaluate scores the artifact as INT8 (not the fp32 weights stored in it).
    from qala.evaluate import main as evaluate_main

    data = str(REPO / "qala" / "samples" / "squad_sample_dev.json")
    args = [str(out / "model"), data, "--max-seq-length", "128", "--doc-stride", "64", "--max-samples", "6"]
    assert evaluate_main([*args, "--padded-keep-ratio", "0.5"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 6 and line["length_config"] == [64, 32]
    final = report["final"]["rows"]["padded_keep_0.5"]["int8"]
    assert line["f1"] == pytest.approx(final["f1"], abs=1e-6) and line["exact_match"] == pytest.approx(
        final["exact_match"]
    )


def test_goal_not_met_keeps_best_and_exits_nonzero(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    scores = iter([50.0, 40.0, 45.0, 42.0, 44.0, 41.0])
    original = qtune.Tuner.f1

    def fake_f1(self, model, length_config=None, *, full=False, **kw):
        metrics = original(self, model, length_config, full=full, **kw)
        if not full:  # trials: fp32 baseline first, then each quantized model
            metrics["f1"] = next(scores)
        return metrics

    monkeypatch.setattr(qtune.Tuner, "f1", fake_f1)
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint, config_set=HEAD_ONLY))]) == qtune.EXIT_GOAL_NOT_MET
    report = json.loads((tmp_path / "static" / "int8" / "report.json").read_text())
    assert not report["goal_met"]
    assert len(report["trials"]) == 3  # max_trials
    assert report["chosen"]["f1"] == 45.0 and report["chosen"]["trial"] == 2
    assert "goal NOT met" in capsys.readouterr().err
    assert (tmp_path / "static" / "int8" / "model" / "quantization.json").is_file()


def test_tuning_stops_at_the_first_config_within_tolerance(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    # fp32 baseline 50; trial 1 loses 20%, trial 2 loses 0.8% (within 1%): trial 3 must never run.
    scores = iter([50.0, 40.0, 49.6, 50.0])
    original = qtune.Tuner.f1

    def fake_f1(self, model, length_config=None, *, full=False, **kw):
        metrics = original(self, model, length_config, full=full, **kw)
        if not full:
            metrics["f1"] = next(scores)
        return metrics

    monkeypatch.setattr(qtune.Tuner, "f1", fake_f1)
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint, config_set=HEAD_ONLY))]) == 0
    report = json.loads((tmp_path / "static" / "int8" / "report.json").read_text())
    assert [t["f1"] for t in report["trials"]] == [40.0, 49.6]
    assert report["goal_met"] and report["chosen"]["trial"] == 2
    assert report["chosen"]["relative_loss"] == pytest.approx(0.008)
    assert not (tmp_path / "static" / "int8" / "trials" / "trial-3.json").exists()


def test_int8_embeddings_and_weight_only_entries_reach_the_artifact(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_checkpoint)
    entry = (
        "quantization.tuning.config_set=[{w_granularity: per_channel, int8_embeddings: true,"
        " fp32_units: [qa_outputs], fp32_unit_weights: int8}]"
    )
    assert qtune.main([str(path), entry, "quantization.tuning.max_trials=1"]) in (0, qtune.EXIT_GOAL_NOT_MET)
    out = tmp_path / "static" / "int8"
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"]["config"]["int8_embeddings"] is True
    record = json.loads((out / "model" / "quantization.json").read_text())
    assert record["embeddings"] == "int8_per_row"
    assert record["weight_only_int8"] == ["qa_outputs"] and record["units"]["fp32"] == ["qa_outputs"]
    assert report["chosen"]["config"]["fp32_unit_weights"] == "int8"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert "recipe.yaml" in manifest["sha256"] and "quantization.json" in manifest["sha256"]
    assert qtune.main([str(path), "quantization.tuning.config_set=[{int8_embeddings: [true, false]}]"]) == 2


def test_rerun_reuses_scored_trials(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_checkpoint, config_set=HEAD_ONLY)
    assert qtune.main([str(path)]) == 0
    calls = []
    monkeypatch.setattr(qtune.Tuner, "quantize", lambda self, config: calls.append(config) or _quantize(self, config))
    assert qtune.main([str(path)]) == 0
    assert len(calls) == 1  # only the final re-quantization of the chosen config, no trial re-scored

    # Other calibration settings: the trials are scored again (saying why), the fp32 scores still fit.
    calls.clear()
    with caplog.at_level("INFO", logger="qala.tune"):
        assert qtune.main([str(path), "quantization.calibration.samples=4"]) == 0
    assert len(calls) == 2
    assert "quantization.calibration.samples: 8 -> 4" in caplog.text and "fp32 scores of other" not in caplog.text


_quantize = qtune.Tuner.quantize


@pytest.mark.parametrize("approach", ["dynamic", "qat"])
def test_dynamic_and_qat(tmp_path, tiny_checkpoint, monkeypatch, approach):
    monkeypatch.chdir(REPO)
    # Dynamic: the span head (what is checked is the approach reaching the report and the artifact; test_quantize
    # quantizes every unit dynamically and reloads it). QAT trains every unit, whatever config_set says.
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint, approach, config_set=HEAD_ONLY))]) == 0
    out = tmp_path / approach / "int8"
    report = json.loads((out / "report.json").read_text())
    assert report["approach"] == approach
    assert json.loads((out / "model" / "quantization.json").read_text())["approach"] == approach
    if approach == "qat":
        assert report["global_step"] == 2


def test_bad_config_set_entry_is_a_recipe_error(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_checkpoint)
    assert qtune.main([str(path), "quantization.tuning.config_set=[{act_sim: true}]"]) == 2
    assert "config_set" in capsys.readouterr().err


def _scores(metrics):
    return {k: v for k, v in metrics.items() if k != "seconds"}  # not the wall time it took


def _artifact_digests(model_dir):
    """SHA-256 of every artifact file but recipe.yaml (it names the run's own output folder)."""
    digests = json.loads((model_dir / "manifest.json").read_text())["sha256"]
    return {name: digest for name, digest in digests.items() if name != "recipe.yaml"}


def test_trials_and_fp32_scores_are_keyed_by_content_not_path(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    model = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))
    dev = Path(shutil.copy(REPO / "qala" / "samples" / "squad_sample_dev.json", tmp_path / "dev.json"))
    path = write_recipe(tmp_path, model, config_set=HEAD_ONLY)
    out = tmp_path / "static" / "int8"
    assert qtune.main([str(path), f"data.eval={dev}"]) in (0, qtune.EXIT_GOAL_NOT_MET)
    first = json.loads((out / "report.json").read_text())
    assert (out / qtune.FP32_CACHE_NAME).is_file() and not (out.parent / qtune.FP32_CACHE_NAME).exists()
    assert first["inputs"]["model"] == content_hash(model)

    # The model retrained at the same path: neither a trial nor the fp32 baseline of the old one is reused.
    build_tiny_qa_checkpoint(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    calls = []
    monkeypatch.setattr(qtune.Tuner, "quantize", lambda self, config: calls.append(config) or _quantize(self, config))
    with caplog.at_level("INFO", logger="qala.tune"):
        qtune.main([str(path), f"data.eval={dev}"])
    second = json.loads((out / "report.json").read_text())
    change = f"model: {first['inputs']['model']} -> {content_hash(model)}"
    assert f"fp32 scores of other inputs ({change}): scoring again" in caplog.text
    assert f"trials scored for other inputs ({change}): scoring again" in caplog.text
    assert len(calls) == len(second["trials"]) + 1  # every trial quantized again, then the chosen one
    assert all(trial["inputs"]["model"] == content_hash(model) for trial in second["trials"])
    # ... and the result is the one a fresh run on the new weights gives.
    (tmp_path / "fresh").mkdir()
    qtune.main([str(write_recipe(tmp_path / "fresh", tmp_path / "other", config_set=HEAD_ONLY)), f"data.eval={dev}"])
    reference = json.loads((tmp_path / "fresh" / "static" / "int8" / "report.json").read_text())
    assert _scores(second["baseline"]) == _scores(reference["baseline"])
    assert [t["f1"] for t in second["trials"]] == [t["f1"] for t in reference["trials"]]
    assert _artifact_digests(out / "model") == _artifact_digests(tmp_path / "fresh" / "static" / "int8" / "model")

    # The evaluation file edited in place: the fp32 scores are computed again.
    caplog.clear()
    data = json.loads(dev.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] += " (edited)"
    dev.write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="qala.tune"):
        assert qtune.main([str(path), f"data.eval={dev}"]) in (0, qtune.EXIT_GOAL_NOT_MET)
    assert "fp32 scores of other inputs (eval_data: " in caplog.text


def test_a_start_that_fails_leaves_the_tune_recipe_alone(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "static" / "int8"
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text("# the last run's recipe\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint)), f"quantization.model={empty}"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == "# the last run's recipe\n"


_real_f1 = qtune.Tuner.f1


def f1_below_goal(self, model, length_config=None, *, full=False, **kw):
    """Tuner.f1 with every trial's tuning F1 far below a fixed fp32 baseline (the tiny model's F1 is ~0): every
    one of max_trials runs. Deterministic, so that killed, resumed and uninterrupted runs agree."""
    metrics = dict(_real_f1(self, model, length_config, full=full, **kw))
    if not full:
        metrics["f1"] = 50.0 if model is self.fp32 else 10.0 + metrics["f1"] / 10
    return metrics


# Tunes like `python -m qala.tune RECIPE`, but hangs in trial 2 (trial-1.json written) after touching MARKER.
KILLED_RUN = """
import sys, time
import qala.tune as qtune
from tests.test_tune import f1_below_goal
qtune.Tuner.f1 = f1_below_goal
quantize, calls = qtune.Tuner.quantize, []
def quantize_then_hang(self, config):
    calls.append(config)
    if len(calls) == 2:
        open(sys.argv[2], "w").close()
        time.sleep(600)
    return quantize(self, config)
qtune.Tuner.quantize = quantize_then_hang
sys.exit(qtune.main([sys.argv[1]]))
"""


def test_kill_9_during_trials_then_rerun_gives_the_uninterrupted_result(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
    killed = write_recipe(tmp_path / "killed", tiny_checkpoint, config_set=HEAD_ONLY)
    out = tmp_path / "killed" / "static" / "int8"
    marker = tmp_path / "in-trial-2"
    kill_9_when(marker, ["-c", KILLED_RUN, str(killed), str(marker)], "trial 2")
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial-1.json"]
    assert not (out / "report.json").exists() and not (out / "model").exists()

    monkeypatch.setattr(qtune.Tuner, "f1", f1_below_goal)
    calls = []
    monkeypatch.setattr(qtune.Tuner, "quantize", lambda self, config: calls.append(config) or _quantize(self, config))
    assert qtune.main([str(killed)]) == qtune.EXIT_GOAL_NOT_MET
    assert len(calls) == 3  # trials 2 and 3, then the chosen one: trial 1 was kept
    straight = write_recipe(tmp_path / "straight", tiny_checkpoint, config_set=HEAD_ONLY)
    assert qtune.main([str(straight)]) == qtune.EXIT_GOAL_NOT_MET

    def results(root):
        report = json.loads((root / "static" / "int8" / "report.json").read_text())
        trials = [{k: v for k, v in t.items() if not k.startswith("latency")} for t in report["trials"]]
        rows = {name: (row["fp32"], row["int8"]) for name, row in report["final"]["rows"].items()}
        return trials, _scores(report["baseline"]), report["chosen"]["trial"], rows

    assert results(tmp_path / "killed") == results(tmp_path / "straight")
    assert len(results(tmp_path / "killed")[0]) == 3
    assert _artifact_digests(out / "model") == _artifact_digests(tmp_path / "straight" / "static" / "int8" / "model")
