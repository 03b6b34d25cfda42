"""The benchmark harness: statistics, speedups, the table, planning, resume, partial runs, run_cpu, end to end.

Orchestration tests replace the worker process with a fake (no timing); one test runs the real workers
on tiny models (2 layers, hidden 32) and a tiny uncompiled INT8 artifact.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from qala.bench import cli, peers, plan, report
from qala.model import LengthAdaptiveForQuestionAnswering, macs_per_sample
from qala.recipe import RecipeError, load_recipe
from qala.utils import latency_stats
from tests.conftest import REPO, kill_9_when

TINY = "{hidden_size: 32, num_attention_heads: 4, intermediate_size: 64, vocab_size: 800"
RECIPE = """\
# python -m qala.bench {tmp}/bench.yaml
data:
  train: package://qala/samples/squad_sample_train.json
  eval: package://qala/samples/squad_sample_dev.json
  max_seq_length: 64
  doc_stride: 32
benchmark:
  output_dir: {tmp}/out
  model: {model}
  windows: 6
  batch_sizes: [1, 2]
  threads: 1
  warmup: 1
  repeats: 3
  latency_repeats: 5
  min_repeats: 2
  baselines: [bert-base, dynamic-tinybert]
  baseline_configs:
    bert-base: {tiny}, num_hidden_layers: 4}}
    tinybert-6l: {tiny}, num_hidden_layers: 2}}
    dynamic-tinybert: {tiny}, num_hidden_layers: 2}}
  onnxruntime: false
  gemm_peak: false
  core_sweep: false
