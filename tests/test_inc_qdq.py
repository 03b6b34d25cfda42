"""The onnxruntime-inc / openvino-inc engines (qala.quantize.qdq): INC's INT8 artifact served as static QDQ ONNX.

One artifact of the tiny checkpoint, built once for the module: every unit INT8 but encoder.layer.1.output (fp32,
as a tuning entry's fp32_units leaves a unit), static minmax activations, per-channel weights."""

import copy
import importlib.util
import json
import math
import shutil
from collections import Counter

import pytest
import torch
from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig
from safetensors.torch import load_file

from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize import quantize_, save_quantized
from qala.quantize.engines import make_engine
from qala.quantize.load import load_model

HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
HAS_OV = HAS_ORT and all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
pytestmark = [
    pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install -e '.[onnx]')"),
    pytest.mark.xdist_group("test_inc_qdq"),  # one worker builds the artifact
]
needs_ov = pytest.mark.skipif(not HAS_OV, reason="openvino/nncf not installed (pip install -e '.[onnx]')")

FP32_UNIT = "encoder.layer.1.output"
LENGTHS = (9, 15, 23, 31, 40, 48, 57, 64)
# The QDQ graph computes INC's q/dq with integer GEMMs, so a window's logits equal the eager INT8 model's to float
# rounding (measured: at most 3e-8 on these windows, every configuration, ONNX Runtime and OpenVINO, AMD EPYC with
# VNNI) unless an activation lands on the other side of a rounding boundary (float ops such as LayerNorm summed in
# another order): one quantization step, which moved one window's logits by 6e-4 on OpenVINO in another batch.
# So: every window within FLIP, most within EXACT. fp32 and ORT's dynamic INT8 are 2e-3..6e-3 off on every window.
EXACT, FLIP = 1e-5, 2e-3


def calibration(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(5, 600, (2, 64), generator=g),
        "attention_mask": torch.ones(2, 64, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 64, dtype=torch.long),
    }
    return [batch, {**batch, "length_config": [40, 20]}]


@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint):
    return LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def artifact(fp32_model, tmp_path_factory):
    config = StaticQuantConfig(w_granularity="per_channel")
    model = quantize_(copy.deepcopy(fp32_model), config, calibration(), fp32_units=[FP32_UNIT])
    path = tmp_path_factory.mktemp("inc-qdq") / "int8"
    save_quantized(model, path, approach="static", fp32_units=[FP32_UNIT], quant_config=config.to_dict())
    return path


@pytest.fixture(scope="module")
def int8_model(artifact):
    return load_model(artifact)  # what make_engine(artifact, ...) serves


