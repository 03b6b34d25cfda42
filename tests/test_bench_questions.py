"""The real-questions table (worker.measure, unpadded rows): planning, the end-to-end measurement, engines, the JSON.

Tiny models (2 layers, hidden 32) on the packaged SQuAD sample; nothing here asserts a timing.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering, BertConfig

from qala.bench import cli, peers, plan, worker
from qala.bench.peers import onnx_model
from qala.lengths import kept_per_layer
from qala.model import macs_per_sample
from qala.recipe import load_recipe
from tests.test_bench import model_dir  # noqa: F401 - a fixture

SAMPLE = "package://qala/samples/squad_sample_dev.json"
TINY_ARCH = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 800}
RECIPE = """\
# python -m qala.bench {tmp}/questions.yaml --table questions
data:
  train: package://qala/samples/squad_sample_train.json
  eval: {sample}
  max_eval_samples: 4
  max_seq_length: 64
  doc_stride: 32
benchmark:
  output_dir: {tmp}/out
  model: {model}
  baselines: [bert-base]
  baseline_configs:
    bert-base: {{hidden_size: 32, num_attention_heads: 4, intermediate_size: 64, vocab_size: 800, num_hidden_layers: 2}}
  batch_sizes: [2]
  threads: 1
  warmup: 1
  compile_int8: false
  onnxruntime: false
  openvino: false  # the OpenVINO peers are tested in-process (test_openvino_rows_answer_with_f1)
  gemm_peak: true
  gemm_size: 64
  core_sweep: false
