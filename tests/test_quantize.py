"""INT8 quantization of the length-adaptive model: static, dynamic, QAT, the artifact, CompiledQA, IPEX.

Tiny random models (2 layers, hidden 32) keep this file fast; logit tolerances are loose because
random weights give small, tightly packed logits, and what is checked is that INT8 tracks fp32.
"""

import copy
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig
from safetensors.torch import load_file, save_file

from qala.lengths import smallest_length_config
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize import (
    QAT_CONFIG,
    ArtifactError,
    CompiledQA,
    QuantizedUnit,
    convert_qat_,
    fp32_state_dict,
    load_quantized,
    prepare_qat_,
    quantizable_units,
    quantize_,
    save_quantized,
)
from qala.quantize.units import graph_ops
from tests.conftest import REPO
from tests.test_model import make_batch, tiny_bert_config

LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
QDQ_OPS = {"quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_channel.default"}
SHORT = [12, 5]  # a length configuration for the 24-token test batches
CALIBRATION_CONFIGS = [None, [20, 10], SHORT, [16, 16]]
DYNAMIC_CONFIG = DynamicQuantConfig(w_granularity="per_channel")
# Under pytest-xdist, this module's tests run in one worker: its quantized models (module fixtures) are built once.
pytestmark = pytest.mark.xdist_group("test_quantize")


def tiny_model(seed: int = 0) -> LengthAdaptiveForQuestionAnswering:
    torch.manual_seed(seed)
    return LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()


def batch_dict(seed: int = 0, length_config=None, **kw) -> dict:
    input_ids, mask, token_type_ids = make_batch(seed=seed, **kw)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": token_type_ids,
        "length_config": length_config,
    }


def calibration_batches() -> list[dict]:
    return [batch_dict(seed=i, length_config=lc) for i, lc in enumerate(CALIBRATION_CONFIGS)]


@torch.no_grad()
def logits(model, batch: dict, length_config=None) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "length_config"}
    out = model(**inputs, length_config=length_config)
    return torch.stack([out.start_logits, out.end_logits])


def activation_ranges(unit: QuantizedUnit) -> set[tuple[int, int]]:
    """(quant_min, quant_max) of every per-tensor (activation) quantize op of a converted unit."""
    return {
        tuple(node.args[3:5])
        for node in unit.graph_module.graph.nodes
        if node.target == torch.ops.quantized_decomposed.quantize_per_tensor.default
    }


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def static_pair():
    """(fp32 reference, static INT8 copy calibrated on a mix of length configurations)."""
    reference = tiny_model()
    quantized = quantize_(copy.deepcopy(reference), StaticQuantConfig(), calibration_batches())
    return reference, quantized


# ------------------------------------------------------------------ static


def test_static_units_are_quantized_and_track_fp32(static_pair):
    reference, quantized = static_pair
    units = quantizable_units(quantized)
    assert list(units) == [
        "encoder.layer.0.attention",
        "encoder.layer.0.intermediate",
        "encoder.layer.0.output",
        "encoder.layer.1.attention",
        "encoder.layer.1.intermediate",
        "encoder.layer.1.output",
        "qa_outputs",
    ]
    for name, unit in units.items():
        assert isinstance(unit, QuantizedUnit) and unit.stage == "converted", name
        assert QDQ_OPS <= graph_ops(unit), name
    batch = batch_dict(seed=7)
    for lengths in (None, SHORT):
        expected, got = logits(reference, batch, lengths), logits(quantized, batch, lengths)
        # Tiny random logits span about +-0.4; seen: max error 0.003-0.004.
        assert max_error(got, expected) < 0.03, lengths
    assert not torch.equal(logits(quantized, batch), logits(quantized, batch, SHORT))  # the lengths matter