"""


def write_recipe(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(RECIPE.format(tmp=tmp_path, model=model, tiny=TINY) + extra)
    return path


@pytest.fixture
def model_dir(tmp_path, tiny_checkpoint):
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


# ------------------------------------------------------------------ statistics, derived columns, the table


def test_percentiles_and_summary():
    # Percentiles come from the one timer's statistics (qala.utils.latency_stats: seconds in, ms out).
    assert latency_stats([0.001, 0.002, 0.003, 0.004])["p50_ms"] == 2.5
    assert latency_stats([0.005])["p99_ms"] == 5
    assert latency_stats([i / 1000 for i in range(1, 11)])["p90_ms"] == pytest.approx(9.1)
    summary = report.summarize([0.010, 0.020, 0.030], batch_size=8)
    assert summary["median_ms"] == 20.0 and summary["samples_per_s"] == 400.0
    assert summary["p50_ms"] == 20.0 and summary["p99_ms"] == pytest.approx(29.8)
    with pytest.raises(ValueError):
        report.summarize([], 1)


def synthetic_row(row_id, name, dtype, thr1, thr32, macs=None, **extra):
    return {
        "id": row_id,
        "name": name,
        "dtype": dtype,
        "length_config": None,
        "status": "ok",
        "macs_per_sample": macs,
        "batches": {
            "1": {"samples_per_s": thr1, "p50_ms": 1000 / thr1},
            "32": {"samples_per_s": thr32, "p50_ms": 32000 / thr32},
        },
        **extra,
    }


def synthetic_document():
    rows = [
        synthetic_row(
            plan.REFERENCE_ID,
            "BERT-base",
            "fp32",
            2.0,
            2.5,
            macs=int(35e9),
            f1=88.5,
            f1_published=True,
            size_bytes=435_000_000,
            size_kind="parameter_bytes",
        ),
        synthetic_row(
            "minilm/int8/full",
            "MiniLM",
            "int8",
            40.0,
            100.0,
            macs=int(5e9),
            f1=55.14,
            f1_published=False,
            size_bytes=91_000_000,
            size_kind="directory",
        ),
        synthetic_row("minilm/fp32/lc-1", "MiniLM", "fp32", 10.0, 0.0001, macs=None, f1=None),
        {"id": "broken/fp32/full", "name": "broken", "dtype": "fp32", "status": "failed", "error": "boom"},
    ]
    return {
        "rows": rows,
        "method": {"batch_sizes": [1, 32], "threads": 2, "latency_repeats": 30, "repeats": 10, "warmup": 2},
    }


def test_speedups_and_roofline_against_bert_base_of_the_same_run():
    document = synthetic_document()
    report.add_derived(document["rows"], {"fp32_gmacs_per_s": 100.0, "int8_gmacs_per_s": 1000.0})
    bert, int8, no_macs, broken = document["rows"]
    assert bert["speedup_vs_bert_base"] == {"1": 1.0, "32": 1.0}
    assert int8["speedup_vs_bert_base"] == {"1": 20.0, "32": 40.0}
    assert bert["achieved_gmacs_per_s"]["32"] == pytest.approx(87.5)
    assert bert["peak_fraction"]["32"] == pytest.approx(0.875)
    assert int8["peak_fraction"]["32"] == pytest.approx(0.5)  # against the INT8 peak, not the fp32 one
    assert "achieved_gmacs_per_s" not in no_macs and "speedup_vs_bert_base" not in broken
    # Without a BERT-base row there is no speedup, and it says so rather than inventing a reference.
    rows = copy.deepcopy(document["rows"][1:])
    report.add_derived(rows, None)
    assert rows[0]["speedup_vs_bert_base"] is None and rows[0]["peak_fraction"] is None


def test_markdown_table_shape_and_markers():
    document = synthetic_document()
    report.add_derived(document["rows"], {"fp32_gmacs_per_s": 100.0, "int8_gmacs_per_s": 1000.0})
    table = report.format_table(document)
    lines = table.splitlines()
    assert lines[0].startswith("| model | dtype | length config | size MB | F1 | b1 p50 ms | samples/s b1 |")
    assert lines[0].endswith("| GMACs/sample | % of peak b32 | speedup b1 | speedup b32 |")
    assert lines[2] == (
        "| BERT-base | fp32 | full | 435.0 (params) | 88.50 (published) | 500.0 | 2.00 | 2.50 | 35.00 | 87.5% "
        "| 1.00x | 1.00x |"
    )
    assert "| MiniLM | int8 | full | 91.0 | 55.14 | 25.0 | 40.00 | 100.00 | 5.00 | 50.0% | 20.00x | 40.00x |" in table
    assert "| MiniLM | fp32 | full | - | - |" in table  # unknown values are dashes, never zeros
    assert len([line for line in lines if line.startswith("| ")]) == 4  # header + 3 measured rows
    assert "- broken/fp32/full: failed: boom" in table


# ------------------------------------------------------------------ planning


def test_pick_frontier():
    frontier = [{"length_config": [i], "cost": i, "f1": f1} for i, f1 in enumerate([40, 50, 54, 55, 56])]
    assert [p["cost"] for p in plan.pick_frontier(frontier, 3)] == [0, 2, 4]
    assert [p["cost"] for p in plan.pick_frontier(frontier, 1)] == [4]  # the most accurate first
    # Full fp32 F1 55.5: the cheapest point within 1% relative (>= 54.945) comes first.
    assert [p["cost"] for p in plan.pick_frontier(frontier, 2, full_f1=55.5)] == [3, 4]
    assert plan.pick_frontier(frontier, 0) == [] and plan.pick_frontier([], 3) == []
    assert len(plan.pick_frontier(frontier, 10)) == 5
    # The full-length point (every layer at seq_length) is already a MiniLM row: never picked again.
    assert [p["cost"] for p in plan.pick_frontier(frontier, 1, seq_length=4)] == [3]
    # A search's own full-length F1 (same questions as its points) is found in its frontier or its curve.
    keep_curve = [{"keep_ratios": [0.9], "f1": 50}, {"keep_ratios": [1.0], "f1": 56.5}]
    curve = {"frontier": frontier, "keep_ratio_curve": keep_curve}
    assert plan.frontier_full_f1(curve, None) == 56.5
    assert plan.frontier_full_f1({"frontier": frontier}, 4) == 56 and plan.frontier_full_f1(None, 4) is None


def test_dynamic_tinybert_configuration_matches_the_published_speedup_in_macs():
    tinybert, bert = BertConfig(num_hidden_layers=6), BertConfig()
    lengths, ratio = plan.dynamic_tinybert_length_config(tinybert, bert, 384)
    assert len(lengths) == 6 and lengths == sorted(lengths, reverse=True)
    speedup = macs_per_sample(bert, None, 384) / macs_per_sample(tinybert, lengths, 384)
    assert abs(speedup - plan.DYNAMIC_TINYBERT_SPEEDUP) < 0.1 and 0.8 < ratio < 0.9


def test_plan_rows_ids_macs_f1_and_frontier(tmp_path, model_dir):
    frontier = {
        "backend": "int8",
        "max_seq_length": 64,
        "frontier": [
            {"length_config": [40, 20], "cost": 1.0, "f1": 20.0},
            {"length_config": [60, 50], "cost": 2.0, "f1": 30.0},
        ],
    }
    (tmp_path / "frontier.json").write_text(json.dumps(frontier))
    (tmp_path / "eval.json").write_text(json.dumps({"results": {"full": {"f1": 31.0}}}))
    path = write_recipe(tmp_path, model_dir)
    recipe = load_recipe(
        path,
        [
            f"benchmark.int8_model={model_dir}",
            f"benchmark.frontier={tmp_path}/frontier.json",
            f"benchmark.fp32_eval={tmp_path}/eval.json",
            "benchmark.max_frontier_rows=1",
            "benchmark.f1={'QuaLA-MiniLM/fp32/lc-60-50': 29.5}",
        ],
    )
    rows, notes = plan.plan_rows(recipe)
    by_id = {r["id"]: r for r in rows}
    dyn = rows[1]
    assert dyn["id"] == plan.row_id("Dynamic-TinyBERT", "fp32", dyn["length_config"])
    assert list(by_id) == [
        plan.REFERENCE_ID,
        dyn["id"],
        "MiniLM/fp32/full",
        "MiniLM/int8/full",
        "QuaLA-MiniLM/fp32/lc-60-50",
        "QuaLA-MiniLM/int8/lc-60-50",
    ]
    bert = by_id["BERT-base/fp32/full"]
    assert bert["f1"] == 88.5 and bert["f1_published"] and "Devlin" in bert["f1_source"]
    assert bert["macs_per_sample"] == macs_per_sample(BertConfig(**bert["arch"]), None, 64)
    assert dyn["kind"] == "length_adaptive_random" and "constant keep ratio" in dyn["length_config_source"]
    assert by_id["MiniLM/fp32/full"]["f1"] == 31.0 and not by_id["MiniLM/fp32/full"]["f1_published"]
    assert by_id["MiniLM/int8/full"]["f1"] is None  # no report given: no number
    # The frontier F1 was measured for INT8; the fp32 twin has only what the recipe states.
    assert by_id["QuaLA-MiniLM/int8/lc-60-50"]["f1"] == 30.0
    assert by_id["QuaLA-MiniLM/fp32/lc-60-50"]["f1"] == 29.5
    assert notes["frontier"]["chosen"] == [[60, 50]]
    assert notes["ipex"]["status"] == "skipped" and "benchmarks/ipex_env.sh" in notes["ipex"]["build_command"]


# ------------------------------------------------------------------ run_cpu


def test_run_cpu_command_switches_off_what_is_missing():
    cmd = cli.run_cpu_command(
        "s.json", "out", ninstances=2, ncores_per_instance=1, numactl=False, iomp=False, allocator=False
    )
    assert cmd[:3] == [sys.executable, "-m", "torch.backends.xeon.run_cpu"]
    assert cmd[3:7] == ["--ninstances", "2", "--ncores-per-instance", "1"]
    assert {"--disable-numactl", "--disable-iomp", "--use-default-allocator"} <= set(cmd)
    assert cmd[-6:] == ["--no-python", sys.executable, "-m", "qala.bench.worker", "s.json", "out"]
    full = cli.run_cpu_command(
        "s.json", "out", ninstances=1, ncores_per_instance=4, numactl=True, iomp=True, allocator=True
    )
    assert not {"--disable-numactl", "--disable-iomp", "--use-default-allocator"} & set(full)


# ------------------------------------------------------------------ recipe errors


def test_benchmark_recipe_errors_name_their_key_and_exit_2(tmp_path, model_dir, capsys):
    path = write_recipe(tmp_path, model_dir)
    assert cli.main([str(path), "benchmark.batch_size=[1]", "benchmark.baselines=[bert-large]"]) == 2
    err = capsys.readouterr().err
    assert "benchmark.batch_size: unknown key (did you mean 'batch_sizes'?)" in err
    assert "benchmark.baselines[0]: expected one of ['bert-base', 'tinybert-6l', 'dynamic-tinybert']" in err
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["benchmark.batch_sizes=[0]", "benchmark.repeats=0", "benchmark.f1={a: high}"])
    assert "batch_sizes" in str(e.value) and "repeats: expected >= 1" in str(e.value) and "f1:" in str(e.value)
    with pytest.raises(RecipeError, match="benchmark.int8_model: file or directory not found"):
        load_recipe(path, [f"benchmark.int8_model={tmp_path}/missing"])
    with pytest.raises(RecipeError, match="baseline_configs: unknown baselines"):
        load_recipe(path, ["benchmark.baseline_configs={bert-huge: {}}"])


def test_shipped_bench_recipe_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    path = REPO / "benchmarks" / "squad_bench.yaml"
    assert path.read_text().startswith("# python -m qala.bench benchmarks/squad_bench.yaml")
    overrides = []
    if not (REPO.parent / "shared" / "data" / "squad-v1.1").is_dir():
        overrides += [
            "data.train=package://qala/samples/squad_sample_train.json",
            "data.eval=package://qala/samples/squad_sample_dev.json",
        ]
    # The run's artifacts may not exist in a fresh clone: the rest of the recipe must still validate.
    for key in ("model", "int8_model", "frontier", "fp32_eval", "int8_report"):
        overrides.append(f"benchmark.{key}={tmp_path}")
    recipe = load_recipe(path, overrides)
    b = recipe.benchmark
    assert b.batch_sizes == [1, 8, 32] and recipe.data.max_seq_length == 384
    assert b.baselines == ["bert-base", "tinybert-6l", "dynamic-tinybert"] and b.time_budget_minutes


# ------------------------------------------------------------------ orchestration (fake workers)


def fake_worker(fail=(), calls=None):
    def run(spec, work_dir):
        if calls is not None:
            calls.append(spec["id"])
        if spec["kind"] == "gemm_peak":
            return {"status": "ok", "fp32_gmacs_per_s": 50.0, "int8_gmacs_per_s": 200.0}
        if spec["id"] in fail:
            return {"status": "failed", "error": "ValueError: broken row"}
        scale = 10.0 if spec["name"] == "BERT-base" else 40.0
        batches = {
            str(b): {"samples_per_s": scale * b, "median_ms": 1000 / scale, "p50_ms": 1000 / scale}
            for b in spec["batch_sizes"]
        }
        return {"status": "ok", "batches": batches, "peak_rss_mb": 100.0, "size_bytes": 10, "size_kind": "x"}

    return run


def test_partial_results_resume_and_time_budget(tmp_path, model_dir, monkeypatch):
    path = write_recipe(tmp_path, model_dir)
    path.write_text(path.read_text().replace("gemm_peak: false", "gemm_peak: true"))
    out = tmp_path / "out"
    monkeypatch.setattr(cli, "run_worker", fake_worker(fail={"MiniLM/fp32/full"}))
    assert cli.main([str(path)]) == 1  # a failed row: exit 1, the others kept
    document = json.loads((out / "bench.json").read_text())
    status = {r["id"]: r["status"] for r in document["rows"]}
    assert status.pop("MiniLM/fp32/full") == "failed" and set(status.values()) == {"ok"}
    dyn = next(r for r in document["rows"] if r["name"] == "Dynamic-TinyBERT")
    assert dyn["speedup_vs_bert_base"] == {"1": 4.0, "2": 4.0}
    assert "cpu_flags" in document["environment"] and document["method"]["windows"] == 6
    assert "ValueError: broken row" in (out / "bench.md").read_text()

    # --resume measures only what is missing (the failed row), even with other sweep/peer settings.
    calls = []
    monkeypatch.setattr(cli, "run_worker", fake_worker(calls=calls))
    assert cli.main([str(path), "--resume", "benchmark.onnxruntime=false"]) == 0
    assert calls == ["MiniLM/fp32/full"]
    # A changed row spec (repeats) is measured again; a changed input set (windows) redoes everything.
    calls.clear()
    assert cli.main([str(path), "--resume", "benchmark.repeats=4"]) == 0
    assert "gemm_peak" not in calls and len(calls) == 3

    # Over budget: nothing new starts, the rows say why.
    monkeypatch.setattr(cli.Harness, "over_budget", lambda self: True)
    assert cli.main([str(path), "benchmark.windows=5"]) == 0
    document = json.loads((out / "bench.json").read_text())
    assert document["budget_exhausted"] and {r["status"] for r in document["rows"]} == {"skipped"}


# Measures like `python -m qala.bench RECIPE` with fake_worker rows (no timing), but hangs in its third worker
# call (the GEMM peak and one row saved) after touching MARKER.
KILLED_BENCH = """
import sys, time
from qala.bench import cli
from tests.test_bench import fake_worker
measure, calls = fake_worker(), []
def measure_then_hang(spec, work_dir):
    calls.append(spec["id"])
    if len(calls) == 3:
        open(sys.argv[2], "w").close()
        time.sleep(600)
    return measure(spec, work_dir)