"""


def write_recipe(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "questions.yaml"
    path.write_text(RECIPE.format(tmp=tmp_path, model=model, sample=SAMPLE))
    return path


def spec_for(model: Path, tmp_path: Path, **extra) -> dict:
    return {
        "id": "test",
        "kind": "real_questions",
        "padded": False,
        "data": SAMPLE,
        "data_split": "validation",
        "questions": 5,
        "max_seq_length": 64,
        "doc_stride": 32,
        "n_best_size": 20,
        "max_answer_length": 30,
        "tokenizer": str(model),
        "threads": 1,
        "warmup": 1,
        "work_dir": str(tmp_path / "work"),
        "path": str(model),
        "engine": "qala",
        "dtype": "fp32",
        "batch_size": 2,
        "length_config": None,
        "length_mode": None,
        **extra,
    }


# ------------------------------------------------------------------ planning


def test_plan_rows_engines_modes_and_the_ipex_hook(tmp_path, model_dir):  # noqa: F811
    frontier = {
        "backend": "int8",
        "max_seq_length": 64,
        "frontier": [
            {"keep_ratios": [0.9, 0.6], "cost": 1.0, "f1": 20.0},
            {"length_config": [60, 50], "cost": 2.0, "f1": 30.0},
            {"keep_ratios": [1.0, 1.0], "cost": 3.0, "f1": 31.0},  # full length: already a row
        ],
    }
    (tmp_path / "frontier.json").write_text(json.dumps(frontier))
    overrides = [
        f"benchmark.int8_model={model_dir}",
        f"benchmark.frontier={tmp_path}/frontier.json",
        "benchmark.frontier_dtypes=[int8]",
        "benchmark.batch_sizes=[1, 32]",
        "benchmark.onnxruntime=true",
        "benchmark.openvino=true",
        "benchmark.compile_int8=true",
    ]
    recipe = load_recipe(write_recipe(tmp_path, model_dir), overrides)
    rows, notes = plan.plan_rows(recipe, "questions")
    ids = [r["id"] for r in rows]
    assert ids[:2] == ["transformers/BERT-base/fp32/full/b1", "transformers/BERT-base/fp32/full/b32"]
    assert {
        "transformers/MiniLM/fp32/full/b1",
        "onnxruntime/MiniLM/fp32/full/b32",
        "onnxruntime/MiniLM/int8/full/b1",
        "qala/MiniLM/fp32/full/b1",
        "qala/MiniLM/int8/full/b32",
        "qala/QuaLA-MiniLM/int8/kr-0.9-0.6/b1",
        "qala/QuaLA-MiniLM/int8/lc-60-50/b32",
    } <= set(ids)
    # Peers: ONNX Runtime plain and fused, OpenVINO (when installed), each fp32 and INT8, at both batch sizes.
    assert {"onnxruntime-fused/MiniLM/fp32/full/b1", "onnxruntime-fused/MiniLM/int8/full/b32"} <= set(ids)
    openvino = plan.openvino_available()
    assert ("openvino/MiniLM/int8/full/b1" in ids) == openvino
    # OpenVINO bf16 too where bf16 is OpenVINO's CPU default (AVX-512 BF16 or AMX): what a plain user run gets.
    bf16 = openvino and plan.openvino_bf16_native()
    assert ("openvino/MiniLM/bf16/full/b32" in ids) == bf16
    assert len(ids) == len(set(ids)) == 20 + 4 * openvino + 2 * bf16
    by_id = {r["id"]: r for r in rows}
    assert by_id["qala/QuaLA-MiniLM/int8/kr-0.9-0.6/b1"]["length_mode"] == "ratio"
    assert by_id["qala/QuaLA-MiniLM/int8/lc-60-50/b1"]["length_mode"] == "absolute"
    assert by_id["qala/MiniLM/fp32/full/b1"]["length_mode"] is None
    int8 = by_id["qala/MiniLM/int8/full/b1"]
    assert int8["compiled"] and int8["pad_to_multiple_of"] == plan.COMPILED_PAD_MULTIPLE
    assert by_id["transformers/BERT-base/fp32/full/b1"]["f1_note"]
    assert all(r["questions"] == 4 and r["python"] is None for r in rows)
    assert notes["ipex"]["status"] == "skipped" and "qala.bench.ipex" in notes["ipex"]["build_command"]

    # With the recipe naming the IPEX environment and its calibration, IPEX rows run under that environment's
    # python: full length unpadded, each calibrated absolute configuration padded to max_seq_length, with qala's
    # INT8 rows at that configuration on the same padded windows.
    python, summaries = tmp_path / "python", tmp_path / "ipex_calibration.json"
    python.write_text("")
    configs = [{"length_config": None}, {"length_config": [40, 20]}]
    summaries.write_text(json.dumps({"format": "qala-ipex-qconf/1", "configs": configs}))
    overrides += [f"benchmark.ipex_python={python}", f"benchmark.ipex_calibration={summaries}"]
    recipe = load_recipe(write_recipe(tmp_path, model_dir), overrides)
    rows, _ = plan.plan_rows(recipe, "questions", pad_multiple=64)
    by_id = {r["id"]: r for r in rows}
    ipex = [r for r in rows if r["engine"] == "ipex"]
    assert [r["id"] for r in ipex] == [
        "ipex/MiniLM/int8/full/b1",
        "ipex/MiniLM/int8/full/b32",
        "ipex/QuaLA-MiniLM/int8/lc-40-20/b1",
        "ipex/QuaLA-MiniLM/int8/lc-40-20/b32",
    ]
    assert all(r["python"] == str(python.absolute()) for r in ipex)
    assert by_id["ipex/MiniLM/int8/full/b1"].get("pad_to_multiple_of") is None
    assert by_id["ipex/QuaLA-MiniLM/int8/lc-40-20/b1"]["pad_to_multiple_of"] == recipe.data.max_seq_length
    assert by_id["qala/QuaLA-MiniLM/int8/lc-40-20/b32"]["pad_to_multiple_of"] == recipe.data.max_seq_length
    assert by_id["qala/MiniLM/int8/full/b1"]["pad_to_multiple_of"] == 64


# ------------------------------------------------------------------ the measurement, in process


def test_requests_carry_no_padding_beyond_their_longest_window(tmp_path, model_dir, monkeypatch):  # noqa: F811
    seen = []
    engine = peers.ENGINES["qala"]

    def spy(spec, work_dir, example):
        predict, facts = engine(spec, work_dir, example)

        def recorded(inputs):
            seen.append(inputs["attention_mask"].clone())
            return predict(inputs)

        return recorded, facts

    monkeypatch.setitem(peers.ENGINES, "qala", spy)
    result = worker.measure(spec_for(model_dir, tmp_path, max_seq_length=48, doc_stride=16))
    assert seen and all(bool(mask[:, -1].any()) for mask in seen)  # the last position is some window's token
    assert result["questions"] == 5 and result["requests"] == 3 and result["windows"] >= 5
    assert result["real_tokens"] <= result["padded_positions"]
    assert 0 <= result["f1"] <= 100 and result["ms_p50"] <= result["ms_p90"]
    assert result["questions_per_s"] > 0 and result["achieved_gmacs_per_s"] > 0
    assert result["python"] == sys.executable and result["worker_versions"]["torch"]


def test_same_answers_through_qala_and_transformers_and_a_ratio_row(tmp_path, model_dir):  # noqa: F811
    full = worker.measure(spec_for(model_dir, tmp_path))
    plain = worker.measure(spec_for(model_dir, tmp_path, engine="transformers"))
    assert full["f1"] == plain["f1"] and full["exact_match"] == plain["exact_match"]
    ratio = worker.measure(spec_for(model_dir, tmp_path, length_config=[0.7, 0.4], length_mode="ratio"))
    assert ratio["gmacs_real_tokens"] < full["gmacs_real_tokens"] and ratio["f1"] is not None
    random = worker.measure(
        spec_for(model_dir, tmp_path, engine="transformers", path=None, arch=TINY_ARCH, f1_note="speed only")
    )
    assert random["f1"] is None and random["ms_p50"] > 0


def test_real_token_macs_follow_the_row_configuration():
    config = BertConfig(**TINY_ARCH, num_hidden_layers=2)
    full = {"length_config": None, "length_mode": None}
    assert worker.real_token_macs(config, full, [10, 30]) == macs_per_sample(config, None, 10) + macs_per_sample(
        config, None, 30
    )
    ratio = {"length_config": [0.7, 0.5], "length_mode": "ratio"}
    assert worker.real_token_macs(config, ratio, [10]) == macs_per_sample(config, kept_per_layer([0.7, 0.5], 10), 10)
    absolute = {"length_config": [20, 8], "length_mode": "absolute"}
    assert worker.real_token_macs(config, absolute, [30]) == macs_per_sample(config, [20, 8], 30)


def test_pad_to_multiple():
    inputs = {"input_ids": torch.ones(2, 37, dtype=torch.long), "attention_mask": torch.ones(2, 37, dtype=torch.long)}
    padded = worker.pad_to_multiple(inputs, 32, pad_id=0)
    assert padded["input_ids"].shape == (2, 64) and int(padded["attention_mask"][:, 37:].sum()) == 0
    assert worker.pad_to_multiple(inputs, None) is inputs and worker.pad_to_multiple(inputs, 1) is inputs


def peer_inputs() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for batch, seq in ((1, 20), (3, 50)):
        inputs = {
            "input_ids": torch.randint(5, 600, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
        }
        inputs["attention_mask"][0, seq - 5 :] = 0
        batches.append(inputs)
    return batches


def assert_equals_transformers(call, directory) -> None:
    reference = AutoModelForQuestionAnswering.from_pretrained(directory, attn_implementation="eager").eval()
    for inputs in peer_inputs():
        start, end = call(inputs)
        with torch.no_grad():
            expected = reference(**inputs)
        assert start.shape == tuple(inputs["input_ids"].shape)
        assert (torch.from_numpy(start) - expected.start_logits).abs().max().item() < 1e-4
        assert (torch.from_numpy(end) - expected.end_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_onnxruntime_runs_unpadded_windows_of_any_length(tmp_path, model_dir, fused):  # noqa: F811
    pytest.importorskip("onnxruntime")
    from qala.quantize.onnx import operator_types

    spec = {"path": str(model_dir), "dtype": "fp32", "threads": 1, "seq_length": 64}
    call, facts = onnx_model(spec, tmp_path / "onnx", fused=fused)
    assert_equals_transformers(call, model_dir)
    assert bool(facts.get("fused_operators")) == fused
    int8_call, int8_facts = onnx_model({**spec, "dtype": "int8"}, tmp_path / "onnx8", fused=fused)
    assert int8_call(peer_inputs()[1])[0].shape == (3, 50) and "quantize_dynamic" in int8_facts["quantization"]
    ops = operator_types(next((tmp_path / "onnx8").glob("*.int8.onnx")))
    assert "MatMulInteger" in ops and ("QAttention" in ops) == fused


def test_openvino_peer_fp32_equals_transformers_and_int8_runs_integer_layers(tmp_path, model_dir):  # noqa: F811
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qala.bench.peers import openvino_model

    spec = {"path": str(model_dir), "dtype": "fp32", "threads": 1}
    call, facts = openvino_model(spec, tmp_path / "ov")
    assert_equals_transformers(call, model_dir)
    calibration = [{k: v[:1] for k, v in inputs.items()} for inputs in peer_inputs()]
    int8_call, int8_facts = openvino_model({**spec, "dtype": "int8"}, tmp_path / "ov8", calibration)
    assert int8_call(peer_inputs()[1])[0].shape == (3, 50)
    assert "nncf" in int8_facts["quantization"] and int8_facts["int8_layers"]
    bf16_call, bf16_facts = openvino_model({**spec, "dtype": "bf16"}, tmp_path / "ov16")
    assert bf16_facts["inference_precision"] == "bf16" and facts["inference_precision"] == "f32"
    assert bf16_call(peer_inputs()[1])[0].shape == (3, 50)


def test_openvino_rows_answer_with_f1(tmp_path, model_dir):  # noqa: F811
    # Every OpenVINO row gets F1 from its own answers: the fp32 peer and qala's bucketed engine answer like
    # transformers; the INT8 ones calibrate on the training sample's windows (never the questions answered).
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    calibration = {"data": "package://qala/samples/squad_sample_train.json", "windows": 8}
    plain = worker.measure(spec_for(model_dir, tmp_path, engine="transformers"))
    peer = worker.measure(spec_for(model_dir, tmp_path, engine="openvino"))
    bucketed = worker.measure(spec_for(model_dir, tmp_path, backend="openvino"))
    assert peer["f1"] == plain["f1"] == bucketed["f1"] and bucketed["compiled_models"] > 0
    ratio = worker.measure(
        spec_for(model_dir, tmp_path, backend="openvino", length_config=[0.7, 0.4], length_mode="ratio")
    )
    reference = worker.measure(spec_for(model_dir, tmp_path, length_config=[0.7, 0.4], length_mode="ratio"))
    assert ratio["f1"] == reference["f1"]
    # max_seq_length 96: a training-sample question is too long for 64-token windows with doc_stride 32.
    window = {"max_seq_length": 96, "doc_stride": 32, "calibration": calibration, "dtype": "int8"}
    for spec in (
        spec_for(model_dir, tmp_path, engine="openvino", **window),
        spec_for(model_dir, tmp_path, backend="openvino-int8", **window),
    ):
        row = worker.measure(spec)
        assert row["f1"] is not None and "nncf" in row["quantization"]


# ------------------------------------------------------------------ workers, the row's own python, the JSON


def test_a_row_runs_under_its_own_python_and_a_missing_one_fails_cleanly(tmp_path, model_dir):  # noqa: F811
    spec = spec_for(model_dir, tmp_path, questions=2, python=sys.executable)
    result = cli.run_worker(spec, tmp_path / "work")
    assert result["status"] == "ok", result.get("error")
    assert result["python"] == sys.executable and result["questions"] == 2
    missing = cli.run_worker({**spec, "python": str(tmp_path / "venv/bin/python")}, tmp_path / "work2")
    assert missing["status"] == "failed" and "python not found" in missing["error"]


def test_questions_table_end_to_end_and_resume(tmp_path, model_dir, tiny_int8_artifact, monkeypatch, capsys):  # noqa: F811
    path = write_recipe(tmp_path, model_dir)
    overrides = [f"benchmark.int8_model={tiny_int8_artifact}"]
    assert cli.main([str(path), "--table", "questions", *overrides]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    document = json.loads((out / cli.FILES["questions"][0]).read_text())
    assert document["cpu"] and document["versions"]["torch"] and document["seeds"]["random_weights"] == 0
    assert document["method"]["questions"] == 4 and document["gemm_peak"]["int8_gmacs_per_s"] > 0
    # The peak of a dtype is the best of the engines the rows use, each engine's figure kept beside it.
    engines = document["gemm_peak"]["engines"]
    assert {"torch.mm", "onnxruntime.MatMul", "pt2e.qlinear", "onnxruntime.MatMulInteger"} <= set(engines)
    for dtype in ("fp32", "int8"):
        ran = [e["gmacs_per_s"] for e in engines.values() if e["dtype"] == dtype and "gmacs_per_s" in e]
        assert document["gemm_peak"][f"{dtype}_gmacs_per_s"] == max(ran)
    rows = {r["id"]: r for r in document["rows"]}
    assert set(rows) == {
        "transformers/BERT-base/fp32/full/b2",
        "transformers/MiniLM/fp32/full/b2",
        "qala/MiniLM/fp32/full/b2",
        "qala/MiniLM/int8/full/b2",
    }
    for row in rows.values():
        assert row["status"] == "ok", (row["id"], row.get("error"))
        for key in ("engine", "dtype", "length_config", "length_mode", "batch_size", "questions", "f1"):
            assert key in row
        assert row["questions"] == 4 and row["ms_p50"] > 0 and row["questions_per_s"] > 0
        assert row["int8_peak_fraction"] > 0
    assert rows["transformers/BERT-base/fp32/full/b2"]["f1"] is None
    assert rows["qala/MiniLM/fp32/full/b2"]["f1"] == rows["transformers/MiniLM/fp32/full/b2"]["f1"]
    assert rows["qala/MiniLM/int8/full/b2"]["f1"] is not None and not rows["qala/MiniLM/int8/full/b2"]["compiled"]
    assert "| qala | MiniLM | int8 | full | 2 |" in (out / cli.FILES["questions"][1]).read_text()
    assert (out / cli.FILES["questions"][2]).read_bytes()[:4] == b"\x89PNG"
    assert document["notes"]["ipex"]["status"] == "skipped"

    calls = []
    monkeypatch.setattr(cli, "run_worker", lambda spec, work_dir: calls.append(spec["id"]) or {"status": "failed"})
    assert cli.main([str(path), "--table", "questions", "--resume", *overrides]) == 0
    assert calls == []  # every row and the GEMM peak were kept


def test_questions_table_rounds_report_each_rows_median_round(tmp_path, model_dir, monkeypatch, capsys):  # noqa: F811
    # benchmark.rounds: the row list measured round-robin, a fresh worker per measurement; each row is its median
    # round (the lower median for two) with every round's questions/s beside it.
    path = write_recipe(tmp_path, model_dir)
    argv = [
        str(path),
        "--table",
        "questions",
        "benchmark.rounds=2",
        "benchmark.baselines=[]",
        "benchmark.gemm_peak=false",
    ]
    order, run_worker = [], cli.run_worker
    monkeypatch.setattr(
        cli, "run_worker", lambda spec, work_dir: order.append(spec["id"]) or run_worker(spec, work_dir)
    )
    assert cli.main(argv) == 0, capsys.readouterr().err
    document = json.loads((tmp_path / "out" / cli.FILES["questions"][0]).read_text())
    ids = [row["id"] for row in document["rows"]]
    assert ids == ["transformers/MiniLM/fp32/full/b2", "qala/MiniLM/fp32/full/b2"] and order == ids * 2
    assert document["method"]["rounds"] == 2 and "lower median" in document["method"]["rounds_statistic"]
    for row in document["rows"]:
        assert row["status"] == "ok" and row["rounds"] == 2 and "f1_rounds" not in row  # deterministic engines
        speeds, rounds = row["questions_per_s_rounds"], document["round_results"][row["id"]]
        assert speeds == [r["questions_per_s"] for r in rounds] and row["questions_per_s"] == min(speeds)
        median = rounds[speeds.index(min(speeds))]
        assert all(row[key] == median[key] for key in ("seconds", "ms_p50", "ms_p99", "achieved_gmacs_per_s", "pid"))
    monkeypatch.setattr(cli, "run_worker", lambda spec, work_dir: order.append(spec["id"]) or {"status": "failed"})
    assert cli.main([*argv, "--resume"]) == 0 and len(order) == 4  # every round of every row was kept


class Killed(BaseException):
    """The run killed mid-round (KeyboardInterrupt would reach pytest)."""


def test_rounds_median_of_three_failure_and_resume_at_the_missing_round(tmp_path, model_dir, monkeypatch, capsys):  # noqa: F811
    # The harness alone, on workers that report made-up timings: which round is the row, what resume re-measures.
    bert, plain, qala = (
        "transformers/BERT-base/fp32/full/b2",
        "transformers/MiniLM/fp32/full/b2",
        "qala/MiniLM/fp32/full/b2",
    )
    speeds = {bert: [3.0, 1.0, 2.0], plain: [5.0, 6.0, 4.0], qala: [7.0, 9.0, 8.0]}  # questions/s per round
    calls, kill_at, fail = [], [4], {(bert, 3)}

    def worker_(spec, work_dir):
        if len(calls) in kill_at:
            kill_at.clear()
            raise Killed
        calls.append(spec["id"])
        n = calls.count(spec["id"])  # the round: the harness measures round after round
        if (spec["id"], n) in fail:
            return {"status": "failed", "error": f"round {n} broke"}
        f1 = 50.0 + (n if spec["engine"] == "qala" else 0)  # the qala row answers differently each round
        return {"status": "ok", "questions_per_s": speeds[spec["id"]][n - 1], "ms_p50": 10.0 * n, "f1": f1}

    monkeypatch.setattr(cli, "run_worker", worker_)
    argv = [str(write_recipe(tmp_path, model_dir)), "--table", "questions", "benchmark.rounds=3"]
    argv.append("benchmark.gemm_peak=false")
    with pytest.raises(Killed):
        cli.main(argv)
    saved = json.loads((tmp_path / "out" / cli.FILES["questions"][0]).read_text())
    assert [r["rounds"] for r in saved["rows"]] == [2, 1, 1] and calls == [bert, plain, qala, bert]
    assert cli.main([*argv, "--resume"]) == 1  # a row failed
    assert calls[4:] == [plain, qala, bert, plain, qala]  # the rounds missing, round-robin
    rows = {r["id"]: r for r in json.loads((tmp_path / "out" / cli.FILES["questions"][0]).read_text())["rows"]}
    assert (
        rows[bert]["status"] == "failed" and rows[bert]["error"] == "round 3 broke" and rows[bert]["failed_round"] == 3
    )
    assert rows[plain]["questions_per_s"] == 5.0 and rows[plain]["ms_p50"] == 10.0  # round 1: the median
    assert rows[plain]["questions_per_s_rounds"] == [5.0, 6.0, 4.0] and rows[plain]["rounds"] == 3
    assert "f1_rounds" not in rows[plain] and rows[qala]["f1_rounds"] == [51.0, 52.0, 53.0]
    assert rows[qala]["questions_per_s"] == 8.0 and rows[qala]["ms_p50"] == 30.0 and rows[qala]["f1"] == 53.0


def test_benchmark_rounds_below_one_is_refused_in_one_line(tmp_path, model_dir, capsys):  # noqa: F811
    path = write_recipe(tmp_path, model_dir)
    assert cli.main([str(path), "--table", "questions", "benchmark.rounds=0"]) == 2
    assert capsys.readouterr().err == f"error: {path}: benchmark.rounds: expected >= 1, got 0\n"
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_shipped_questions_recipe_loads(monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    path = REPO / "benchmarks" / "real_questions.yaml"
    assert path.read_text().startswith("# python -m qala.bench benchmarks/real_questions.yaml --table questions")
    if not (REPO.parent / "shared" / "models" / "minilm-lat-squad-offline").is_dir():
        pytest.skip("needs ../shared/models/minilm-lat-squad-offline and ../shared/data/squad-v1.1 (not in a clone)")
    recipe = load_recipe(path)
    assert recipe.data.max_eval_samples >= 400 and recipe.benchmark.batch_sizes == [1, 32]
    assert recipe.benchmark.rounds == 3  # the median of three round-robin rounds
    assert AutoConfig.from_pretrained(recipe.benchmark.model).num_hidden_layers == 6


def test_qala_rows_through_named_serving_engines(tmp_path, model_dir):  # noqa: F811
    overrides = [f"benchmark.int8_model={model_dir}"]
    recipe = load_recipe(write_recipe(tmp_path, model_dir), overrides)
    rows, _ = plan.plan_rows(recipe, "questions", qala_backends=["eager", "compile-dynamic"])
    qala = [r["id"] for r in rows if r["engine"] == "qala"]
    assert qala == ["qala:eager/MiniLM/fp32/full/b2", "qala:compile-dynamic/MiniLM/fp32/full/b2"] + [
        "qala:eager/MiniLM/int8/full/b2",
        "qala:compile-dynamic/MiniLM/int8/full/b2",
    ]
    pytest.importorskip("qala.quantize.engines")
    eager = worker.measure(spec_for(model_dir, tmp_path, backend="eager"))
    assert eager["backend"] == "eager" and eager["f1"] == worker.measure(spec_for(model_dir, tmp_path))["f1"]


def test_qala_rows_run_a_requests_windows_in_length_groups(tmp_path, model_dir):  # noqa: F811
    # Batch 32 padded every window to the request's longest: a request's windows are sorted and grouped per
    # 32 tokens, one call per group, and the logits at each window's real positions are unchanged.
    from qala.model import LengthAdaptiveForQuestionAnswering

    model = LengthAdaptiveForQuestionAnswering.from_pretrained(model_dir).eval()
    lengths = [70, 12, 100, 40, 35, 9, 64]
    width = max(lengths)
    ids = torch.randint(5, 600, (len(lengths), width), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    inputs = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    calls = []

    def predict(batch):
        calls.append((tuple(batch["input_ids"].shape), batch["attention_mask"].sum(dim=1).tolist()))
        with torch.no_grad():
            out = model(**batch)
        return out.start_logits.numpy(), out.end_logits.numpy()

    start, end = worker.grouped(predict)(inputs)
    assert sum(rows for (rows, _), _ in calls) == len(lengths) and len(calls) > 1
    for (_, cut), real in calls:
        assert cut == max(real) and cut - min(real) < 32, real  # each window padded by < 32 positions
    calls.clear()
    whole_start, whole_end = predict(inputs)
    for b, n in enumerate(lengths):
        assert abs(start[b, :n] - whole_start[b, :n]).max() < 1e-4 and abs(end[b, :n] - whole_end[b, :n]).max() < 1e-4
    # Padded to a row's multiple (compiled rows): every group's width is a multiple, never past the batch.
    assert [cut for _, cut in worker.length_groups(inputs, multiple=32)] == [32, 64, 96, 100]


def test_self_quantizing_int8_rows_need_no_int8_model(tmp_path, model_dir):  # noqa: F811
    # onnxruntime-int8 / openvino-int8 quantize the fp32 model themselves: their INT8 rows (full length and
    # frontier) start from benchmark.model; an engine running INC's INT8 artifact still needs int8_model.
    frontier = {
        "backend": "int8",
        "max_seq_length": 64,
        "frontier": [{"keep_ratios": [0.9, 0.6], "f1": 20.0, "cost": 1.0}],
    }
    (tmp_path / "frontier.json").write_text(json.dumps(frontier))
    overrides = [f"benchmark.frontier={tmp_path}/frontier.json"]
    overrides.append("benchmark.frontier_dtypes=[int8]")
    recipe = load_recipe(write_recipe(tmp_path, model_dir), overrides)
    assert recipe.benchmark.int8_model is None
    backends = ["eager", "onnxruntime-int8", "openvino-int8"]
    rows, _ = plan.plan_rows(recipe, "questions", qala_backends=backends)
    int8 = {r["id"]: r for r in rows if r["engine"] == "qala" and r["dtype"] == "int8"}
    assert set(int8) == {
        "qala:onnxruntime-int8/MiniLM/int8/full/b2",
        "qala:openvino-int8/MiniLM/int8/full/b2",
        "qala:onnxruntime-int8/QuaLA-MiniLM/int8/kr-0.9-0.6/b2",
        "qala:openvino-int8/QuaLA-MiniLM/int8/kr-0.9-0.6/b2",
    }
    assert all(r["path"] == str(model_dir) for r in int8.values())


def test_inc_engines_plan_int8_rows_only_on_the_int8_artifact(tmp_path, model_dir, tiny_int8_artifact, capsys):  # noqa: F811
    # onnxruntime-inc / openvino-inc serve INC's INT8 artifact as tuned and refuse an fp32 model: no fp32 row is
    # theirs (the fp32 rows run load_model), their INT8 rows run benchmark.int8_model; openvino-inc is full length
    # only, so no frontier row. Both tables.
    frontier = {"backend": "int8", "max_seq_length": 64}
    frontier["frontier"] = [{"keep_ratios": [0.9, 0.6], "f1": 20.0, "cost": 1.0}]
    (tmp_path / "frontier.json").write_text(json.dumps(frontier))
    overrides = [f"benchmark.int8_model={tiny_int8_artifact}", f"benchmark.frontier={tmp_path}/frontier.json"]
    recipe = load_recipe(write_recipe(tmp_path, model_dir), [*overrides, "benchmark.frontier_dtypes=[int8]"])
    rows, notes = plan.plan_rows(recipe, "questions", qala_backends=["onnxruntime-inc", "openvino-inc"])
    qala = {r["id"]: r for r in rows if r["engine"] == "qala"}
    assert set(qala) == {
        "qala/MiniLM/fp32/full/b2",
        "qala:onnxruntime-inc/MiniLM/int8/full/b2",
        "qala:openvino-inc/MiniLM/int8/full/b2",
        "qala:onnxruntime-inc/QuaLA-MiniLM/int8/kr-0.9-0.6/b2",
    }
    assert notes["full_length_only"] == ["openvino-inc"]
    inc = [r for r in qala.values() if r.get("backend")]
    assert all(r["dtype"] == "int8" and r["path"] == str(tiny_int8_artifact) for r in inc)
    assert qala["qala/MiniLM/fp32/full/b2"]["path"] == str(model_dir)
    padded, _ = plan.plan_rows(recipe, "padded", qala_backends=["onnxruntime-inc"])
    by_backend = {(r["dtype"], r.get("backend")) for r in padded if r["engine"] == "qala" and not r.get("arch")}
    assert by_backend == {("fp32", None), ("int8", "onnxruntime-inc")}
    # Named without an INT8 artifact in the recipe, it is refused before anything runs (it would plan no row).
    argv = [str(write_recipe(tmp_path, model_dir)), "--table", "questions", "--qala-backend", "onnxruntime-inc"]
    assert cli.main(argv) == 2
    refused = "--qala-backend onnxruntime-inc serves an INC INT8 artifact: set benchmark.int8_model"
    assert refused in capsys.readouterr().err
    # The row says how it was quantized as onnxruntime-int8's does (`quantization`, from the engine's facts):
    # INC's configuration, not a re-quantization; the worker reads the INT8 artifact for it.
    if not plan.onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    from qala.quantize.qdq import INC_QDQ_METHOD

    spec = {**qala["qala:onnxruntime-inc/MiniLM/int8/full/b2"], "work_dir": str(tmp_path / "work")}
    _, facts = peers._qala_engine(spec, tmp_path / "work", {})
    assert facts["backend"] == "onnxruntime-inc" and facts["quantization"] == INC_QDQ_METHOD
    assert "quantize_dynamic" not in facts["quantization"]


def test_benchmark_openvino_switches_the_openvino_peers(tmp_path, model_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(plan, "openvino_available", lambda: True)
    monkeypatch.setattr(plan, "openvino_bf16_native", lambda: False)
    ids = {}
    for value in ("true", "false"):
        recipe = load_recipe(write_recipe(tmp_path, model_dir), [f"benchmark.openvino={value}"])
        rows, _ = plan.plan_rows(recipe, "questions")
        ids[value] = {r["id"] for r in rows if r["engine"] == "openvino"}
    # benchmark.onnxruntime is false in this recipe: the OpenVINO peers follow their own key.
    assert ids["true"] == {"openvino/MiniLM/fp32/full/b2", "openvino/MiniLM/int8/full/b2"} and not ids["false"]


@pytest.mark.skipif(not plan.onnxruntime_available(), reason="onnxruntime not installed")
def test_the_gemm_peak_runs_on_qala_quantize_onnx(tmp_path):
    from qala.bench import roofline

    assert roofline._onnx_matmul(16, tmp_path, int8=True)[0]()[0].shape == (16, 16)
    assert not hasattr(peers, "onnx_session") and not hasattr(peers, "quantize_onnx")  # one builder, one quantizer