def test_one_set_of_units_serves_every_shape_and_length(static_pair):
    reference, quantized = static_pair
    graphs = {name: id(unit.graph_module) for name, unit in quantizable_units(quantized).items()}
    cases = [
        (batch_dict(seed=3), [24, 3]),
        (batch_dict(seed=4, batch=1, seq=24, pad_from=(20,)), SHORT),
        (batch_dict(seed=5, batch=5, seq=40, pad_from=(40, 33, 20, 9, 2)), [30, 12]),
        (batch_dict(seed=6, batch=2, seq=7, pad_from=(7, 5)), [3, 1]),  # one token left in the last layer
    ]
    for batch, lengths in cases:
        expected, got = logits(reference, batch, lengths), logits(quantized, batch, lengths)
        assert got.shape == expected.shape
        assert max_error(got, expected) < 0.03, lengths
    assert graphs == {name: id(unit.graph_module) for name, unit in quantizable_units(quantized).items()}


def test_calibration_runs_every_batch_with_its_own_length_config():
    seen = []

    def stream():
        for batch in calibration_batches():
            seen.append(batch["length_config"])
            yield batch

    model = tiny_model()
    quantize_(model, StaticQuantConfig(), stream(), fp32_units=["encoder.layer.*"])
    assert seen == CALIBRATION_CONFIGS
    assert isinstance(model.qa_outputs, QuantizedUnit)


def test_fp32_units_are_left_untouched():
    model = tiny_model()
    layer0 = model.bert.encoder.layer[0]
    originals = {"attention": layer0.attention, "intermediate": layer0.intermediate, "output": layer0.output}
    head = model.qa_outputs
    quantize_(model, StaticQuantConfig(), calibration_batches()[:2], fp32_units=["qa_outputs", "encoder.layer.0.*"])
    assert model.qa_outputs is head and isinstance(head, torch.nn.Linear)
    for kind, module in originals.items():
        assert getattr(model.bert.encoder.layer[0], kind) is module
    assert all(isinstance(getattr(model.bert.encoder.layer[1], kind), QuantizedUnit) for kind in originals)


def test_bad_arguments_are_rejected_before_any_work():
    model = tiny_model()
    with pytest.raises(ValueError, match="match no unit"):
        quantize_(model, StaticQuantConfig(), calibration_batches(), fp32_units=["encoder.layers.0.*"])
    with pytest.raises(TypeError, match="StaticQuantConfig"):
        quantize_(model, {"w_dtype": "int8"}, calibration_batches())
    with pytest.raises(ValueError, match="tuning"):
        quantize_(model, StaticQuantConfig(act_sym=[True, False]), calibration_batches())
    with pytest.raises(ValueError, match="no batch"):
        quantize_(model, StaticQuantConfig(), [])
    with pytest.raises(ValueError, match="every unit"):
        quantize_(model, StaticQuantConfig(), calibration_batches(), fp32_units=["*"])
    assert not any(isinstance(m, QuantizedUnit) for m in quantizable_units(model).values())


def test_failed_calibration_puts_the_original_units_back():
    model = tiny_model()
    before = quantizable_units(model)
    bad = batch_dict(seed=1)
    bad["input_ids"] = bad["input_ids"][0]  # 1-D: rejected during calibration
    with pytest.raises(ValueError, match="2-D"):
        quantize_(model, StaticQuantConfig(), [batch_dict(), bad], fp32_units=["encoder.*"])
    assert quantizable_units(model) == before


def test_quantizing_twice_is_an_error(static_pair):
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(static_pair[1], StaticQuantConfig(), calibration_batches())


# ------------------------------------------------------------------ dynamic


@pytest.fixture(scope="module")
def dynamic_pair():
    def one_batch_only():
        yield batch_dict(seed=0)
        raise AssertionError("dynamic quantization must not read a second calibration batch")

    reference = tiny_model()
    # per_channel: INC's default per-tensor weights get no int8 kernel from Inductor.
    return reference, quantize_(copy.deepcopy(reference), DYNAMIC_CONFIG, one_batch_only())


def test_dynamic_needs_one_batch_and_tracks_fp32(dynamic_pair):
    reference, quantized = dynamic_pair
    unit = quantized.bert.encoder.layer[0].attention
    assert isinstance(unit, QuantizedUnit) and unit.approach == "dynamic"
    # The weight observers were filled by the one forward (without it the scales are garbage).
    assert any(k.endswith("min_val") and torch.isfinite(v).all() for k, v in unit.observer_state.items())
    batch = batch_dict(seed=7)
    for lengths in (None, SHORT):
        assert max_error(logits(quantized, batch, lengths), logits(reference, batch, lengths)) < 0.03