def mixed_batch() -> dict[str, torch.Tensor]:
    """Windows of several real lengths in one batch, padded to the longest."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 600, (len(LENGTHS), max(LENGTHS)), generator=g)
    ids[:, 0] = 2
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    types = (torch.arange(max(LENGTHS))[None, :] >= 6).long() * mask
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


def window_errors(got, expected, mask: torch.Tensor) -> list[float]:
    """Largest start/end logit difference of each window, over its real tokens."""
    errors = []
    for row, real in enumerate(mask.bool()):
        diff = [
            (g[row] - e[row])[real].abs().max()
            for g, e in ((got.start_logits, expected.start_logits), (got.end_logits, expected.end_logits))
        ]
        errors.append(float(max(diff)))
    return errors


def tracks(errors: list[float]) -> bool:
    return max(errors) < FLIP and sum(e < EXACT for e in errors) >= 0.75 * len(errors)


def test_qdq_graph_holds_inc_int8_weights_scales_and_fp32_units(artifact, int8_model, tmp_path):
    import onnx
    from onnx import numpy_helper
    from torchao.quantization.pt2e.observer import MinMaxObserver

    engine = make_engine(int8_model, "onnxruntime-inc", workdir=tmp_path)
    graph = onnx.load(engine.facts["plain_graph"]).graph
    nodes = {n.name: n for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    # A quantized unit: its weight is INC's stored int8 values (transposed: ONNX MatMul multiplies x @ W^T), with
    # INC's per-channel scales and zero points, exactly; nothing re-quantized.
    stored = load_file(str(artifact / "int8_weights.safetensors"))
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    matmul = nodes["/model/bert/encoder/layer.0/intermediate/dense/MatMul"]
    dq_w = producer[matmul.input[1]]
    assert dq_w.op_type == "DequantizeLinear" and onnx.helper.get_attribute_value(dq_w.attribute[0]) == 1
    q, scale, zero_point = (values[name] for name in dq_w.input)
    assert q.dtype.name == "int8" and (q.T == stored[key].numpy()).all()
    assert scale.dtype.name == "float32" and (scale == stored[f"{key}.scale"].numpy()).all()
    assert (zero_point == stored[f"{key}.zero_point"].numpy()).all()

    # Its input: QuantizeLinear -> DequantizeLinear with the scale / zero point INC's observer gives.
    dq_x = producer[matmul.input[0]]
    q_x = producer[dq_x.input[0]]
    assert (dq_x.op_type, q_x.op_type) == ("DequantizeLinear", "QuantizeLinear")
    observers = load_file(str(artifact / "observers.safetensors"))
    prefix = "encoder.layer.0.intermediate:activation_post_process_0"
    reduce_range = json.loads((artifact / "quantization.json").read_text())["reduce_range"]
    observer = MinMaxObserver(
        dtype=torch.uint8, quant_min=0, quant_max=127 if reduce_range else 255, eps=float(observers[f"{prefix}.eps"])
    )
    observer.min_val, observer.max_val = observers[f"{prefix}.min_val"], observers[f"{prefix}.max_val"]
    expected_scale, expected_zero_point = observer.calculate_qparams()
    assert float(values[q_x.input[1]]) == float(expected_scale) and int(values[q_x.input[2]]) == int(
        expected_zero_point
    )

    # The unit INC left fp32: fp32 weight, no QuantizeLinear on its input.
    assert json.loads((artifact / "quantization.json").read_text())["units"]["fp32"] == [FP32_UNIT]
    fp32 = nodes["/model/bert/encoder/layer.1/output/dense/MatMul"]  # FP32_UNIT's Linear
    assert fp32.input[1] in values and values[fp32.input[1]].dtype.name == "float32"
    assert fp32.input[0] not in producer or producer[fp32.input[0]].op_type != "DequantizeLinear"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == fp32.input[0] for n in graph.node)


def test_logits_track_the_eager_int8_artifact(fp32_model, int8_model, tmp_path):
    # Full length (plain graph) and keep configurations (adaptive graph: ratios, a leading full layer, absolute),
    # windows of several lengths in one padded batch.
    engine = make_engine(int8_model, "onnxruntime-inc", workdir=tmp_path)
    batch = mixed_batch()
    mask = batch["attention_mask"]
    with torch.no_grad():
        assert not tracks(window_errors(fp32_model(**batch), int8_model(**batch), mask))  # the check discriminates
    for config in ({}, {"keep_ratios": [0.9, 0.6]}, {"keep_ratios": [1.0, 0.6]}, {"length_config": [30, 12]}):
        with torch.no_grad():
            expected = int8_model(**batch, **config)
        errors = window_errors(engine(**batch, **config), expected, mask)
        assert tracks(errors), (config, errors)
    assert {"plain_graph", "adaptive_graph", "adaptive.prefix1_graph"} <= set(engine.facts)


def test_engine_runs_integer_gemms_for_every_inc_linear(artifact, int8_model, tmp_path):
    # What ONNX Runtime runs after its session optimizations (the engine's options): each Linear INC quantized
    # is one integer GEMM (u8 x s8 -> int32, scaled), so an fp32 graph (or dropped Q/DQ nodes) fails here.
    import onnx
    import onnxruntime as ort

    quantized = len(json.loads((artifact / "quantization.json").read_text())["int8_weights"])
    engine = make_engine(int8_model, "onnxruntime-inc", workdir=tmp_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(engine.facts["plain_graph"], options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == quantized == engine.facts["plain_qdq"]["quantized_matmuls"], ops
    assert ops["DequantizeLinear"] == 0, ops  # every Q/DQ pair fused into an integer kernel


@needs_ov
def test_openvino_reads_the_same_qdq_graph_with_int8_kernels(int8_model, tmp_path):
    engine = make_engine(int8_model, "openvino-inc", workdir=tmp_path, buckets=[32, 64], batch_sizes=[1, 4])
    batch = mixed_batch()
    with torch.no_grad():
        expected = int8_model(**batch)
    errors = window_errors(engine(**batch), expected, batch["attention_mask"])
    assert tracks(errors), errors
    assert engine.int8_precisions().get("FullyConnected:u8") == len(engine.plan)  # one integer GEMM per INC Linear
    refusal = r"^engine 'openvino-inc' runs full length only, not keep configuration \[0.9, 0.6\]"
    with pytest.raises(ValueError, match=refusal):
        engine(**batch, keep_ratios=[0.9, 0.6])


def test_refusals_name_the_engine_and_what_it_expected(tiny_checkpoint, fp32_model):
    for name in ("onnxruntime-inc", "openvino-inc"):
        with pytest.raises(ValueError, match=rf"^engine '{name}' serves an INC INT8 artifact") as refused:
            make_engine(tiny_checkpoint, name)  # an fp32 model directory
        assert "\n" not in str(refused.value)
    # A dynamic INT8 model has no activation scales to serve.
    dynamic = quantize_(
        copy.deepcopy(fp32_model),
        DynamicQuantConfig(w_granularity="per_channel"),
        calibration(),
        fp32_units=["encoder.*"],
    )
    with pytest.raises(ValueError, match=r"^engine 'onnxruntime-inc' needs static activation scales; unit qa_outputs"):
        make_engine(dynamic, "onnxruntime-inc")


def test_cache_is_keyed_by_the_weights_and_by_inc_parameters(fp32_model, tmp_path):
    # Two calibrations of the same weights: same int8 weights (per-channel minmax of the weights), other
    # activation scales. Same folder (the exported weights), another QDQ file; an unchanged artifact reuses its file.
    def head_only(seed: int):
        config = StaticQuantConfig(w_granularity="per_channel")
        return quantize_(copy.deepcopy(fp32_model), config, calibration(seed), fp32_units=["encoder.*"])

    first, second = head_only(0), head_only(1)
    a = make_engine(first, "onnxruntime-inc", workdir=tmp_path)
    b = make_engine(second, "onnxruntime-inc", workdir=tmp_path)
    assert a.folder == b.folder and a.facts["plain_graph"] != b.facts["plain_graph"]
    again = make_engine(first, "onnxruntime-inc", workdir=tmp_path)
    assert again.facts["plain_graph"] == a.facts["plain_graph"] and "plain_qdq" not in again.facts


def test_serves_an_int8_artifact_directory(tiny_int8_artifact, tmp_path):
    # The session's shared artifact (its span head INT8, its encoder fp32), named by directory as qala.answer does.
    engine = make_engine(tiny_int8_artifact, "onnxruntime-inc", workdir=tmp_path)
    assert engine.facts["inc_units"] == ["qa_outputs"] and engine.facts["plain_qdq"]["quantized_matmuls"] == 1
    batch = mixed_batch()
    with torch.no_grad():
        expected = load_model(tiny_int8_artifact)(**batch)
    errors = window_errors(engine(**batch), expected, batch["attention_mask"])
    assert tracks(errors), errors


# --------------------------------------------------------------------------- graphs cached by the artifact's content


def _no_replay(monkeypatch) -> None:
    """Rebuilding an INT8 artifact (load_model -> PT2E prepare/convert per unit) fails from here on."""
    from qala.quantize import pt2e

    def replay(*args, **kwargs):
        raise AssertionError("the PT2E replay ran: the cached QDQ graph was not served")

    monkeypatch.setattr(pt2e, "prepare_unit", replay)
    monkeypatch.setattr(pt2e, "convert_unit", replay)


def _loads(monkeypatch) -> list:
    """Record every artifact load of qala.quantize.qdq (the replay), letting it run."""
    from qala.quantize import qdq

    calls = []

    def counted(path, *args, **kwargs):
        calls.append(path)
        return load_model(path, *args, **kwargs)

    monkeypatch.setattr(qdq, "load_model", counted)
    return calls


def test_a_cached_artifact_is_served_without_replaying_pt2e(artifact, int8_model, tmp_path, monkeypatch):
    from qala.quantize.qdq import IncQdqEngine

    batch, configs = mixed_batch(), ({}, {"keep_ratios": [0.9, 0.6]})
    first = IncQdqEngine(artifact, workdir=tmp_path)
    built = [first(**batch, **config) for config in configs]  # the plain and the adaptive graph, cached
    assert "plain_qdq" in first.facts and "adaptive_qdq" in first.facts
    with torch.no_grad():
        assert tracks(window_errors(built[0], int8_model(**batch), batch["attention_mask"]))

    _no_replay(monkeypatch)
    again = IncQdqEngine(artifact, workdir=tmp_path)
    for config, expected in zip(configs, built, strict=True):
        got = again(**batch, **config)
        assert torch.equal(got.start_logits, expected.start_logits) and torch.equal(got.end_logits, expected.end_logits)
    assert again.model is None and again.num_layers == int8_model.num_layers
    assert again.facts["inc_units"] == first.facts["inc_units"] and "plain_qdq" not in again.facts
    # A graph the cache lacks (another count of leading full layers) is the one thing that needs the model.
    with pytest.raises(AssertionError, match="the PT2E replay ran"):
        again(**batch, keep_ratios=[1.0, 0.6])


def test_a_changed_artifact_or_qala_builds_its_graphs_again(fp32_model, artifact, tmp_path, monkeypatch):
    from qala.quantize import qdq

    model_dir, workdir = tmp_path / "model", tmp_path / "engines"
    shutil.copytree(artifact, model_dir)
    batch = mixed_batch()
    IncQdqEngine = qdq.IncQdqEngine
    IncQdqEngine(model_dir, workdir=workdir)
    loads = _loads(monkeypatch)

    # The same path, another artifact (saved again from another calibration: other scales, another manifest).
    config = StaticQuantConfig(w_granularity="per_channel")
    other = quantize_(copy.deepcopy(fp32_model), config, calibration(seed=1), fp32_units=["encoder.*"])
    shutil.rmtree(model_dir)
    save_quantized(other, model_dir, approach="static", fp32_units=["encoder.*"], quant_config=config.to_dict())
    engine = IncQdqEngine(model_dir, workdir=workdir)
    assert loads == [model_dir] and engine.facts["inc_units"] == ["qa_outputs"]
    with torch.no_grad():
        assert tracks(window_errors(engine(**batch), other(**batch), batch["attention_mask"]))
    assert len(list(workdir.glob("inc-*"))) == 2  # keyed by content: the first artifact's graphs are not served

    # Another qala (or library) writes the graphs: built again, not the old code's files.
    monkeypatch.setattr(qdq, "code_version", lambda: "another")
    IncQdqEngine(model_dir, workdir=workdir)
    assert len(loads) == 2 and len(list(workdir.glob("inc-*"))) == 3


def test_a_damaged_cache_is_built_again_not_trusted(artifact, tmp_path, monkeypatch, caplog):
    from qala.quantize.qdq import CACHE_INDEX, IncQdqEngine

    batch = mixed_batch()
    expected = IncQdqEngine(artifact, workdir=tmp_path)(**batch)
    (folder,) = tmp_path.glob("inc-*")
    loads = _loads(monkeypatch)

    # A graph that is no longer the file its index recorded (a truncated copy, a flipped byte): built again.
    graph = folder / "plain.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    got = IncQdqEngine(artifact, workdir=tmp_path)(**batch)
    assert len(loads) == 1 and "is missing or not the file its index recorded: built again" in caplog.text
    assert torch.equal(got.start_logits, expected.start_logits)

    # An index that is no JSON, or of another key: its graphs are not served, and the index is written again.
    for damage in ("{not json", json.dumps({"key": "another", "graphs": {}, "num_layers": 2})):
        (folder / CACHE_INDEX).write_text(damage)
        got = IncQdqEngine(artifact, workdir=tmp_path)(**batch)
        assert torch.equal(got.end_logits, expected.end_logits)
    assert len(loads) == 3 and caplog.text.count("unreadable") >= 2
    _no_replay(monkeypatch)
    IncQdqEngine(artifact, workdir=tmp_path)  # whole again


OV_OPTIONS = {"buckets": [32, 64], "batch_sizes": [1, 4]}


@needs_ov
def test_openvino_inc_serves_a_cached_artifact_without_replaying_pt2e(artifact, int8_model, tmp_path, monkeypatch):
    batch = mixed_batch()
    first = make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)
    built = first(**batch)
    assert "plain_qdq" in first.facts
    with torch.no_grad():
        assert tracks(window_errors(built, int8_model(**batch), batch["attention_mask"]))

    _no_replay(monkeypatch)
    again = make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)
    got = again(**batch)
    assert torch.equal(got.start_logits, built.start_logits) and torch.equal(got.end_logits, built.end_logits)
    assert again.model is None and "plain_qdq" not in again.facts
    assert again.facts["inc_units"] == first.facts["inc_units"]
    assert (again.num_layers, again.max_seq_length) == (int8_model.num_layers, int8_model.qala_config.max_seq_length)
    # OpenVINO's compiled blobs keyed by the artifact's content, inside its QDQ cache folder.
    assert again.folder == first.folder == again.cache.folder / "openvino"
    assert any((again.folder / "ov_cache").iterdir())
    quantized = len(json.loads((artifact / "quantization.json").read_text())["int8_weights"])
    assert again.int8_precisions().get("FullyConnected:u8") == quantized  # INT8 kernels, from the cached graph


@needs_ov
def test_openvino_inc_reads_the_graph_onnxruntime_inc_cached(artifact, tmp_path, monkeypatch):
    from qala.quantize.qdq import IncQdqEngine

    batch = mixed_batch()
    expected = IncQdqEngine(artifact, workdir=tmp_path)(**batch)
    _no_replay(monkeypatch)
    engine = make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)
    assert tracks(window_errors(engine(**batch), expected, batch["attention_mask"]))
    assert len(list(tmp_path.glob("inc-*"))) == 1


@needs_ov
def test_openvino_inc_builds_a_damaged_or_older_cache_again(artifact, tmp_path, monkeypatch, caplog):
    from qala.quantize.qdq import CACHE_INDEX

    batch = mixed_batch()
    expected = make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)(**batch)
    (folder,) = tmp_path.glob("inc-*")
    loads = _loads(monkeypatch)

    # A truncated cached graph: built again from the artifact, not handed to OpenVINO.
    graph = folder / "plain.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    got = make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)(**batch)
    assert loads == [artifact] and "is missing or not the file its index recorded: built again" in caplog.text
    assert torch.equal(got.start_logits, expected.start_logits) and torch.equal(got.end_logits, expected.end_logits)

    # An index written before max_seq_length was recorded: the graph is built again, which records it.
    index = json.loads((folder / CACHE_INDEX).read_text())
    del index["max_seq_length"]
    (folder / CACHE_INDEX).write_text(json.dumps(index))
    make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)
    assert len(loads) == 2 and "max_seq_length" in json.loads((folder / CACHE_INDEX).read_text())
    _no_replay(monkeypatch)
    make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)  # whole again


@needs_ov
def test_openvino_inc_from_the_cache_refuses_keep_configurations(artifact, tmp_path, monkeypatch):
    make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)
    _no_replay(monkeypatch)
    engine = make_engine(artifact, "openvino-inc", workdir=tmp_path, **OV_OPTIONS)
    batch = mixed_batch()
    refusal = r"^engine 'openvino-inc' runs full length only, not keep configuration \["
    for config in ({"keep_ratios": [0.9, 0.6]}, {"length_config": [30, 12]}):
        with pytest.raises(ValueError, match=refusal):
            engine(**batch, **config)
    with pytest.raises(ValueError) as refused:
        engine.warmup(lengths=[16], keep_ratios=[None, [0.9, 0.6]])
    assert "\n" not in str(refused.value) and str(refused.value).endswith("use 'onnxruntime-inc'")
    assert engine.warmup(lengths=[16])["graphs"] == 1  # full length only, the model never needed
    assert engine.model is None


def test_an_fp32_directory_is_refused_before_anything_is_built(tiny_checkpoint, tmp_path):
    from qala.quantize.qdq import IncQdqEngine

    with pytest.raises(ValueError, match=r"^engine 'onnxruntime-inc' serves an INC INT8 artifact"):
        IncQdqEngine(tiny_checkpoint, workdir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_qala_answer_serves_a_calibrated_artifact_without_replaying_pt2e(tiny_int8_artifact, tmp_path, monkeypatch):
    # The cold start of `python -m qala.answer` once calibrated: the engine recorded as fastest, its graphs read from
    # the model's .engines folder, the artifact's files checked, its model never rebuilt.
    from qala.answer import ENGINE_DIR, QalaModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_int8_artifact, model_dir)
    report = QalaModel.calibrate(model_dir, engines=["onnxruntime-inc"], latency_repeats=1)
    assert report["fastest"] == "onnxruntime-inc" and list((model_dir / ENGINE_DIR).glob("inc-*/plain.onnx"))

    _no_replay(monkeypatch)
    served = QalaModel.from_pretrained(model_dir, warm=False)
    assert served.engine == "onnxruntime-inc" and served.model.model is None
    result = served.answer("Who wrote the book?", "The book was written by Jane Smith in 1999.")
    assert isinstance(result["answer"], str) and math.isfinite(result["score"])
