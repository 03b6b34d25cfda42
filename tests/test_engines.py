"""Serving engines (qala.quantize.engines): each backend equals the PyTorch model on unpadded windows of any length."""

import copy
import importlib.util
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from neural_compressor.torch.quantization import StaticQuantConfig

from qala.lengths import kept_per_layer, ratio_table
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize import quantize_
from qala.quantize.engines import BACKENDS, make_engine, margin_table

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install -e '.[onnx]')")
HAS_OV = HAS_ORT and all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
needs_ov = pytest.mark.skipif(not HAS_OV, reason="openvino/nncf not installed (pip install -e '.[onnx]')")

LENGTHS = (9, 23, 40)
RATIOS = [0.9, 0.6]
# fp32 backends compute the same arithmetic in another order: float32 rounding only.
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint).eval()


def window(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + n)
    ids = torch.randint(5, 600, (1, n), generator=g)
    ids[0, 0] = 2
    types = torch.zeros_like(ids)
    types[0, n // 3 :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}


def configs(n: int) -> list[dict]:
    # [1.0, 0.6]: OpenVINO's static graph skips the selection at the leading full layer; the logits must not move.
    return [
        {},
        {"keep_ratios": RATIOS},
        {"length_config": kept_per_layer([0.7, 0.5], n)},
        {"keep_ratios": [1.0, 0.6]},
    ]


def max_error(engine, reference, inputs: dict, config: dict) -> float:
    with torch.no_grad():
        expected = reference(**inputs, **config)
    got = engine(**inputs, **config)
    real = inputs["attention_mask"].bool()
    return max(
        float((got.start_logits - expected.start_logits)[real].abs().max()),
        float((got.end_logits - expected.end_logits)[real].abs().max()),
    )


def test_registry_names_and_unknown_backend(model):
    assert {"eager", "compile-dynamic", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="unknown engine backend 'tensorrt'"):
        make_engine(model, "tensorrt")


def test_length_config_as_ratios_keeps_the_same_counts():
    mask = torch.tensor([[1] * 10 + [0] * 5, [1] * 15])
    ratios = ratio_table(mask, 3, length_config=[12, 8, 3])
    kept = torch.ceil(ratios * mask.sum(1, keepdim=True).double() - 1e-6).long()
    assert kept.tolist() == [[10, 8, 3], [12, 8, 3]]
    with pytest.raises(ValueError, match="not both"):
        ratio_table(mask, 3, keep_ratios=[1, 1, 1], length_config=[3, 3, 3])
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        ratio_table(mask, 3, keep_ratios=[1.2, 1, 1])


def test_ratio_tables_are_fresh_tensors_not_views():
    # Dynamo guards on a view's base: a [1, layers] table that is an expanded view of a [layers] tensor (list
    # ratios) and a fresh one (length_config) compiled separate graphs, so a request after warm-up compiled.
    mask = torch.ones(1, 9, dtype=torch.long)
    tables = [
        ratio_table(mask, 2, keep_ratios=[0.9, 0.6]),
        ratio_table(mask, 2, length_config=[7, 5]),
        ratio_table(mask, 2),
        ratio_table(mask, 2, keep_ratios=torch.rand(3, 2).double()[1:2]),
    ]
    for table in tables:
        assert table._base is None and table.is_contiguous() and tuple(table.shape) == (1, 2)


def options(backend: str, tmp_path) -> dict:
    return {"workdir": tmp_path} if backend.startswith(("onnx", "openvino")) else {}


@pytest.mark.parametrize(
    "backend",
    [
        "eager",
        "compile-dynamic",
        pytest.param("onnxruntime", marks=needs_ort),
        pytest.param("openvino", marks=needs_ov),
    ],
)
def test_fp32_backends_equal_pytorch_at_every_length(model, backend, tmp_path):
    engine = make_engine(model, backend, **options(backend, tmp_path))
    engine.warmup(lengths=(8, 16, 40))
    for n in LENGTHS:
        for config in configs(n):
            assert max_error(engine, model, window(n), config) < FP32_TOLERANCE, (n, config)
    if backend == "compile-dynamic":
        assert engine.compiles_after_warmup == 0


@pytest.mark.parametrize(
    "backend", [pytest.param("onnxruntime", marks=needs_ort), pytest.param("openvino", marks=needs_ov)]
)
def test_engines_answer_concurrent_calls_from_several_threads_as_alone(model, backend, tmp_path):
    # qala.serve --concurrent-batches calls one engine from several model threads at once.
    engine = make_engine(model, backend, **options(backend, tmp_path))
    calls = [(window(n), config) for n in (8, 16, 40) for config in configs(n)[:2]] * 4
    alone = [engine(**w, **c).start_logits for w, c in calls]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda call: engine(**call[0], **call[1]).start_logits, calls))
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "backend",
    ["compile-dynamic", pytest.param("onnxruntime", marks=needs_ort), pytest.param("openvino", marks=needs_ov)],
)
def test_span_selection_is_served_by_every_backend(model, backend, tmp_path):
    # A model trained with selection "span" ranks tokens by its span head at each layer: an engine that
    # traced the attention rule instead would keep other tokens and give other logits when dropping.
    span = copy.deepcopy(model)
    span.qala_config.selection = "span"
    engine = make_engine(span, backend, **options(backend, tmp_path))
    for n in LENGTHS:
        for config in configs(n)[1:]:
            assert max_error(engine, span, window(n), config) < FP32_TOLERANCE, (n, config)
    # Not vacuous: the attention rule keeps other tokens here, so its logits differ from the span engine's.
    assert max_error(engine, model, window(40), {"keep_ratios": RATIOS}) > 0