cli.run_worker = measure_then_hang
sys.exit(cli.main([sys.argv[1]]))
"""


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, model_dir, monkeypatch):
    recipes = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        recipes[name] = write_recipe(tmp_path / name, model_dir)
        recipes[name].write_text(recipes[name].read_text().replace("gemm_peak: false", "gemm_peak: true"))
    monkeypatch.setattr(cli, "run_worker", fake_worker())
    assert cli.main([str(recipes["straight"])]) == 0

    marker = tmp_path / "in-row-2"
    args = ["-c", KILLED_BENCH, str(recipes["killed"]), str(marker)]
    kill_9_when(marker, args, "its third worker call")
    out = tmp_path / "killed" / "out"
    saved = json.loads((out / "bench.json").read_text())
    assert saved["gemm_peak"]["status"] == "ok" and len(saved["rows"]) == 1
    assert (out / "recipe.yaml").is_file()

    calls = []
    monkeypatch.setattr(cli, "run_worker", fake_worker(calls=calls))
    assert cli.main([str(recipes["killed"]), "--resume"]) == 0  # the killed run's lock went with it
    assert saved["rows"][0]["id"] not in calls and "gemm_peak" not in calls and len(calls) == 2

    def results(name):
        document = json.loads((tmp_path / name / "out" / "bench.json").read_text())
        return document["fingerprint"], document["gemm_peak"], document["rows"]

    assert results("killed") == results("straight")


# ------------------------------------------------------------------ end to end (real workers)


def test_end_to_end_on_tiny_models(tmp_path, model_dir, tiny_int8_artifact, capsys):
    extra = f"""\
  int8_model: {tiny_int8_artifact}
  compile_int8: false
  baselines: [bert-base]
  onnxruntime: false  # the ONNX peer is tested in-process below (each worker costs an interpreter start)
  gemm_peak: true
  gemm_size: 64
  core_sweep: true
  cores: [1]
  instances: []
  sweep_batch_size: 2
  sweep_repeats: 2
