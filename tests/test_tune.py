"""qala.tune end to end on a tiny model: INC-driven trials, report, artifact, exit codes."""

import json

import pytest

import qala.tune as qtune
from qala.quantize import load_quantized
from tests.conftest import REPO

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
      - {{act_sym: [false, true], w_granularity: per_channel}}
      - {{w_granularity: per_channel, fp32_units: [qa_outputs]}}
  eval_keep_ratios: [0.5]
  latency_batch_sizes: [1]
  latency_repeats: 2
  compile: false
  qat:
    num_sandwich: 1
    training_args: {{max_steps: 2, per_device_train_batch_size: 4, save_strategy: "no", disable_tqdm: true}}
eval: {{batch_size: 8}}
"""


def write_recipe(tmp_path, model, approach="static"):
    path = tmp_path / f"{approach}.yaml"
    path.write_text(RECIPE.format(out=tmp_path / approach, model=model, approach=approach))
    return path


def test_static_tuning_end_to_end(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint))]) == 0
    out = tmp_path / "static" / "int8"
    report = json.loads((out / "report.json").read_text())
    assert report["goal_met"] and report["trials"]
    first = report["trials"][0]
    assert first["config"]["type"] == "INT8StaticQuantConfig" and "f1" in first and "latency_batch1_eager_qdq" in first
    assert set(report["final"]["rows"]) == {"full", "keep_0.5", "ratio_0.5"}
    assert report["final"]["rows"]["ratio_0.5"]["keep_ratios"] == [0.5, 0.25]
    row = report["final"]["rows"]["keep_0.5"]
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
    assert evaluate_main([*args, "--keep-ratio", "0.5"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 6 and line["length_config"] == [64, 32]
    final = report["final"]["rows"]["keep_0.5"]["int8"]
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
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint))]) == qtune.EXIT_GOAL_NOT_MET
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
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint))]) == 0
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


def test_rerun_reuses_scored_trials(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_checkpoint)
    assert qtune.main([str(path)]) == 0
    calls = []
    monkeypatch.setattr(qtune.Tuner, "quantize", lambda self, config: calls.append(config) or _quantize(self, config))
    assert qtune.main([str(path)]) == 0
    assert len(calls) == 1  # only the final re-quantization of the chosen config, no trial re-scored


_quantize = qtune.Tuner.quantize


@pytest.mark.parametrize("approach", ["dynamic", "qat"])
def test_dynamic_and_qat(tmp_path, tiny_checkpoint, monkeypatch, approach):
    monkeypatch.chdir(REPO)
    assert qtune.main([str(write_recipe(tmp_path, tiny_checkpoint, approach))]) == 0
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