def test_int8_verdict_refuses_answers_unlike_fp32():
    from qala.quantize.openvino import int8_verdict

    fp32 = [(5, 7)] * 10
    assert int8_verdict(fp32, fp32) == {"windows": 10, "agree": 10, "cls_where_fp32_not": 0, "ok": True}
    # The fused-attention bug's symptom: [CLS] where fp32 answered a span (2 of 10 is over MAX_FALSE_CLS).
    assert not int8_verdict(fp32, [(0, 0)] * 2 + [(5, 7)] * 8)["ok"]
    assert not int8_verdict(fp32, [(5, 8)] * 6 + [(5, 7)] * 4)["ok"]  # agreement under half
    assert int8_verdict(fp32, [(5, 8)] * 4 + [(5, 7)] * 6)["ok"]


@needs_ov
def test_openvino_int8_checks_each_keep_configuration_against_fp32(model, tmp_path, monkeypatch):
    # Every INT8 keep configuration is compared with the fp32 model on calibration windows once, when it is
    # quantized, and refused if it answers unlike it (one line naming the engine and the configuration); the
    # verdict is kept beside the IR, so a later engine neither re-checks nor serves a refused graph.
    from qala.quantize import openvino

    span = copy.deepcopy(model)
    span.qala_config.selection = "span"
    engine = make_engine(span, "openvino-int8", calibration=calibration(), workdir=tmp_path / "ok")
    engine(**window(9), keep_ratios=RATIOS)  # span-ranked models are served now that every graph is checked
    (record,) = (tmp_path / "ok").rglob("openvino-int8-*.check.json")
    verdict = json.loads(record.read_text())
    assert list(engine.facts["int8_checks"].values()) == [verdict]
    assert verdict["ok"] and verdict["windows"] == len(calibration())

    def broken(fp32, int8):
        return {"windows": len(fp32), "agree": 0, "cls_where_fp32_not": len(fp32), "ok": False}

    monkeypatch.setattr(openvino, "int8_verdict", broken)
    again = make_engine(span, "openvino-int8", calibration=calibration(), workdir=tmp_path / "ok")
    again(**window(9), keep_ratios=RATIOS)  # the saved verdict, not `broken`
    refused = make_engine(span, "openvino-int8", calibration=calibration(), workdir=tmp_path / "bad")
    message = r"'openvino-int8' cannot run keep configuration \[0.9, 0.6\]: its INT8 graph answered unlike the fp32"
    with pytest.raises(ValueError, match=message):
        refused(**window(9), keep_ratios=RATIOS)
    monkeypatch.setattr(openvino, "int8_verdict", lambda *a: pytest.fail("the saved verdict is read, not redone"))
    with pytest.raises(ValueError, match=message):
        make_engine(span, "openvino-int8", calibration=calibration(), workdir=tmp_path / "bad")(
            **window(9), keep_ratios=RATIOS
        )
    refused(**window(9))  # full length (the plain graph) is not a keep configuration
    (bad,) = (tmp_path / "bad").rglob("openvino-int8-*.check.json")
    bad.write_text("{not json")  # a damaged verdict is measured again (here by `broken`'s stand-in), not trusted
    monkeypatch.setattr(openvino, "int8_verdict", broken)
    with pytest.raises(ValueError, match=message):
        make_engine(span, "openvino-int8", calibration=calibration(), workdir=tmp_path / "bad")(
            **window(9), keep_ratios=RATIOS
        )
    assert json.loads(bad.read_text())["ok"] is False
    monkeypatch.undo()
    # A verdict of the earlier dynamic-shape check (no "compiled": it refused graphs that serve correctly) is
    # measured again, through the static per-bucket graphs that serve the windows, and those graphs are kept.
    record.write_text(json.dumps({**verdict, "ok": False, "compiled": None}))
    rechecked = make_engine(span, "openvino-int8", calibration=calibration(), workdir=tmp_path / "ok")
    rechecked(**window(9), keep_ratios=RATIOS)
    assert json.loads(record.read_text()) == {**verdict, "compiled": "static"}
    assert any(k[0] is not None and k[2] == 1 for k in rechecked._compiled)
    attention = make_engine(model, "openvino-int8", calibration=[window(9)], workdir=tmp_path)
    # An attention-ranked INT8 adaptive graph exports each selecting layer's attention scores as an extra output:
    # that stops the CPU plugin's attention fusion that fed the significance wrong values (_pin_attention_scores).
    outputs = [port.get_any_name() for port in attention.base(attention.key(RATIOS, None)).outputs]
    assert len(outputs) == 2 + 2 and len(attention.base(None).outputs) == 2, outputs