"""
    path = write_recipe(tmp_path, model_dir)
    path.write_text(
        path.read_text()
        .replace("  baselines: [bert-base, dynamic-tinybert]\n", "")
        .replace("  onnxruntime: false\n  gemm_peak: false\n  core_sweep: false\n", "")
        + extra
    )
    assert cli.main([str(path)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    document = json.loads((out / "bench.json").read_text())
    rows = {r["id"]: r for r in document["rows"]}
    assert set(rows) == {
        "BERT-base/fp32/full",
        "MiniLM/fp32/full",
        "MiniLM/int8/full",
    }
    for row in rows.values():
        assert row["status"] == "ok", (row["id"], row.get("error"))
        assert set(row["batches"]) == {"1", "2"} and row["batches"]["1"]["repeats"] >= 2
        assert row["peak_rss_mb"] > 50 and row["size_bytes"] > 0
        assert row["speedup_vs_bert_base"]["1"] > 0 and row["achieved_gmacs_per_s"]["2"] > 0
    assert rows["BERT-base/fp32/full"]["size_kind"] == "parameter_bytes"
    assert rows["MiniLM/int8/full"]["compiled"] is False
    peak = document["gemm_peak"]
    assert peak["status"] == "ok" and peak["fp32_gmacs_per_s"] > 0 and peak["int8_gmacs_per_s"] > 0
    assert peak["int8_method"]
    sweep = document["core_sweep"]["runs"]
    assert [s["row"] for s in sweep] == ["BERT-base/fp32/full", "MiniLM/int8/full"]
    for s in sweep:
        assert s["status"] == "ok", s.get("error")
        assert "torch.backends.xeon.run_cpu" in s["command"] and s["total_samples_per_s"] > 0
        assert s["instances"][0]["threads"] == 1
    for name in ("bench.md", "f1_vs_speedup.png", "throughput_vs_cores.png"):
        assert (out / name).is_file(), name
    assert (out / "f1_vs_speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert "| BERT-base | fp32 | full |" in capsys.readouterr().out


def test_onnxruntime_peer_exports_a_length_configuration_exactly(tmp_path, model_dir):
    pytest.importorskip("onnxruntime")
    spec = {"path": str(model_dir), "length_config": [40, 20], "seq_length": 64, "dtype": "fp32", "threads": 1}
    call, facts = peers.onnx_model(spec, tmp_path / "onnx")
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(5, 600, (3, 64), generator=g),
        "attention_mask": torch.ones(3, 64, dtype=torch.long),
        "token_type_ids": torch.zeros(3, 64, dtype=torch.long),
    }
    batch["attention_mask"][1, 50:] = 0
    start, _ = call(batch)  # batch 3, exported with batch 2: the batch dimension is dynamic
    with torch.no_grad():
        model = LengthAdaptiveForQuestionAnswering.from_pretrained(model_dir).eval()
        reference = model(**batch, length_config=[40, 20]).start_logits
    assert (torch.from_numpy(start) - reference).abs().max().item() < 1e-4
    assert facts["size_kind"] == "onnx file" and facts["size_bytes"] > 0
    int8_call, int8_facts = peers.onnx_model({**spec, "dtype": "int8"}, tmp_path / "onnx8")
    assert int8_call(batch)[0].shape == (3, 64) and "quantize_dynamic" in int8_facts["quantization"]


def test_peak_memory_is_the_workers_own_not_its_parents():
    # Linux keeps ru_maxrss across execve: a worker started by a large parent must not report its parent's peak.
    big = bytearray(400 * 1024 * 1024)
    code = "from qala.bench.worker import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert float(out.stdout) < 200 and len(big) > 0


def test_headline_table_names_a_qala_row_without_a_serving_backend():
    # A qala row with no --qala-backend runs load_model: the table named it by a backend it does not have (KeyError).
    path = Path(__file__).parents[1] / "benchmarks" / "results" / "openvino_int8_keep_zen5" / "real_questions.json"
    table = report.format_headline_table(json.loads(path.read_text()), path)
    assert "| qala (load_model) | fp32 | full |" in table and "| qala `openvino-int8` | int8 | full |" in table
