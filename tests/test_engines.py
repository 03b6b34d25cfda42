"""Serving engines (qala.quantize.engines): each backend equals the PyTorch model on unpadded windows of any length."""

import copy
import importlib.util

import pytest
import torch
from neural_compressor.torch.quantization import StaticQuantConfig

from qala.model import LengthAdaptiveForQuestionAnswering, kept_per_layer
from qala.quantize import quantize_
from qala.quantize.engines import BACKENDS, make_engine, ratio_table

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install -e '.[onnx]')")

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
    return [{}, {"keep_ratios": RATIOS}, {"length_config": kept_per_layer([0.7, 0.5], n)}]


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
    assert {"eager", "compile-dynamic", "onnxruntime", "onnxruntime-int8"} <= set(BACKENDS)
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


@pytest.mark.parametrize("backend", ["eager", "compile-dynamic", pytest.param("onnxruntime", marks=needs_ort)])
def test_fp32_backends_equal_pytorch_at_every_length(model, backend, tmp_path):
    engine = make_engine(model, backend, **({"workdir": tmp_path} if backend.startswith("onnx") else {}))
    engine.warmup(lengths=(8, 16, 40))
    for n in LENGTHS:
        for config in configs(n):
            assert max_error(engine, model, window(n), config) < FP32_TOLERANCE, (n, config)
    if backend == "compile-dynamic":
        assert engine.compiles_after_warmup == 0


@needs_ort
def test_onnx_mixed_length_batch_equals_each_window_alone(model, tmp_path):
    engine = make_engine(model, "onnxruntime", workdir=tmp_path)
    rows = [window(n) for n in (12, 30)]
    batch = {k: torch.stack([torch.nn.functional.pad(r[k][0], (0, 30 - r[k].size(1))) for r in rows]) for k in rows[0]}
    for config in ({}, {"keep_ratios": RATIOS}):
        got = engine(**batch, **config)
        for b, row in enumerate(rows):
            n = row["input_ids"].size(1)
            with torch.no_grad():
                alone = model(**row, **config)
            assert float((got.start_logits[b, :n] - alone.start_logits[0]).abs().max()) < FP32_TOLERANCE


@pytest.fixture(scope="module")
def int8_model(model):
    batches = [{"input_ids": w["input_ids"], "attention_mask": w["attention_mask"]} for w in map(window, (16, 16))]
    batches = [dict(**{k: torch.cat([b[k], b[k]]) for k in b}) for b in batches]
    return quantize_(copy.deepcopy(model), StaticQuantConfig(w_granularity="per_channel"), batches)


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
def test_onnxruntime_int8_tracks_fp32(model, int8_model, tmp_path):
    # ORT dynamic INT8 quantizes activations per call: compared with fp32 at full length, where token
    # selection cannot change which tokens survive. An INT8 artifact is exported from its fp32 weights.
    engine = make_engine(int8_model, "onnxruntime-int8", workdir=tmp_path)
    scale = max(float(model(**window(n)).start_logits.abs().max()) for n in LENGTHS)
    for n in LENGTHS:
        assert max_error(engine, model, window(n), {}) < 0.1 * scale + 0.02, n