def mixed_batch(lengths) -> tuple[list[dict], dict]:
    """Windows of several lengths, alone and right-padded into one batch."""
    rows = [window(n) for n in lengths]
    width = max(lengths)
    pad = torch.nn.functional.pad
    return rows, {k: torch.stack([pad(r[k][0], (0, width - r[k].size(1))) for r in rows]) for k in rows[0]}


@pytest.mark.parametrize(
    "backend", [pytest.param("onnxruntime", marks=needs_ort), pytest.param("openvino", marks=needs_ov)]
)
def test_mixed_length_batch_equals_each_window_alone(model, backend, tmp_path):
    # OpenVINO pads each window to its bucket (32, 64 here) and sorts the batch: the logits at a window's real
    # positions are still those of the unbucketed model on that window alone, at full length and when dropping.
    engine = make_engine(model, backend, workdir=tmp_path)
    rows, batch = mixed_batch((12, 30, 9, 40, 33))
    for config in ({}, {"keep_ratios": RATIOS}, {"length_config": [20, 11]}):
        got = engine(**batch, **config)
        for b, row in enumerate(rows):
            n = row["input_ids"].size(1)
            with torch.no_grad():
                alone = model(**row, **config)
            assert float((got.start_logits[b, :n] - alone.start_logits[0]).abs().max()) < FP32_TOLERANCE, (b, config)
            assert float((got.end_logits[b, :n] - alone.end_logits[0]).abs().max()) < FP32_TOLERANCE, (b, config)


# The tests of the INT8 model run in one pytest-xdist worker, so that it is quantized once.
on_int8_worker = pytest.mark.xdist_group("test_engines_int8")


@pytest.fixture(scope="module")
def int8_model(model):
    batches = [{"input_ids": w["input_ids"], "attention_mask": w["attention_mask"]} for w in map(window, (16, 16))]
    batches = [dict(**{k: torch.cat([b[k], b[k]]) for k in b}) for b in batches]
    return quantize_(copy.deepcopy(model), StaticQuantConfig(w_granularity="per_channel"), batches)


