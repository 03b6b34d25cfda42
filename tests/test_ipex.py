"""The IPEX backend (qala.quantize.ipex) on a tiny model, run in the IPEX environment.

IPEX 2.8 needs torch 2.8, so it cannot run in qala's main environment: these tests drive
`.venv-ipex/bin/python` (built by `bash benchmarks/ipex_env.sh`; another interpreter through
QALA_IPEX_PYTHON) in a subprocess and compare its INT8 logits with fp32 logits computed here. Where that
environment is absent (CI), they skip and say so; where it is built but IPEX does not import, they fail
(a broken environment is a defect to fix, not a reason to pass). No timing is asserted.
"""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qala.model import LengthAdaptiveForQuestionAnswering
from tests.conftest import REPO

IPEX_PYTHON = Path(os.environ.get("QALA_IPEX_PYTHON", REPO / ".venv-ipex" / "bin" / "python"))
LENGTH_CONFIG = [40, 24]  # of 64 padded positions, 2 layers
SEQ, BATCH = 64, 4
# INT8 vs fp32 on the tiny random model (hidden 32): the largest logit error on real positions must stay
# within 5% of the largest fp32 logit. Seen: 0.9-1.1% (max error about 0.003 on logits up to 0.29).
RELATIVE_TOLERANCE = 0.05
# The driver's exit status when IPEX is installed but unusable (a failure, with its message).
EXIT_IPEX_UNAVAILABLE = 77

DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from qala.quantize import ipex

    model_dir, work = sys.argv[1], sys.argv[2]
    try:
        ipex.import_ipex()
    except ipex.IpexUnavailableError as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_IPEX_UNAVAILABLE)
    from qala.model import LengthAdaptiveForQuestionAnswering

    data = load_file(f"{work}/inputs.safetensors")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batch = {k: data[k] for k in keys}
    calibration = [{k: data[f"cal{i}.{k}"] for k in keys} for i in range(3)]
    length_config = json.loads(sys.argv[3])
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(model_dir).eval()

    qa = ipex.IpexStaticQA(model, calibration)
    out, facts = {}, {"versions": ipex.versions()}
    for name, lengths in (("full", None), ("cut", length_config)):
        result = qa(length_config=lengths, **batch)
        out[f"{name}.start"], out[f"{name}.end"] = result.start_logits, result.end_logits
        one = qa(length_config=lengths, **{k: v[:1] for k, v in batch.items()})  # another shape, another graph
        out[f"{name}.start_b1"] = one.start_logits
        graph = qa.graph(lengths, **batch)
        facts[name] = {
            "calibrated_with": qa.calibrated_with[None if lengths is None else tuple(lengths)],
            "int8_ops": "quantize_per_tensor" in str(graph.graph_for(*(batch[k] for k in keys))),
        }
    # Full length: the one trace serves an unpadded window of another length, exactly as its own trace would.
    short = {k: v[1:2, :30].contiguous() for k, v in batch.items()}
    out["short.reused"] = qa(**short).start_logits
    out["short.own"] = ipex.build(model, None, qa.summary(None), short)(*(short[k] for k in keys))[0]
    facts["full_graphs"] = sum(1 for key in qa._traced if key[0] is None)
    try:  # keep ratios (top-k sizes per row) cannot be traced: refused, never served as full length
        qa(keep_ratios=[0.5, 0.5], **batch)
        facts["keep_ratios_refused"] = False
    except ValueError:
        facts["keep_ratios_refused"] = True
    # The worker path: calibration saved, reloaded in a fresh IpexStaticQA, no calibration data.
    qa.save_summaries(f"{work}/calibration.json")
    call, worker_facts = ipex.timing_callable(model_dir, length_config, batch, summaries=f"{work}/calibration.json")
    out["worker.start"], out["worker.end"] = call(batch)
    facts["worker"] = {k: worker_facts[k] for k in ("engine", "calibrated_with", "summaries_sha256")}
    save_file({k: v.contiguous() for k, v in out.items()}, f"{work}/outputs.safetensors")
    print(json.dumps(facts))
    """
).replace("EXIT_IPEX_UNAVAILABLE", str(EXIT_IPEX_UNAVAILABLE))


def _batch(seed: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """BATCH windows of SEQ positions: [CLS] question [SEP] context [SEP], then padding (real lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for row, real in enumerate((SEQ, 52, 45, 60)):
        mask[row, :real] = 1
        types[row, 12:real] = 1
        ids[row, 0], ids[row, 11], ids[row, real - 1] = 2, 3, 3
        ids[row, real:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def ipex_run(tiny_checkpoint, tmp_path_factory):
    """Run the driver once in the IPEX environment: (fp32 logits from here, its outputs, its facts)."""
    if not IPEX_PYTHON.is_file():
        pytest.skip(f"IPEX environment not built ({IPEX_PYTHON} missing): bash benchmarks/ipex_env.sh builds it")
    work = tmp_path_factory.mktemp("ipex")
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(tiny_checkpoint)).eval()
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    vocab = model.config.vocab_size
    batch = _batch(0, vocab)
    tensors = dict(batch)
    for i in range(3):
        tensors.update({f"cal{i}.{k}": v for k, v in _batch(100 + i, vocab).items()})
    save_file(tensors, str(work / "inputs.safetensors"))
    with torch.no_grad():
        fp32 = {
            name: model(**batch, length_config=lengths) for name, lengths in (("full", None), ("cut", LENGTH_CONFIG))
        }
    proc = subprocess.run(
        [str(IPEX_PYTHON), "-c", DRIVER, str(model_dir), str(work), json.dumps(LENGTH_CONFIG)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    if proc.returncode == EXIT_IPEX_UNAVAILABLE:
        pytest.fail(f"IPEX environment {IPEX_PYTHON} built but unusable: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    facts["work"] = str(work)
    return batch, fp32, load_file(str(work / "outputs.safetensors")), facts


@pytest.mark.parametrize("name", ["full", "cut"])
def test_ipex_int8_tracks_fp32(ipex_run, name):
    batch, fp32, out, facts = ipex_run
    assert facts[name]["calibrated_with"].startswith("inc "), facts  # INC's IPEX path ran, not the fallback
    assert facts[name]["int8_ops"], "the frozen graph has no quantize op: it is not INT8"
    real = batch["attention_mask"].bool()
    for side, expected in (("start", fp32[name].start_logits), ("end", fp32[name].end_logits)):
        got = out[f"{name}.{side}"]
        error = (got - expected)[real].abs().max().item()
        scale = expected[real].abs().max().item()
        assert 0 < error <= RELATIVE_TOLERANCE * scale, f"{name} {side}: max error {error:.4f}, fp32 max {scale:.4f}"


@pytest.mark.parametrize("name", ["full", "cut"])
def test_ipex_graphs_of_other_batch_sizes_agree(ipex_run, name):
    _, _, out, _ = ipex_run
    torch.testing.assert_close(out[f"{name}.start_b1"][0], out[f"{name}.start"][0], atol=1e-4, rtol=0)


def test_ipex_full_length_serves_every_shape_from_one_trace(ipex_run):
    """Unpadded windows of any length run through the one full-length graph, which gives what a graph
    traced at their own shape gives (so the real-questions rows need no per-shape builds)."""
    _, _, out, facts = ipex_run
    assert facts["full_graphs"] == 1
    torch.testing.assert_close(out["short.reused"], out["short.own"], atol=1e-5, rtol=0)


def test_ipex_worker_reloads_the_calibration_exactly(ipex_run):
    """timing_callable on a saved calibration serves the same INT8 model (what the benchmark times)."""
    _, _, out, facts = ipex_run
    assert facts["worker"]["engine"] == "ipex" and facts["worker"]["calibrated_with"].startswith("inc ")
    assert len(facts["worker"]["summaries_sha256"]) == 64
    assert torch.equal(out["worker.start"], out["cut.start"]) and torch.equal(out["worker.end"], out["cut.end"])


def test_padded_table_worker_times_an_ipex_row_in_the_ipex_environment(ipex_run, tmp_path):
    """`python -m qala.bench.worker` under the IPEX python measures a padded-table row of kind "ipex"."""
    batch, _, _, facts = ipex_run
    work = Path(facts["work"])
    save_file(batch, str(tmp_path / "inputs.safetensors"))
    spec = {
        "id": "MiniLM-IPEX/int8/lc-40-24",
        "kind": "ipex",
        "dtype": "int8",
        "length_config": LENGTH_CONFIG,
        "path": str(work / "model"),
        "ipex_summaries": str(work / "calibration.json"),
        "inputs": str(tmp_path / "inputs.safetensors"),
        "work_dir": str(tmp_path),
        "batch_sizes": [1, 4],
        "threads": 1,
        "warmup": 1,
        "repeats": 2,
        "latency_repeats": 2,
        "min_repeats": 1,
        "max_seconds_per_measurement": 5,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [str(IPEX_PYTHON), "-m", "qala.bench.worker", str(tmp_path / "spec.json"), str(tmp_path / "row.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["engine"] == "ipex" and row["calibrated_with"].startswith("inc ")
    assert set(row["batches"]) == {"1", "4"} and all(v["p50_ms"] > 0 for v in row["batches"].values())


def test_ipex_refuses_keep_ratios(ipex_run):
    assert ipex_run[3]["keep_ratios_refused"]


def test_without_ipex_every_entry_point_names_the_environment_script():
    from qala.quantize import ipex

    installed, _ = ipex.ipex_status()
    if installed is not None and torch.__version__.startswith(ipex.REQUIRED_MINOR):
        pytest.skip("IPEX is usable in this interpreter; the error path is for environments without it")
    with pytest.raises(ipex.IpexUnavailableError, match=r"benchmarks/ipex_env\.sh"):
        ipex.import_ipex()
    with pytest.raises(ipex.IpexUnavailableError, match=r"torch 2\.8\.x and intel-extension-for-pytorch 2\.8\.x"):
        ipex.calibrate(torch.nn.Linear(2, 2), None, [])


# ------------------------------------------------------------------ the padded table's IPEX rows (no IPEX needed)


def test_padded_table_plans_ipex_rows_beside_the_tuned_configurations(tmp_path, tiny_checkpoint):
    """With a ratio-unit frontier, the padded table takes the absolute configurations qala.tune scored (both F1s
    from its report); IPEX rows run at full length and at each of those it was calibrated for, under the IPEX
    environment's python, with the whole-dev F1 python -m qala.bench.ipex measured."""
    from qala.bench import plan
    from qala.recipe import load_recipe
    from tests.test_bench import write_recipe

    report = {
        "final": {
            "rows": {
                "full": {"length_config": None, "fp32": {"f1": 31.0}, "int8": {"f1": 30.5}},
                "keep_0.9": {"length_config": [40, 20], "fp32": {"f1": 29.0}, "int8": {"f1": 28.5}},
                "ratio_0.9": {
                    "length_config": None,
                    "keep_ratios": [0.9, 0.81],
                    "fp32": {"f1": 20.0},
                    "int8": {"f1": 19.0},
                },
            }
        }
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    point = {"keep_ratios": [0.9, 0.5], "cost": 1.0, "f1": 25.0}
    frontier = {"backend": "fp32", "max_seq_length": 64, "frontier": [point]}
    (tmp_path / "frontier.json").write_text(json.dumps(frontier))
    python, summaries, scores = tmp_path / "python", tmp_path / "calibration.json", tmp_path / "scores.json"
    python.write_text("")
    summaries.write_text(
        json.dumps({"format": "qala-ipex-qconf/1", "configs": [{"length_config": None}, {"length_config": [40, 20]}]})
    )
    scores.write_text(
        json.dumps(
            {
                "rows": [
                    {"config": "full", "length_config": None, "int8": {"f1": 30.1}},
                    {"config": "keep 0.9", "length_config": [40, 20], "int8": {"f1": 28.0}},
                ]
            }
        )
    )
    model = tmp_path / "model"
    LengthAdaptiveForQuestionAnswering.from_pretrained(str(tiny_checkpoint)).save_pretrained(model)
    overrides = [
        f"benchmark.int8_model={model}",
        f"benchmark.int8_report={tmp_path / 'report.json'}",
        f"benchmark.frontier={tmp_path / 'frontier.json'}",
        "benchmark.baselines=[]",
        f"benchmark.ipex_python={python}",
        f"benchmark.ipex_calibration={summaries}",
        f"benchmark.ipex_scores={scores}",
    ]
    recipe = load_recipe(write_recipe(tmp_path, model), overrides)
    rows, notes = plan.plan_rows(recipe)
    by_id = {r["id"]: r for r in rows}
    assert list(by_id) == [
        "MiniLM/fp32/full",
        "MiniLM/int8/full",
        "QuaLA-MiniLM/fp32/lc-40-20",
        "QuaLA-MiniLM/int8/lc-40-20",
        "MiniLM-IPEX/int8/full",
        "MiniLM-IPEX/int8/lc-40-20",
    ]
    assert notes["length_configs"]["source"] == str(tmp_path / "report.json")
    assert by_id["QuaLA-MiniLM/fp32/lc-40-20"]["f1"] == 29.0 and by_id["QuaLA-MiniLM/int8/lc-40-20"]["f1"] == 28.5
    ipex = by_id["MiniLM-IPEX/int8/lc-40-20"]
    assert ipex["kind"] == "ipex" and ipex["python"] == str(python.absolute()) and ipex["f1"] == 28.0
    assert ipex["ipex_summaries"] == str(summaries.absolute()) and by_id["MiniLM-IPEX/int8/full"]["f1"] == 30.1


def test_tune_with_backend_ipex_runs_end_to_end_in_the_ipex_environment(tmp_path, tiny_checkpoint):
    """`python -m qala.tune` with quantization.backend=ipex, under the IPEX python: fp32 and IPEX INT8 scored at
    full length and the absolute keep configuration (ratio rows are not traceable: left out), calibration kept."""
    if not IPEX_PYTHON.is_file():
        pytest.skip(f"IPEX environment not built ({IPEX_PYTHON} missing): bash benchmarks/ipex_env.sh builds it")
    from qala.quantize.ipex import calibrated_length_configs
    from tests.test_tune import write_recipe

    recipe = write_recipe(tmp_path, tiny_checkpoint)
    proc = subprocess.run(
        [str(IPEX_PYTHON), "-m", "qala.tune", str(recipe), "quantization.backend=ipex"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"IPEX environment {IPEX_PYTHON}: {proc.stderr[-3000:]}"
    out = tmp_path / "static" / "int8"
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "ipex" and set(report["final"]["rows"]) == {"full", "padded_keep_0.5"}
    assert all(0 <= row["int8"]["f1"] <= 100 for row in report["final"]["rows"].values())
    assert calibrated_length_configs(report["artifact"]) == [None, [64, 32]]
    assert "IPEX calibration" in proc.stdout


# ------------------------------------------------------------------ qala.tune's IPEX quantizer, by name (no IPEX)


def test_tune_with_backend_ipex_without_ipex_says_what_to_install(tmp_path, tiny_checkpoint, capsys):
    """quantization.backend=ipex where IPEX is missing: one line naming the environment script, exit 2, before
    model and data load (nothing written but the lock)."""
    from qala.quantize import ipex
    from qala.tune import main as tune_main
    from tests.test_tune import write_recipe

    installed, _ = ipex.ipex_status()
    if installed is not None and torch.__version__.startswith(ipex.REQUIRED_MINOR):
        pytest.skip("IPEX is usable in this interpreter; the error path is for environments without it")
    assert tune_main([str(write_recipe(tmp_path, tiny_checkpoint)), "quantization.backend=ipex"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bash benchmarks/ipex_env.sh" in err[0], err
    assert sorted(p.name for p in (tmp_path / "static" / "int8").iterdir()) == [".lock"]


def test_tune_runs_the_quantizer_its_backend_names(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """qala.tune picks qala.quantize.ipex by the recipe's backend name and hands it its Tuner: the report, the
    summary line and the kept calibration are the IPEX quantizer's (IPEX itself stubbed by the fp32 model)."""
    from qala.quantize import ipex
    from qala.tune import main as tune_main
    from tests.test_tune import write_recipe

    class FakeIpexQA:  # the fp32 model behind IpexStaticQA's interface
        def __init__(self, model, calibration):
            self.model, self.calibration = model, list(calibration)

        def __call__(self, length_config=None, keep_ratios=None, **inputs):
            assert keep_ratios is None, "IPEX rows take absolute length configurations only"
            return self.model(**inputs, length_config=length_config)

        def save_summaries(self, path, **record):
            Path(path).write_text(json.dumps({"format": ipex.QCONF_FORMAT, **record, "configs": []}))
            return Path(path)

    monkeypatch.setattr(ipex, "import_ipex", lambda: None)
    monkeypatch.setattr(ipex, "IpexStaticQA", FakeIpexQA)
    assert tune_main([str(write_recipe(tmp_path, tiny_checkpoint)), "quantization.backend=ipex"]) == 0
    out = tmp_path / "static" / "int8"
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "ipex" and report["artifact"] == str(out / "ipex_calibration.json")
    assert set(report["final"]["rows"]) == {"full", "padded_keep_0.5"}  # no ratio rows: not traceable
    assert (out / "recipe.yaml").is_file() and not (out / "model").exists()
    assert "IPEX calibration: " in capsys.readouterr().out
    # Approach static only, refused before anything loads.
    recipe = write_recipe(tmp_path, tiny_checkpoint, approach="dynamic")
    assert tune_main([str(recipe), "quantization.backend=ipex"]) == 2
    assert "backend ipex supports approach static only" in capsys.readouterr().err