# ------------------------------------------------------------------ QAT


def dropout_nodes(unit: QuantizedUnit) -> list[tuple]:
    return [
        tuple(node.args[1:])
        for node in unit.graph_module.graph.nodes
        if node.op == "call_function" and node.target == torch.ops.aten.dropout.default
    ]


@pytest.fixture(scope="module")
def qat_run():
    """A QAT model trained a few sandwich steps, its fake-quant eval logits, then converted."""
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_qat_(model, batch_dict(seed=0))
    attention = model.bert.encoder.layer[0].attention
    record = {"dropout_train": dropout_nodes(attention), "before": before}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = {k: v for k, v in batch_dict(seed=1).items() if k != "length_config"}
    positions = {"start_positions": torch.tensor([1, 2, 3]), "end_positions": torch.tensor([2, 4, 5])}
    smallest = smallest_length_config(24, 2, 0.5)
    for _ in range(3):
        optimizer.zero_grad()
        for lengths in (None, smallest):  # LengthDrop sandwich: full and smallest sub-model
            model(**batch, **positions, length_config=lengths).loss.backward()
        record.setdefault("grad", attention.graph_module.get_parameter("self.query.weight").grad.clone())
        optimizer.step()

    model.eval()
    record["dropout_eval"] = dropout_nodes(attention)
    test_batch = batch_dict(seed=7)
    record["fake_quant"] = {str(lc): logits(model, test_batch, lc) for lc in (None, SHORT)}
    record["fake_quant_again"] = logits(model, test_batch)
    model.train()
    record["dropout_train_again"] = dropout_nodes(attention)
    record["mid_qat_weights"] = fp32_state_dict(model)
    convert_qat_(model)
    return model, record


def test_qat_trains_the_unit_weights(qat_run):
    model, record = qat_run
    assert record["grad"].abs().sum() > 0  # gradients flow through the fake-quantizers
    changed = [
        k for k, v in model.state_dict().items() if k in record["before"] and not torch.equal(v, record["before"][k])
    ]
    assert any("embeddings" in k for k in changed)  # outside the units
    unit = model.bert.encoder.layer[0].intermediate
    assert not torch.equal(
        unit.source_state["dense.weight"], record["before"]["bert.encoder.layer.0.intermediate.dense.weight"]
    )


def test_mid_qat_weights_load_into_a_plain_model(qat_run):
    model, record = qat_run
    plain = tiny_model()
    plain.load_state_dict(record["mid_qat_weights"], strict=True)
    trained = model.bert.encoder.layer[1].output.source_state["dense.weight"]
    assert torch.equal(plain.bert.encoder.layer[1].output.dense.weight, trained)


def test_qat_dropout_follows_train_and_eval(qat_run):
    _, record = qat_run
    assert record["dropout_train"] and all(train for _, train in record["dropout_train"])
    assert all(not train for _, train in record["dropout_eval"])
    assert record["dropout_train_again"] == record["dropout_train"]  # p kept (torchao's rewrite resets it to 0.5)
    # Eval is deterministic: no dropout, and evaluation does not move the fake-quant ranges.
    assert torch.equal(record["fake_quant"]["None"], record["fake_quant_again"])


def test_qat_converts_to_int8_close_to_the_fake_quant_model(qat_run):
    model, record = qat_run
    assert not model.training
    for name, unit in quantizable_units(model).items():
        assert unit.stage == "converted" and QDQ_OPS <= graph_ops(unit), name
    batch = batch_dict(seed=7)
    for lengths in (None, SHORT):
        # seen: 4e-4 on logits of about +-1
        assert max_error(logits(model, batch, lengths), record["fake_quant"][str(lengths)]) < 0.02
    with pytest.raises(ValueError, match="no QAT units"):
        convert_qat_(model)