@on_int8_worker
def test_compile_dynamic_int8_follows_the_eager_int8_model(int8_model):
    # Inductor's oneDNN qlinear kernels round differently from the reference quantize/dequantize ops;
    # on the tiny model that moves logits by at most a few hundredths, and never re-orders token selection here.
    engine = make_engine(int8_model, "compile-dynamic")
    engine.warmup(lengths=(8, 16, 40))
    for n in LENGTHS:
        assert max_error(engine, int8_model, window(n), {}) < 0.05, n
        assert max_error(engine, int8_model, window(n), {"keep_ratios": [1.0, 0.8]}) < 0.05, n
    assert engine.compiles_after_warmup == 0


@needs_ort
@on_int8_worker
def test_onnxruntime_int8_runs_integer_kernels_and_tracks_fp32(model, int8_model, tmp_path):
    # ORT dynamic INT8 quantizes activations per call: compared with fp32 at full length, where token
    # selection cannot change which tokens survive. An INT8 artifact is exported from its fp32 weights.
    from qala.quantize.onnx import operator_types

    engine = make_engine(int8_model, "onnxruntime-int8", workdir=tmp_path)
    scale = max(float(model(**window(n)).start_logits.abs().max()) for n in LENGTHS)
    for n in LENGTHS:
        assert max_error(engine, model, window(n), {}) < 0.1 * scale + 0.02, n
    # Full length runs the fused graph quantized: QAttention and integer GEMMs, no float MatMul left.
    plain = operator_types(engine.facts["plain_graph"])
    assert {"QAttention", "MatMulInteger", "DynamicQuantizeLinear"} <= plain and "MatMul" not in plain
    rows, batch = mixed_batch((12, 40))
    engine(**batch, keep_ratios=RATIOS)
    assert "MatMulInteger" in operator_types(engine.facts["adaptive_graph"])


@needs_ort
def test_onnxruntime_full_length_runs_the_fused_plain_graph(model, tmp_path):
    from qala.quantize.onnx import operator_types

    engine = make_engine(model, "onnxruntime", workdir=tmp_path)
    engine(**window(20))
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= operator_types(engine.facts["plain_graph"])
    assert "TopK" not in operator_types(engine.facts["plain_graph"])
    assert engine.facts["fused_operators"]["Attention"] == model.num_layers


@needs_ort
def test_onnxruntime_skips_the_selection_at_leading_full_layers(model, tmp_path):
    # A configuration that starts at ratio 1.0 runs a graph whose leading layers have no selection ops (one file
    # per count of such layers); the logits stay PyTorch's, for a list and for per-row ratios in a padded batch.
    from qala.quantize.onnx import full_prefix

    assert (full_prefix([1.0, 0.6]), full_prefix([0.9, 0.6]), full_prefix([1.0, 1.0])) == (1, 0, 2)
    assert full_prefix(torch.tensor([[1.0, 0.6], [0.8, 0.6]], dtype=torch.float64)) == 0
    engine = make_engine(model, "onnxruntime", workdir=tmp_path)
    assert max_error(engine, model, window(23), {"keep_ratios": [1.0, 0.6]}) < FP32_TOLERANCE
    assert max_error(engine, model, window(23), {"keep_ratios": RATIOS}) < FP32_TOLERANCE
    prefixed, every = engine.facts["adaptive.prefix1_graph"], engine.facts["adaptive_graph"]
    assert Path(prefixed).name == "adaptive-v2.prefix1.onnx"  # ADAPTIVE_FORMAT: the graph with `margins`
    import onnx

    def topks(path: str) -> int:
        return sum(node.op_type == "TopK" for node in onnx.load(path).graph.node)

    # Two TopK per selecting layer (the top-k, then the sort back to input order).
    assert (topks(every), topks(prefixed)) == (2 * model.num_layers, 2 * (model.num_layers - 1))
    # Per-row ratios whose first column is 1.0 for every row, rows of different real lengths.
    batch = {k: torch.cat([window(23)[k], torch.nn.functional.pad(window(15)[k], (0, 8))]) for k in window(23)}
    per_row = torch.tensor([[1.0, 0.6], [1.0, 0.4]], dtype=torch.float64)
    assert max_error(engine, model, batch, {"keep_ratios": per_row}) < FP32_TOLERANCE


@needs_ort
def test_onnxruntime_threads_spin_unless_turned_off(model, tmp_path, monkeypatch):
    import qala.quantize.onnx as onnx_module

    path = onnx_module.export_onnx(model, tmp_path / "plain.onnx")
    spin = "session.intra_op.allow_spinning"
    monkeypatch.setattr(onnx_module, "SPIN_WAIT", True)  # the default, whatever a Service.load in this process set
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default: spinning
        onnx_module.ort_session(path).get_session_options().get_session_config_entry(spin)
    monkeypatch.setattr(onnx_module, "SPIN_WAIT", False)  # what qala.serve does before loading its model
    assert onnx_module.ort_session(path).get_session_options().get_session_config_entry(spin) == "0"


def calibration(n: int = 6) -> list[dict]:
    return [window(8 + 5 * i, seed=100) for i in range(n)]


@needs_ov
def test_openvino_int8_runs_integer_kernels_and_tracks_pytorch(model, tmp_path):
    engine = make_engine(model, "openvino-int8", workdir=tmp_path, calibration=calibration())
    precisions = engine.int8_precisions()
    assert any(k.startswith("FullyConnected:") and k.endswith(("u8", "i8")) for k in precisions), precisions
    assert "FakeQuantize" in {op.get_type_name() for op in engine.base(None).get_ops()}
    assert "re-quantizes" in engine.facts["quantization"]
    scale = max(float(model(**window(n)).start_logits.abs().max()) for n in LENGTHS)
    # Static INT8 of a random tiny model: a tenth of the logit range, at full length and when dropping (the
    # top-k may pick other tokens than fp32 where significances are close, so dropping gets a wider bound).
    for n in LENGTHS:
        assert max_error(engine, model, window(n), {}) < 0.1 * scale + 0.02, n
        assert max_error(engine, model, window(n), {"keep_ratios": RATIOS}) < 0.25 * scale + 0.02, n
    fp32 = make_engine(model, "openvino", workdir=tmp_path)
    assert not any(k.endswith(("u8", "i8")) for k in fp32.int8_precisions() if k.startswith("FullyConnected"))


@needs_ov
def test_openvino_runs_f32_unless_bf16_is_named(model, tmp_path):
    # OpenVINO's CPU default is bf16 on hosts with AVX-512 BF16 or AMX: "openvino" must still be fp32 there.
    import openvino as ov

    fp32 = make_engine(model, "openvino", workdir=tmp_path)
    assert not any(k.endswith(":bf16") for k in fp32.int8_precisions()), fp32.int8_precisions()
    bf16 = make_engine(model, "openvino-bf16", workdir=tmp_path)
    assert bf16.name == "openvino-bf16" and bf16.facts["inference_precision"] == "bf16"
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert any(k.endswith(":bf16") for k in bf16.int8_precisions()), bf16.int8_precisions()
    scale = max(float(model(**window(n)).start_logits.abs().max()) for n in LENGTHS)
    for n in LENGTHS:  # bf16 keeps 8 bits of mantissa: a few hundredths of the logit range
        assert max_error(bf16, model, window(n), {}) < 0.05 * scale + 1e-3, n
    with pytest.raises(ValueError, match="OpenVINO precision 'f16'"):
        make_engine(model, "openvino", workdir=tmp_path, precision="f16")