# ------------------------------------------------------------------ artifact

RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    from safetensors.torch import load_file, save_file
    import torch
    from qala.quantize import load_quantized

    batch = load_file(sys.argv[1])
    out = {}
    for name in sys.argv[3:]:
        model = load_quantized(sys.argv[2] + "/" + name)
        with torch.no_grad():
            for tag, lengths in (("full", None), ("short", [12, 5])):
                o = model(**batch, length_config=lengths)
                out[f"{name}/{tag}"] = torch.stack([o.start_logits, o.end_logits])
    save_file(out, sys.argv[2] + "/logits.safetensors")
    """
)


@pytest.fixture(scope="module")
def static_int8_embeddings():
    """Static INT8 with the word-embedding table int8 too: the whole model as it ships."""
    return quantize_(tiny_model(), StaticQuantConfig(), calibration_batches(), int8_embeddings=True)


@pytest.fixture(scope="module")
def static_weight_only():
    """Static INT8 with one unit kept fp32 but its weights int8 (weight-only), embeddings int8."""
    return quantize_(
        tiny_model(),
        StaticQuantConfig(),
        calibration_batches(),
        fp32_units=["encoder.layer.0.output"],
        int8_embeddings=True,
        fp32_unit_weights="int8",
    )


def test_artifacts_reload_identically_in_a_fresh_process(
    tmp_path, static_pair, dynamic_pair, qat_run, static_int8_embeddings, static_weight_only
):
    models = {
        "static": static_pair[1],
        "dynamic": dynamic_pair[1],
        "qat": qat_run[0],
        "static_emb": static_int8_embeddings,
        "static_wo": static_weight_only,
    }
    configs = {"static": StaticQuantConfig().to_dict(), "dynamic": DYNAMIC_CONFIG.to_dict(), "qat": QAT_CONFIG}
    for name, model in models.items():
        approach = name.partition("_")[0]
        size = save_quantized(
            model,
            tmp_path / name,
            approach=approach,
            fp32_units=["encoder.layer.0.output"] if name == "static_wo" else (),
            quant_config=configs[approach],
            served_length_configs=[SHORT, [24, 24]],
            extra={"note": "test"},
        )
        assert size > 0
    record = json.loads((tmp_path / "static" / "quantization.json").read_text())
    assert record["approach"] == "static" and record["served_length_configs"] == [SHORT, [24, 24]]
    assert record["reduce_range"] == static_pair[1].qa_outputs.reduce_range
    assert record["units"]["fp32"] == [] and len(record["units"]["quantized"]) == 7
    files = {p.name for p in (tmp_path / "static").iterdir()}
    assert {"config.json", "qala_config.json", "int8_weights.safetensors", "observers.safetensors"} <= files
    assert "model.safetensors" not in files  # transformers must not mistake it for an fp32 checkpoint
    manifest = json.loads((tmp_path / "static" / "manifest.json").read_text())["sha256"]
    assert set(manifest) == files - {"manifest.json"}

    # A true INT8 artifact: every Linear weight of a quantized unit is stored int8 with its scales and
    # no fp32 copy; with int8_embeddings the word-embedding table too.
    for name in models:
        stored = load_file(str(tmp_path / name / "int8_weights.safetensors"))
        record = json.loads((tmp_path / name / "quantization.json").read_text())
        linear = [f"bert.encoder.layer.{i}.{m}.weight" for i in range(2) for m in LINEARS] + ["qa_outputs.weight"]
        if name == "static_wo":  # the fp32 unit's weight is int8 weight-only: qweight + scale
            linear.remove("bert.encoder.layer.0.output.dense.weight")
            assert record["weight_only_int8"] == ["bert.encoder.layer.0.output.dense"]
            assert stored["bert.encoder.layer.0.output.dense.qweight"].dtype == torch.int8
        assert sorted(record["int8_weights"]) == sorted(linear), name
        for key in linear:
            assert stored[key].dtype == torch.int8, (name, key)
            assert stored[f"{key}.scale"].dtype == torch.float32, (name, key)
        # The only floating-point tensors left: biases, LayerNorms, scales and the small embedding tables.
        allowed = (".bias", "LayerNorm.weight", ".scale", "position_embeddings.weight", "token_type_embeddings.weight")
        allowed += ("word_embeddings.weight",) if name not in ("static_emb", "static_wo") else ()
        floats = [k for k, t in stored.items() if t.is_floating_point()]
        assert all(k.endswith(allowed) for k in floats), (name, [k for k in floats if not k.endswith(allowed)])
    emb = load_file(str(tmp_path / "static_emb" / "int8_weights.safetensors"))
    assert emb["bert.embeddings.word_embeddings.qweight"].dtype == torch.int8
    assert "bert.embeddings.word_embeddings.weight" not in emb

    batch = {k: v for k, v in batch_dict(seed=11).items() if k != "length_config"}
    save_file(batch, str(tmp_path / "batch.safetensors"))
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path / "batch.safetensors"), str(tmp_path), *models],
        check=True,
        timeout=300,
    )
    reloaded = load_file(str(tmp_path / "logits.safetensors"))
    for name, model in models.items():
        for tag, lengths in (("full", None), ("short", SHORT)):
            assert torch.equal(reloaded[f"{name}/{tag}"], logits(model, batch, lengths)), (name, tag)


def test_save_checks_what_the_model_was_quantized_with(tmp_path, static_pair):
    _, quantized = static_pair
    with pytest.raises(ValueError, match="quantized with 'static'"):
        save_quantized(quantized, tmp_path / "a", approach="dynamic")
    with pytest.raises(ValueError, match="differs"):
        save_quantized(
            quantized, tmp_path / "a", approach="static", quant_config=StaticQuantConfig(act_sym=True).to_dict()
        )
    with pytest.raises(ValueError, match="no quantized units"):
        save_quantized(tiny_model(), tmp_path / "a", approach="static")
    assert not (tmp_path / "a").exists()


def _rewrite_record(path, **changes) -> None:
    file = path / "quantization.json"
    record = json.loads(file.read_text())
    record.update(changes)
    file.write_text(json.dumps(record))


def _refresh_manifest(path) -> None:
    """Make the manifest agree with the files again, to reach the checks behind it."""
    from qala.quantize.artifact import _sha256

    file = path / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["sha256"] = {name: _sha256(path / name) for name in manifest["sha256"]}
    file.write_text(json.dumps(manifest))


def test_bad_artifacts_name_the_file_at_fault(tmp_path, static_pair):
    good = tmp_path / "good"
    save_quantized(static_pair[1], good, approach="static", quant_config=StaticQuantConfig().to_dict())

    def variant(name):
        target = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(target)], check=True)
        return target

    missing = variant("missing")
    (missing / "observers.safetensors").unlink()
    with pytest.raises(ArtifactError, match="observers.safetensors: missing"):
        load_quantized(missing)

    no_record = variant("no-record")
    (no_record / "quantization.json").unlink()
    with pytest.raises(ArtifactError, match="quantization.json: missing"):
        load_quantized(no_record)
    # The one loader every stage uses does not take it for an fp32 directory either.
    from qala.quantize.load import load_model

    with pytest.raises(ArtifactError, match="quantization.json: missing, but int8_weights.safetensors is there"):
        load_model(no_record)

    # The manifest covers the configs, not only the weights: an edited quantization.json is named.
    edited = variant("edited")
    _rewrite_record(edited, reduce_range=True)
    with pytest.raises(ArtifactError, match="quantization.json: SHA-256 differs from manifest.json"):
        load_quantized(edited)
    config = variant("edited-config")
    (config / "config.json").write_text((config / "config.json").read_text().replace('"hidden_act"', '"hidden_act" '))
    with pytest.raises(ArtifactError, match="config.json: SHA-256 differs"):
        load_quantized(config)

    truncated = variant("truncated")
    data = (truncated / "int8_weights.safetensors").read_bytes()
    (truncated / "int8_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="int8_weights.safetensors: SHA-256 differs"):
        load_quantized(truncated)
    _refresh_manifest(truncated)  # even with a matching checksum, a truncated file is named
    with pytest.raises(ArtifactError, match="int8_weights.safetensors: cannot be read as safetensors"):
        load_quantized(truncated)

    no_manifest = variant("no-manifest")
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_quantized(no_manifest)

    unknown = variant("unknown-approach")
    _rewrite_record(unknown, approach="awq")
    _refresh_manifest(unknown)
    with pytest.raises(ArtifactError, match="quantization.json: unknown approach 'awq'"):
        load_quantized(unknown)

    # A consistent file set whose observers do not fit the recorded approach.
    other = variant("other-approach")
    _rewrite_record(other, approach="dynamic", quant_config=DynamicQuantConfig().to_dict())
    _refresh_manifest(other)
    with pytest.raises(ArtifactError, match="observers.safetensors: observer state of unit encoder.layer.0.attention"):
        load_quantized(other)

    reshaped = variant("reshaped")
    weights = load_file(str(reshaped / "int8_weights.safetensors"))
    weights["bert.encoder.layer.1.intermediate.dense.bias"] = torch.zeros(5)
    save_file(weights, str(reshaped / "int8_weights.safetensors"))
    _refresh_manifest(reshaped)
    with pytest.raises(ArtifactError, match="int8_weights.safetensors: does not fit"):
        load_quantized(reshaped)

    # The CLI that loads artifacts: one line naming the file, exit status 2.
    data_file = str(REPO / "qala" / "samples" / "squad_sample_dev.json")
    result = subprocess.run(
        [sys.executable, "-m", "qala.evaluate", str(edited), data_file, "--max-samples", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quantization.json: SHA-256 differs" in errors[0], result.stderr[-2000:]


# ------------------------------------------------------------------ sensitivity and int8 embeddings


def test_sensitivity_gives_one_score_per_unit(static_pair):
    from qala.quantize.sensitivity import unit_sensitivity

    reference, quantized = static_pair
    batch = batch_dict(seed=5)
    expected = logits(reference, batch)
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    def error(model):  # stands in for F1 on a dev subset
        return max_error(logits(model, batch), expected)

    only = unit_sensitivity(reference, StaticQuantConfig(), calibration_batches(), error)
    assert list(only) == list(quantizable_units(quantized))
    assert all(isinstance(v, float) and v > 0 for v in only.values())  # one INT8 unit moves the logits
    all_but = unit_sensitivity(reference, None, None, error, mode="all_but", quantized=quantized)
    assert list(all_but) == list(only)
    assert max(all_but.values()) <= error(quantized) * 1.5  # fp32 for one unit never costs much more
    # The fp32 model and the quantized one come back unchanged.
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert all(isinstance(u, QuantizedUnit) for u in quantizable_units(quantized).values())
    picked = unit_sensitivity(reference, None, None, error, units=["qa_outputs"], quantized=quantized)
    assert list(picked) == ["qa_outputs"]
    with pytest.raises(ValueError, match="not quantized"):
        unit_sensitivity(reference, None, None, error, units=["nope"], quantized=quantized)


def test_int8_embeddings_are_per_row_and_close_to_fp32():
    from qala.quantize.embedding import Int8Embedding, quantize_embeddings_

    model = tiny_model()
    table = model.backbone.embeddings.word_embeddings.weight.detach().clone()
    quantize_embeddings_(model)
    int8 = model.backbone.embeddings.word_embeddings
    assert isinstance(int8, Int8Embedding) and int8.qweight.dtype == torch.int8
    ids = torch.arange(table.size(0))
    # Symmetric per-row int8: error at most half a step of that row.
    assert ((int8(ids) - table).abs() <= int8.scale[:, None] / 2 + 1e-7).all()
    assert not any(p.is_floating_point() and p.shape == table.shape for p in model.parameters())


# ------------------------------------------------------------------ CompiledQA


def test_compiled_qa_builds_one_graph_per_shape_and_caches_it(static_pair):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()  # the "eager" backend that counts graphs: cheap, same Dynamo guards
    compiled = CompiledQA(static_pair[1], backend=counter)
    batch = batch_dict(seed=2)
    inputs = {k: v for k, v in batch.items() if k != "length_config"}
    small = {k: v[:2, :16] for k, v in inputs.items()}
    calls = [(inputs, None), (inputs, SHORT), (inputs, [20, 10]), (small, SHORT)]
    for call_inputs, lengths in calls + calls:  # every key twice: the second round must hit the cache
        out = compiled(**call_inputs, length_config=lengths)
    assert counter.frame_count == len(calls)
    assert set(compiled.compile_seconds) == {(None, 3, 24), ((12, 5), 3, 24), ((20, 10), 3, 24), ((12, 5), 2, 16)}
    assert all(seconds > 0 for seconds in compiled.compile_seconds.values())
    torch.testing.assert_close(out.start_logits, logits(static_pair[1], small, SHORT)[0])  # eager backend: same ops


def test_compiled_int8_uses_onednn_kernels_and_matches_eager(static_pair):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    quantized = static_pair[1]
    compiled = CompiledQA(quantized)
    batch = batch_dict(seed=9)
    inputs = {k: v for k, v in batch.items() if k != "length_config"}
    out, code = run_and_get_code(compiled, **inputs, length_config=SHORT)
    assert "onednn.qlinear_pointwise" in "\n".join(code)
    # The int8 kernels compute what the q/dq graph describes (seen: 6e-8; 0.06 with saturating kernels).
    got = torch.stack([out.start_logits, out.end_logits])
    assert max_error(got, logits(quantized, batch, SHORT)) < 1e-5
    assert list(compiled.compile_seconds) == [((12, 5), 3, 24)]


def test_full_range_int8_is_not_compiled_where_kernels_would_saturate():
    from qala.quantize.units import cpu_has_vnni

    head_only = {"fp32_units": ["encoder.*"]}
    model = quantize_(tiny_model(), StaticQuantConfig(), calibration_batches()[:1], **head_only)
    assert model.qa_outputs.reduce_range == (not cpu_has_vnni())  # the default follows the CPU
    full = quantize_(tiny_model(), StaticQuantConfig(), calibration_batches()[:1], **head_only, reduce_range=False)
    reduced = quantize_(tiny_model(), StaticQuantConfig(), calibration_batches()[:1], **head_only, reduce_range=True)
    assert activation_ranges(full.qa_outputs) == {(0, 255)}
    assert activation_ranges(reduced.qa_outputs) == {(0, 127)}
    if cpu_has_vnni():
        pytest.skip("this CPU has VNNI: full-range int8 kernels are exact here")
    with pytest.raises(ValueError, match="reduce_range=True"):
        CompiledQA(full)
    CompiledQA(full, compile=False)  # the uncompiled q/dq graph is right at any range


# ------------------------------------------------------------------ IPEX


def test_ipex_backend_explains_what_it_needs():
    from qala.quantize import ipex

    installed, _ = ipex.ipex_status()
    if installed is not None and torch.__version__.startswith("2.8."):
        pytest.skip("IPEX is usable here; the error path is for environments without it")
    with pytest.raises(ipex.IpexUnavailableError, match=r"torch 2\.8\.x and intel-extension-for-pytorch 2\.8\.x"):
        ipex.import_ipex()
    with pytest.raises(ipex.IpexUnavailableError, match=re.escape(f"found torch {torch.__version__}")):
        ipex.IpexStaticQA(tiny_model(), calibration_batches())


def test_ipex_static_int8_per_length_config():
    from qala.quantize import ipex

    try:
        ipex.import_ipex()
    except ipex.IpexUnavailableError as e:
        pytest.skip(f"IPEX backend not runnable here: {e}")
    reference = tiny_model()
    qa = ipex.IpexStaticQA(copy.deepcopy(reference), calibration_batches())
    batch = batch_dict(seed=7)
    inputs = {k: v for k, v in batch.items() if k != "length_config"}
    start, _ = qa(**inputs, length_config=SHORT)
    assert max_error(start, logits(reference, batch, SHORT)[0]) < 0.05