@needs_ov
def test_openvino_buckets_warmup_paper_mode_and_refusals(model, tmp_path):
    engine = make_engine(model, "openvino", workdir=tmp_path, buckets=[16, 48], batch_sizes=[1, 2])
    report = engine.warmup(lengths=[10, 40], batch_sizes=[2], keep_ratios=[None, RATIOS])
    assert report["graphs"] == 2 * 2 * 2  # (full, RATIOS) x buckets (16, 48) x batch sizes (1, 2)
    rows, batch = mixed_batch((10, 40, 12))
    engine(**batch, keep_ratios=RATIOS)
    assert len(engine._compiled) == 8  # nothing compiled after the warm-up
    # The compiled-blob cache holds no weights for float graphs: every blob is smaller than the model file
    # (with weights: 380 KB blobs beside a 272 KB file; without: at most 224 KB).
    blobs = [b.stat().st_size for b in (engine.folder / "ov_cache").glob("*.blob")]
    assert len(blobs) == 8 and max(blobs) < (engine.folder / "plain.onnx").stat().st_size, blobs
    # Full length has no selection op; a keep configuration's graph has it (and its widths are static).
    plain = {op.get_type_name() for op in engine.base(None).get_ops()}
    adaptive = {op.get_type_name() for op in engine.base(engine.key(RATIOS, None)).get_ops()}
    assert "TopK" not in plain and "TopK" in adaptive

    def top_ks(ratios):
        return sum(op.get_type_name() == "TopK" for op in engine.base(engine.key(ratios, None)).get_ops())

    assert 0 < top_ks([1.0, 0.6]) < top_ks(RATIOS)  # no selection op at the leading layer that keeps everything
    # Paper mode: one bucket of max_seq_length, windows padded to it by the caller: the same path.
    paper = make_engine(model, "openvino", workdir=tmp_path, buckets=[64])
    padded = {k: torch.nn.functional.pad(v, (0, 64 - v.size(1))) for k, v in batch.items()}
    for config in ({}, {"length_config": [30, 12]}):
        got = paper(**padded, **config)
        with torch.no_grad():
            expected = model(**padded, **config)
        real = padded["attention_mask"].bool()
        assert float((got.start_logits - expected.start_logits)[real].abs().max()) < FP32_TOLERANCE
    with pytest.raises(ValueError, match="engine 'openvino' cannot run per-row keep_ratios"):
        engine(**batch, keep_ratios=torch.full((3, 2), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        engine(**window(60))
    with pytest.raises(ValueError, match="engine 'openvino-int8' needs calibration"):
        make_engine(model, "openvino-int8", workdir=tmp_path)


@needs_ort
def test_artifact_cache_is_keyed_by_the_model_content(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from qala.quantize.onnx import artifact_dir

    directory = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    first = make_engine(directory, "onnxruntime", workdir=tmp_path / "cache")
    changed = LengthAdaptiveForQuestionAnswering.from_pretrained(directory)
    with torch.no_grad():
        changed.qa_outputs.bias.add_(1.0)
    changed.save_pretrained(directory)
    second = make_engine(directory, "onnxruntime", workdir=tmp_path / "cache")
    assert second.folder != first.folder  # the changed weights never meet the old export
    assert max_error(second, changed.eval(), window(20), {}) < FP32_TOLERANCE
    manifest = first.folder / "manifest.json"
    manifest.write_text(json.dumps({"model_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="was built for model 0000"):
        artifact_dir(tmp_path / "cache", LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint))


# --------------------------------------------------------------------------- keep margins


@pytest.fixture(scope="module")
def margin_model(model):
    """The tiny model ranking by its span head, the head scaled so that its logits spread (a random head's all lie
    within 0.5 of each other): margins of 4-8 keep part of each window."""
    span = copy.deepcopy(model)
    span.qala_config.selection = "span"
    with torch.no_grad():
        span.qa_outputs.weight *= 50
    return span


MARGIN_LENGTHS = (23, 9, 16, 40)
# Each drops tokens in some row (checked below); [None, 6]: layers before the first margin skip the selection
# (the ONNX graph of one leading full layer), also under ratios 1.0 there; a [batch, layers] table: per row, inf none.
MARGIN_CONFIGS = [
    {"keep_margins": [6.0, None]},
    {"keep_margins": [None, 6.0]},
    {"keep_ratios": [0.9, 0.6], "keep_margins": [6.0, 4.0]},
    {"keep_ratios": [1.0, 1.0], "keep_margins": [None, 4.0]},
    {"keep_margins": torch.tensor([[6.0, math.inf], [math.inf, math.inf], [4.0, 8.0], [8.0, 4.0]])},
]


def test_margin_table_converts_and_checks_keep_margins():
    assert margin_table(None, 2, 3) is None and margin_table([None, None, math.inf], 2, 3) is None
    table = margin_table([None, 2, 0.5], 2, 3)
    assert table.dtype == torch.float32 and table.tolist() == [[math.inf, 2.0, 0.5]] * 2
    per_row = torch.tensor([[1.0, math.inf], [math.inf, math.inf]], dtype=torch.float64)
    assert margin_table(per_row, 2, 2).tolist() == per_row.tolist()
    for bad, message in (
        ([1.0], "keep_margins has 1 entries, the model has 3 layers"),
        ([1.0, -1.0, None], "keep_margins entries must be >= 0"),
        ([1.0, math.nan, None], "keep_margins entries must be >= 0"),
        (torch.ones(3, 3), r"keep_margins tensor must be \[2, 3\]"),
    ):
        with pytest.raises(ValueError, match=message):
            margin_table(bad, 2, 3)


@pytest.mark.parametrize("backend", ["eager", "compile-dynamic", pytest.param("onnxruntime", marks=needs_ort)])
def test_keep_margins_are_served_as_the_model_runs_them(margin_model, backend, tmp_path):
    # A padded batch of rows of different real lengths: each engine keeps what the eager model keeps, per row.
    _, batch = mixed_batch(MARGIN_LENGTHS)
    real = batch["attention_mask"].sum(dim=1)
    for config in MARGIN_CONFIGS:
        with torch.no_grad():
            kept = margin_model(**batch, **config).kept_tokens
        assert (kept[:, -1] < real).any(), config  # not vacuous: the margin dropped tokens
    # Dynamo's own backend: the same graph breaks, guards and symbolic shapes as Inductor, without its code generation
    # (slow on a shared CPU); test_keep_margins_compile_with_inductor runs Inductor itself.
    engine = margin_engine(margin_model, backend, tmp_path)
    if backend == "compile-dynamic":
        engine.warmup(lengths=(8, 40), batch_sizes=(2,), keep_ratios=[[0.9, 0.6]], keep_margins=True)
    for config in MARGIN_CONFIGS:
        assert max_error(engine, margin_model, batch, config) < FP32_TOLERANCE, config
    if backend == "compile-dynamic":
        assert engine.compiles_after_warmup == 0
    if backend == "onnxruntime":
        assert {"adaptive_graph", "adaptive.prefix1_graph"} <= set(engine.facts)  # margins run the adaptive graph
    # The config's keep_margins are the default, as in the model's forward; [None] * L is a call without any.
    default = copy.deepcopy(margin_model)
    default.qala_config.keep_margins = [6.0, None]
    engine = margin_engine(default, backend, tmp_path)
    with torch.no_grad():
        tight, full = margin_model(**batch, keep_margins=[6.0, None]), margin_model(**batch)
    assert logit_error(engine(**batch), tight, batch) < FP32_TOLERANCE
    assert logit_error(engine(**batch, keep_margins=[None, None]), full, batch) < FP32_TOLERANCE


def margin_engine(model, backend: str, tmp_path):
    if backend == "compile-dynamic":  # make_engine's own `backend` names the engine: torch.compile's is passed here
        from qala.quantize.engines import DynamicCompiledEngine

        return DynamicCompiledEngine(model, backend="eager")
    return make_engine(model, backend, **options(backend, tmp_path))


def logit_error(got, expected, inputs: dict) -> float:
    real = inputs["attention_mask"].bool()
    return max(
        float((got.start_logits - expected.start_logits)[real].abs().max()),
        float((got.end_logits - expected.end_logits)[real].abs().max()),
    )


def test_keep_margins_compile_with_inductor(margin_model):
    engine = make_engine(margin_model, "compile-dynamic")
    _, batch = mixed_batch((23, 9))
    assert max_error(engine, margin_model, batch, {"keep_margins": [6.0, 4.0]}) < FP32_TOLERANCE


@needs_ort
def test_onnxruntime_adaptive_graph_takes_margins_and_old_files_are_not_read(margin_model, tmp_path):
    import onnx

    engine = make_engine(margin_model, "onnxruntime", workdir=tmp_path)
    # A file of the earlier four-input export where the adaptive graph used to be: another name now, never read.
    (engine.folder / "adaptive.onnx").write_bytes(b"not this export")
    _, batch = mixed_batch(MARGIN_LENGTHS)
    assert max_error(engine, margin_model, batch, {"keep_ratios": RATIOS, "keep_margins": [6.0, 4.0]}) < FP32_TOLERANCE
    path = Path(engine.facts["adaptive_graph"])
    assert path.name == "adaptive-v2.onnx"
    assert [i.name for i in onnx.load(str(path)).graph.input][-2:] == ["kept", "margins"]
    # Keep ratios alone feed inf margins to the same graph: the logits of the configuration without margins.
    assert max_error(engine, margin_model, batch, {"keep_ratios": RATIOS}) < FP32_TOLERANCE


@needs_ort
@on_int8_worker
def test_onnxruntime_int8_runs_keep_margins(margin_model, tmp_path):
    from qala.quantize.onnx import operator_types

    engine = make_engine(margin_model, "onnxruntime-int8", workdir=tmp_path)
    _, batch = mixed_batch(MARGIN_LENGTHS)
    with torch.no_grad():
        scale = float(margin_model(**batch).start_logits.abs().max())
    for config in MARGIN_CONFIGS:  # ORT's dynamic INT8 against fp32: a bound as openvino-int8's when dropping
        assert max_error(engine, margin_model, batch, config) < 0.25 * scale + 0.02, config
    assert "MatMulInteger" in operator_types(engine.facts["adaptive_graph"])


@needs_ort
@on_int8_worker
def test_onnxruntime_inc_runs_keep_margins_as_the_int8_model(margin_model, tmp_path):
    # The QDQ graph computes INC's q/dq exactly (tests/test_inc_qdq.py): the eager INT8 model's logits to rounding.
    _, batch = mixed_batch(MARGIN_LENGTHS)
    calibration = [{k: batch[k] for k in ("input_ids", "attention_mask")}]
    int8 = quantize_(copy.deepcopy(margin_model), StaticQuantConfig(w_granularity="per_channel"), calibration)
    engine = make_engine(int8, "onnxruntime-inc", workdir=tmp_path)
    for config in MARGIN_CONFIGS:
        assert max_error(engine, int8, batch, config) < 2e-3, config
    assert "adaptive_qdq" in engine.facts and Path(engine.facts["adaptive_graph"]).name.startswith("adaptive-v2.inc-")


@pytest.mark.parametrize(
    "backend", [pytest.param("openvino", marks=needs_ov), pytest.param("openvino-inc", marks=needs_ov)]
)
def test_openvino_engines_refuse_keep_margins(margin_model, int8_model, backend, tmp_path, monkeypatch):
    # Static top-k widths per bucket: a margin would only mask slots computed anyway, so it is refused by name.
    source = int8_model if backend == "openvino-inc" else margin_model
    engine = make_engine(source, backend, workdir=tmp_path, buckets=[32, 64], batch_sizes=[1, 2])
    rows, batch = mixed_batch((12, 30))
    message = rf"^engine '{backend}' cannot run keep_margins \[6.0, None\]"
    with pytest.raises(ValueError, match=message):
        engine(**batch, keep_margins=[6.0, None])
    with pytest.raises(ValueError, match=rf"engine '{backend}' cannot run keep_margins"):
        engine(**batch, keep_margins=torch.tensor([[6.0, math.inf], [math.inf, math.inf]]))
    # No margin at any layer is served (INT8: INC's q/dq to rounding, tests/test_inc_qdq.py).
    assert max_error(engine, source, batch, {"keep_margins": [None, None]}) < 2e-3
    # A model whose config has margins runs them in every call: refused, warm-up included.
    monkeypatch.setattr(source.qala_config, "keep_margins", [6.0, None])
    configured = make_engine(source, backend, workdir=tmp_path, buckets=[32, 64], batch_sizes=[1, 2])
    with pytest.raises(ValueError, match=message):
        configured(**batch)
    with pytest.raises(ValueError, match=message):
        configured.warmup(lengths=[10])
    assert max_error(configured, source, batch, {"keep_margins": [None, None]}) < 2e-3
