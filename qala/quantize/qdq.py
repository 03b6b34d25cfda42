"""INC's INT8 configuration served fast: the INT8 artifact exported as a static QDQ ONNX graph for ONNX Runtime.

`onnxruntime-int8` and `openvino-int8` re-quantize the fp32 weights on their own (ORT dynamic quantization,
NNCF); the configuration qala.tune tuned with Intel Neural Compressor (its scales, its fp32 units) is not what
they serve. The `onnxruntime-inc` engine serves exactly INC's configuration:

- every Linear of a unit INC quantized: QuantizeLinear -> DequantizeLinear on its activation input, with the
  scale and zero point of the unit's converted PT2E graph (computed from INC's observers, observers.safetensors:
  the very q/dq the PyTorch model runs), and its weight as INC's stored int8 values, scales and zero points
  (int8_weights.safetensors) behind a DequantizeLinear. ONNX Runtime fuses each such MatMul into an integer GEMM
  (MatMulIntegerToFloat: u8 activations x s8 weights, int32 sums);
- every unit INC left fp32 stays fp32; an int8 word-embedding table and the weight-only int8 Linears of fp32
  units (both dequantized before an fp32 op in PyTorch) are exported dequantized, the same arithmetic.

Unit -> ONNX node. torch's exporter folds each Linear's weight into a transposed initializer with a generated
name (`onnx::MatMul_N`), and the adaptive graph's node names lose the layer index (`/attention/self/query_1/
MatMul`), so no name says which Linear a MatMul is. The values do: a MatMul's weight initializer is exactly the
transposed weight that was exported (the dequantized INT8 weight, never equal for two Linears of a trained
model). Every weight INC quantized must match at least one MatMul, else the export stops naming the weight; the
span head may match several in the adaptive graph (span selection runs it at every layer, with the same INC
parameters, as PyTorch does).

The Q/DQ nodes come from onnxruntime.quantization's QDQQuantizer, given INC's parameters as
`TensorQuantOverrides` (exact scale / zero point per tensor and per weight channel; `tensors_range` holds the
range they represent), `nodes_to_quantize` = the matched MatMuls. Two fixes by hand, where the quantizer cannot
express INC's graph: (1) only the quantized MatMuls may read an activation's DequantizeLinear output (the
residual Add and LayerNorm read it in fp32 in INC's graph; `DedicatedQDQPair` keeps them off it only for
tensors with several quantized consumers); (2) a Clip before QuantizeLinear where INC quantized activations to
a reduced range (7 bits, `reduce_range` on CPUs without VNNI): QuantizeLinear saturates at its type's limits.
Two Linears with identical weights would match each other's MatMuls: correct if their parameters agree too,
else refused (two different scales for one tensor).

Served from an artifact directory (`IncQdqEngine(directory)`, what qala.answer does, or `IncOpenVinoEngine(directory)`),
the QDQ graphs are cached in workdir/inc-<key>/, keyed by the directory's content and the code that writes them
(QdqCache, shared by both engines: `openvino-inc` reads the same plain graph, and keeps OpenVINO's compiled blobs
in inc-<key>/openvino/): a cold start with the graphs it needs there reads them and never rebuilds the PyTorch
model (replaying PT2E took ~8 s of a 12 s cold start on the reference model, Zen 5). A cached file is served only
if its SHA-256 is the one its index recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize.artifact import _dequantize, fp32_state_dict, int8_weights
from qala.quantize.engines import default_buckets
from qala.quantize.load import artifact_configs, load_model, model_kind
from qala.quantize.onnx import OnnxEngine, artifact_dir, export_onnx, require_onnxruntime
from qala.quantize.openvino import BATCH_SIZES, PRECISIONS, Key, OpenVinoEngine, read_model, require_openvino
from qala.quantize.units import QuantizedUnit, quantized_units, state_prefix
from qala.utils import atomic_write_json, code_digest, content_hash, sha256_file

logger = logging.getLogger(__name__)

ENGINE, OV_ENGINE = "onnxruntime-inc", "openvino-inc"
# Part of every cache key: a change to how the graph is written must not meet files of the old writer.
QDQ_FORMAT = "qala-inc-qdq/1"
INC_QDQ_METHOD = (
    "INC's INT8 artifact as static QDQ ONNX: its activation scales / zero points and int8 weights, its fp32 units"
)
_QDQ = torch.ops.quantized_decomposed
_DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
# What a cached QDQ graph of an artifact directory is keyed by besides its content (see code_version): the sources
# that rebuild the model (PT2E replay), export it and write the Q/DQ nodes, relative to the qala package, and the
# libraries that do it. Any change to them builds the graphs again rather than serve a file of the old code.
CODE_SOURCES = ("model.py", "lengths.py", "quantize/*.py")
CODE_LIBRARIES = ("torch", "torchao", "neural-compressor-pt", "transformers", "onnx", "onnxruntime")
CACHE_INDEX = "index.json"


@dataclass(frozen=True)
class ActivationQuant:
    """The static per-tensor quantization INC's converted graph applies to a Linear's input."""

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    dtype: str  # "uint8" or "int8"

    @property
    def reduced(self) -> bool:
        """Narrower than its type (reduce_range): QuantizeLinear alone would saturate later than INC does."""
        return (self.quant_min, self.quant_max) != _DTYPES[self.dtype]


@dataclass(frozen=True)
class WeightQuant:
    """One Linear INC quantized: its int8 weight [out, in] as INC stored it, and its input's quantization."""

    unit: str
    int8: torch.Tensor
    scale: torch.Tensor  # [out] per channel, [] per tensor
    zero_point: torch.Tensor
    layout: Mapping[str, Any]  # scheme, axis, quant_min, quant_max, dtype (artifact.int8_weights)
    activation: ActivationQuant

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight the PyTorch model multiplies by: (q - zero_point) * scale, torch's own op."""
        return _dequantize(self.int8, self.scale, self.zero_point, self.layout)


def _call(node: Any, *targets: Any) -> Any:
    """`node` if it is a call to one of `targets`, else None."""
    return node if getattr(node, "op", None) == "call_function" and node.target in targets else None


_WEIGHT_DQ = (_QDQ.dequantize_per_channel.default, _QDQ.dequantize_per_tensor.default)
_WEIGHT_Q = (_QDQ.quantize_per_channel.default, _QDQ.quantize_per_tensor.default)


def _activation(engine: str, unit: str, x: Any) -> ActivationQuant:
    """The static q/dq of a Linear's input in a converted graph; ValueError if it is quantized per call."""
    dq = _call(x, _QDQ.dequantize_per_tensor.default)
    if dq is None or not isinstance(dq.args[1], float):
        raise ValueError(
            f"engine {engine!r} needs static activation scales; unit {unit} quantizes its activations per call "
            "(a dynamic INT8 artifact): use 'onnxruntime-int8' or 'compile-dynamic'"
        )
    _, scale, zero_point, qmin, qmax, dtype = dq.args
    return ActivationQuant(float(scale), int(zero_point), int(qmin), int(qmax), str(dtype).rpartition(".")[2])


def _unit_plan(model: nn.Module, name: str, unit: QuantizedUnit, engine: str) -> dict[str, WeightQuant]:
    """The quantized Linears of one converted unit, by the state-dict key of their weight.

    Refuses (ValueError) what this export would not reproduce: a quantized weight or activation that feeds
    anything but a Linear (X86InductorQuantizer quantizes only Linears' inputs in qala's units)."""
    if unit.stage != "converted":
        raise ValueError(f"engine {engine!r}: unit {name} is not converted (QAT: call convert_qat_ first)")
    weights = int8_weights(unit)  # the graph's own quantize op on each weight: the values INC stored
    plan: dict[str, WeightQuant] = {}
    linear = torch.ops.aten.linear.default
    for node in unit.graph_module.graph.nodes:
        if _call(node, _QDQ.dequantize_per_tensor.default) and any(
            _call(user, linear) is None or user.args[0] is not node for user in node.users
        ):
            raise ValueError(f"engine {engine!r}: unit {name} quantizes an input of an op other than a Linear")
        dq_w = _call(node, linear) and _call(node.args[1], *_WEIGHT_DQ)
        if dq_w is None:
            continue  # not a Linear, or one whose weight INC left fp32: fp32 in ONNX too
        q_w = _call(dq_w.args[0], *_WEIGHT_Q)
        target = str(q_w.args[0].target) if q_w is not None else ""
        if target not in weights:
            raise ValueError(f"engine {engine!r}: unit {name} has a quantized Linear weight it does not store")
        entry = weights[target]
        layout = {k: v for k, v in entry.items() if k not in ("int8", "scale", "zero_point")}
        activation = _activation(engine, name, node.args[0])
        key = state_prefix(model, name) + target
        plan[key] = WeightQuant(name, entry["int8"], entry["scale"], entry["zero_point"], layout, activation)
    unused = sorted(set(weights) - {k.removeprefix(state_prefix(model, name)) for k in plan})
    if unused:
        raise ValueError(f"engine {engine!r}: unit {name} quantizes weights {unused} that feed no Linear")
    return plan


def qdq_plan(model: nn.Module, engine: str = ENGINE) -> dict[str, WeightQuant]:
    """Every Linear INC quantized, by the state-dict key of its weight, with INC's parameters.

    ValueError (one line naming `engine`) unless `model` is an INC static INT8 model: an artifact loaded by
    qala.quantize.load_model (or make_engine on its directory), or a model quantize_ converted in memory.
    """
    units = quantized_units(model)
    if not units:
        raise _not_int8(engine)
    plan: dict[str, WeightQuant] = {}
    for name, unit in units.items():
        plan.update(_unit_plan(model, name, unit, engine))
    if not plan:
        raise ValueError(f"engine {engine!r}: the INT8 units {list(units)} quantize no Linear weight")
    return plan


def _not_int8(engine: str) -> ValueError:
    return ValueError(
        f"engine {engine!r} serves an INC INT8 artifact (qala.tune's OUTPUT_DIR/model), not an fp32 model "
        "(no quantized units)"
    )


def plan_digest(model: nn.Module, plan: Mapping[str, WeightQuant]) -> str:
    """SHA-256 of everything the QDQ graph takes from INC (with the writer's format): its cache key, beside the
    folder's key (the exported weights and configs, qala.quantize.onnx.artifact_dir)."""
    digest = hashlib.sha256(QDQ_FORMAT.encode())
    digest.update(json.dumps(sorted(quantized_units(model))).encode())
    for key in sorted(plan):
        entry = plan[key]
        digest.update(json.dumps([key, entry.unit, dict(entry.layout), asdict(entry.activation)]).encode())
        for tensor in (entry.int8, entry.scale, entry.zero_point):
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_model(model: nn.Module, plan: Mapping[str, WeightQuant]) -> LengthAdaptiveForQuestionAnswering:
    """The fp32 model whose ONNX export gets the Q/DQ nodes: every quantized weight is its dequantized int8 value
    (so that the QDQ quantizer gives back INC's int8 values exactly and the mapping finds it), and int8 embedding
    or weight-only tables (qweight, scale per row) are dequantized as their modules do before an fp32 op."""
    state = fp32_state_dict(model)
    for key in [k for k in state if k.endswith(".qweight")]:
        prefix = key.removesuffix(".qweight")
        qweight, scale = state.pop(key), state.pop(f"{prefix}.scale")
        state[f"{prefix}.weight"] = qweight.to(torch.float32) * scale[:, None]
    for key, entry in plan.items():
        state[key] = entry.dequantized()
    fp32 = LengthAdaptiveForQuestionAnswering.from_config(model.config, model.qala_config)
    fp32.load_state_dict(state)
    return fp32.eval()


def match_weights(graph: Any, plan: Mapping[str, WeightQuant]) -> dict[str, list[Any]]:
    """Weight key -> the ONNX MatMul nodes that multiply by it (see the module doc); ValueError if one has none."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    by_content: dict[tuple, list[str]] = {}
    for init in graph.initializer:
        if len(init.dims) == 2 and init.data_type == 1:  # 2-D float: a candidate Linear weight (transposed)
            value = numpy_helper.to_array(init)
            by_content.setdefault((value.shape, hashlib.sha256(value.tobytes()).digest()), []).append(init.name)
    matmuls: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            matmuls.setdefault(node.input[1], []).append(node)
    found: dict[str, list[Any]] = {}
    for key, entry in plan.items():
        weight_t = np.ascontiguousarray(entry.dequantized().numpy().T)
        names = by_content.get((weight_t.shape, hashlib.sha256(weight_t.tobytes()).digest()), [])
        nodes = [n for name in names for n in matmuls.get(name, [])]
        if not nodes:
            raise ValueError(
                f"INC QDQ export: no ONNX MatMul multiplies by {key} (unit {entry.unit}); the exporter no longer "
                "writes a Linear as MatMul with its transposed weight?"
            )
        found[key] = nodes
    return found


def _weights_read_directly(graph: Any) -> None:
    """MatMuls that read an initializer through Identity nodes read it directly: torch's exporter writes a Linear
    called twice (the span head, in the adaptive graph of a span-selection model) as Identity(initializer), and
    the QDQ quantizer quantizes only initializers as weights."""
    initializers = {i.name for i in graph.initializer}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    for node in graph.node:
        if node.op_type == "MatMul":
            name = node.input[1]
            while name in identity and name not in initializers:
                name = identity[name]
            if name in initializers:
                node.input[1] = name


def _unique_node_names(graph: Any) -> None:
    """nodes_to_quantize selects nodes by name: give every node a distinct one (the exporter's usually are)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__qala{i}"
        seen.add(node.name)


def _overrides(graph: Any, plan: Mapping[str, WeightQuant], nodes: Mapping[str, list[Any]]) -> tuple[dict, dict]:
    """TensorQuantOverrides (INC's exact scales and zero points) and tensors_range (the ranges they represent)."""
    from onnxruntime.quantization import QuantType

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    overrides: dict[str, list[dict[str, Any]]] = {}
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, entry in plan.items():
        act = entry.activation
        for node in nodes[key]:
            tensor = node.input[0]
            given = {"scale": np.array(act.scale, np.float32), "zero_point": np.array(act.zero_point, act.dtype)}
            given["quant_type"] = types[act.dtype]
            if tensor in overrides and overrides[tensor] != [given]:
                raise ValueError(f"INC QDQ export: tensor {tensor} is quantized with two different scales")
            overrides[tensor] = [given]
            lo, hi = ((q - act.zero_point) * np.float32(act.scale) for q in (act.quant_min, act.quant_max))
            ranges[tensor] = (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32))
            scales, zero_points = entry.scale.reshape(-1).tolist(), entry.zero_point.reshape(-1).tolist()
            weight_type = types[entry.layout["dtype"]]
            if entry.layout["scheme"] == "per_channel":
                # The ONNX initializer is the transposed weight [in, out]: torch's output-channel axis 0 is axis 1.
                channels = [
                    {"axis": 1, "scale": np.float32(s), "zero_point": int(z), "quant_type": weight_type}
                    for s, z in zip(scales, zero_points, strict=True)
                ]
            else:
                channels = [{"scale": np.float32(scales[0]), "zero_point": int(zero_points[0])}]
                channels[0]["quant_type"] = weight_type
            overrides[node.input[1]] = channels
    return overrides, ranges


def _fp32_consumers_back(model: Any, targets: set[str]) -> int:
    """Give every consumer of a quantized activation other than the quantized MatMuls its fp32 input back.

    QDQQuantizer's DedicatedQDQPair gives each quantized consumer its own Q/DQ pair only where a tensor has
    several; a tensor with one quantized consumer is replaced by its DequantizeLinear output for ALL consumers,
    so the residual Add after the intermediate Linear would read quantized values where INC's graph reads fp32.
    Returns how many inputs were given back."""
    graph = model.graph
    quantized_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    source = {
        n.output[0]: quantized_from[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized_from
    }
    count = 0
    for node in graph.node:
        if node.name in targets or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
                count += 1
    return count


def _clip_reduced_ranges(model: Any, plan: Mapping[str, WeightQuant], nodes: Mapping[str, list[Any]]) -> int:
    """A Clip before each QuantizeLinear of an activation INC quantized to a narrower range than its type (see the
    module doc); returns how many tensors got one."""
    from onnx import helper, numpy_helper

    reduced = {n.input[0]: e.activation for k, e in plan.items() if e.activation.reduced for n in nodes[k]}
    graph = model.graph
    for tensor, act in reduced.items():
        lo, hi = ((q - act.zero_point) * np.float32(act.scale) for q in (act.quant_min, act.quant_max))
        low, high, clipped = (f"{tensor}_qala_clip_{part}" for part in ("min", "max", "out"))
        graph.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), low)])
        graph.initializer.extend([numpy_helper.from_array(np.array(hi, np.float32), high)])
        for node in graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
                node.input[0] = clipped
        graph.node.append(helper.make_node("Clip", [tensor, low, high], [clipped], name=f"{tensor}_qala_clip"))
    return len(reduced)


def write_qdq(fp32_path: str | Path, out_path: str | Path, plan: Mapping[str, WeightQuant], digest: str) -> dict:
    """INC's configuration (`plan`) as Q/DQ nodes in the fp32 ONNX graph at `fp32_path` (exported from
    `export_model`), written atomically to `out_path`; returns what was quantized (counts)."""
    require_onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    # The quantizer reads each activation's type from value_info.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32_path)))
    _unique_node_names(model.graph)
    _weights_read_directly(model.graph)
    nodes = match_weights(model.graph, plan)
    overrides, ranges = _overrides(model.graph, plan, nodes)
    quantizer = QDQQuantizer(
        model,
        any(e.layout["scheme"] == "per_channel" for e in plan.values()),  # per_channel
        False,  # reduce_range: INC's ranges are given as they are
        QuantType.QInt8,
        QuantType.QUInt8,
        TensorsData(CalibrationMethod.MinMax, ranges),
        sorted({n.name for found in nodes.values() for n in found}),  # nodes_to_quantize
        [],  # nodes_to_exclude
        ["MatMul"],
        {
            "TensorQuantOverrides": overrides,
            "DedicatedQDQPair": True,
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
        },
    )
    quantized = ONNXModel(quantizer.quantize_model())
    given_back = _fp32_consumers_back(quantized.model, set(quantizer.nodes_to_quantize))
    clipped = _clip_reduced_ranges(quantized.model, plan, nodes)
    quantized.remove_unused_constant()
    quantized.topological_sort()
    onnx.helper.set_model_props(quantized.model, {"qala_inc_qdq": digest, "qala_qdq_format": QDQ_FORMAT})
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    onnx.save(quantized.model, str(tmp))
    os.replace(tmp, out_path)
    facts = {"quantized_matmuls": sum(map(len, nodes.values())), "weights": len(plan), "clipped_activations": clipped}
    facts["fp32_inputs_given_back"] = given_back
    logger.info("INC QDQ export: wrote %s (%s)", out_path, facts)
    return facts


# --------------------------------------------------------------------------- the engines


def qdq_file(engine: Any, fp32: Path, graph: str) -> Path:
    """The QDQ graph of the fp32 export `fp32` (in the engine's content-keyed folder), written once: its name
    carries the digest of INC's parameters, the folder's the exported weights', so a changed artifact (weights,
    scales, observers, units) never meets an old file, nor a changed export (the fp32 file's name, graph_file)."""
    path = fp32.with_name(f"{fp32.name.removesuffix('.onnx')}.inc-{engine.digest[:16]}.onnx")
    if not path.is_file():
        engine.facts[f"{graph}_qdq"] = write_qdq(fp32, path, engine.plan, engine.digest)
    return path


@functools.cache
def code_version() -> str:
    """SHA-256 of the writer's format, CODE_SOURCES and CODE_LIBRARIES' versions (qala.utils.code_digest)."""
    return hashlib.sha256(f"{QDQ_FORMAT}\0{code_digest(CODE_SOURCES, CODE_LIBRARIES)}".encode()).hexdigest()


class QdqCache:
    """root/inc-<key>/: the QDQ graphs of one INT8 artifact directory, `<graph>.onnx`, and index.json.

    The key hashes the directory's content (qala.utils.content_hash: every model file, names and bytes) with
    code_version, so a changed artifact or a new qala / library gets another folder. index.json records the key
    (a folder whose index names another is not trusted), the engine's facts and each graph's SHA-256: a graph is
    served only if its file still has it, else built again (a truncated or edited file, or an index lost)."""

    def __init__(self, root: str | Path, artifact: str | Path) -> None:
        self.key = hashlib.sha256(f"{content_hash(artifact)}\0{code_version()}".encode()).hexdigest()
        self.folder = Path(root) / f"inc-{self.key[:16]}"
        self.index = self._read()
        self._checked: dict[str, Path | None] = {}  # each file hashed once: at load, not per call

    def _read(self) -> dict[str, Any]:
        file = self.folder / CACHE_INDEX
        if not file.is_file():
            return {}
        try:
            index = json.loads(file.read_text())
            if not isinstance(index, dict) or index.get("key") != self.key or not isinstance(index.get("graphs"), dict):
                raise ValueError("not an index of this key")
            int(index["num_layers"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("INC QDQ cache %s unreadable (%s): its graphs are built again", file, e)
            return {}
        return index

    def path(self, graph: str) -> Path:
        return self.folder / f"{graph}.onnx"

    def graph(self, graph: str) -> Path | None:
        """The cached file of `graph`, if the index lists it and the file still has the SHA-256 it recorded."""
        if graph not in self._checked:
            entry, path = self.index.get("graphs", {}).get(graph), self.path(graph)
            if not isinstance(entry, dict):
                self._checked[graph] = None
            elif not path.is_file() or sha256_file(path) != entry.get("sha256"):
                logger.warning("INC QDQ cache: %s is missing or not the file its index recorded: built again", path)
                self._checked[graph] = None
            else:
                self._checked[graph] = path
        return self._checked[graph]

    def record(self, graph: str, facts: Mapping[str, Any]) -> None:
        """Add the graph just written to path(graph) to the index (with `facts`: num_layers, max_seq_length, ...)."""
        digest = sha256_file(self.path(graph))
        index = self._read() or {"format": QDQ_FORMAT, "key": self.key, "graphs": {}}  # keep others' entries
        index.update(facts)
        index["graphs"][graph] = {"sha256": digest}
        atomic_write_json(self.folder / CACHE_INDEX, index)
        self.index = index
        self._checked[graph] = self.path(graph)


def cached_qdq(engine: Any, graph: str, fp32: Callable[[], Path], needs: Sequence[str] = ()) -> Path:
    """The QDQ graph `graph` of an engine served from an INT8 artifact directory (IncQdqEngine, IncOpenVinoEngine):
    engine.cache's file if the cache holds it and its index records the facts named in `needs`, else written
    there once: the artifact loaded (PT2E replayed) if the engine has not yet (engine._prepare sets its model,
    plan and digest), its fp32 graph exported (`fp32()`), INC's Q/DQ nodes written, and the graph recorded with
    what an engine built from the cache takes from the index (num_layers, max_seq_length, inc_units)."""
    cache = engine.cache
    cached = cache.graph(graph)
    if cached is not None and all(isinstance(cache.index.get(name), int) for name in needs):
        return cached
    if engine.model is None:
        logger.info("INC QDQ cache %s has no %s graph: loading the artifact to build it", cache.folder, graph)
        engine._prepare(load_model(engine.artifact))
    path = cache.path(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine.facts[f"{graph}_qdq"] = write_qdq(fp32(), path, engine.plan, engine.digest)
    units = sorted({e.unit for e in engine.plan.values()})
    facts = {"num_layers": engine.model.num_layers, "max_seq_length": engine.model.qala_config.max_seq_length}
    cache.record(graph, {**facts, "inc_units": units})
    return path


class IncQdqEngine(OnnxEngine):
    """INC's INT8 artifact on ONNX Runtime (`onnxruntime-inc`), called like the model.

    OnnxEngine's graphs, unfused (ORT's transformer optimizer packs Q, K and V into one Attention weight, which
    then no longer is INC's; ORT's own session optimizations still fuse SkipLayerNorm and BiasGelu): full length
    the plain graph, a keep configuration the adaptive graph (one per count of leading full layers), each with
    INC's Q/DQ nodes.

    `model`: an INT8 model in memory, its QDQ files at workdir/<hash of the exported weights>/<graph file>.inc-<hash
    of INC's parameters>.onnx, beside the other ONNX engines' files of the same weights; or an INT8 artifact
    directory, its QDQ files in QdqCache(workdir, directory), the model loaded (PT2E replayed) only to build a
    graph the cache lacks.
    """

    def __init__(
        self, model: nn.Module | str | Path, *, workdir: str | Path | None = None, threads: int | None = None
    ) -> None:
        require_onnxruntime()
        # OnnxEngine's state, set here rather than by OnnxEngine.__init__, which needs the model's weights.
        self.name, self.int8, self.fused, self.threads = ENGINE, False, False, threads
        self.facts: dict[str, Any] = {"quantization": INC_QDQ_METHOD}
        self._sessions: dict[str, Any] = {}
        self._root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qala-onnx-"))
        self.model: Any = None
        self.cache: QdqCache | None = None
        start = time.perf_counter()
        if isinstance(model, nn.Module):
            self._prepare(model)
        else:
            self.artifact = Path(model)
            if model_kind(self.artifact) != "int8":
                raise _not_int8(ENGINE)
            self.cache = QdqCache(self._root, self.artifact)
            if self.cache.graph("plain") is None:
                self._prepare(load_model(self.artifact))
            else:
                self.num_layers = int(self.cache.index["num_layers"])
                self.facts["inc_units"] = list(self.cache.index.get("inc_units", []))
                self.keep_margins = artifact_configs(self.artifact).qala_config.keep_margins
        self.session("plain")
        self.build_seconds = time.perf_counter() - start

    def _prepare(self, model: nn.Module) -> None:
        """What building a graph takes from the INT8 model: INC's plan and the fp32 model to export."""
        self.plan = qdq_plan(model, ENGINE)  # refuses an fp32 or dynamic model before anything is exported
        self.digest = plan_digest(model, self.plan)
        self.model = export_model(model, self.plan)
        self.num_layers = self.model.num_layers
        self.keep_margins = self.model.qala_config.keep_margins
        self.folder = artifact_dir(self._root, self.model)
        self.facts["inc_units"] = sorted({e.unit for e in self.plan.values()})

    def _file(self, graph: str) -> Path:
        if self.cache is None:
            return qdq_file(self, super()._file(graph), graph)  # OnnxEngine's fp32 export, then INC's Q/DQ
        return cached_qdq(self, graph, functools.partial(super()._file, graph))


class IncOpenVinoEngine(OpenVinoEngine):
    """INC's INT8 artifact on OpenVINO (`openvino-inc`): the same QDQ ONNX plain graph, which OpenVINO runs with
    INT8 kernels (FullyConnected u8), static length buckets as `openvino`. Full length only: INT8 keep
    configurations need OpenVINO's attention pin and fp32 agreement check (`openvino-int8`), not done here; keep
    margins are refused as by `openvino`.

    `model`: an INT8 model in memory, its files at workdir/<hash of the exported weights>/ as OpenVinoEngine's; or
    an INT8 artifact directory, its plain graph in QdqCache(workdir, directory) (the one `onnxruntime-inc` serves)
    and OpenVINO's compiled blobs in its folder's openvino/, the model loaded (PT2E replayed) only if the cache
    lacks that graph: built from the cache, the engine never holds the model (`model` is None).
    """

    def __init__(self, model: nn.Module | str | Path, **options: Any) -> None:
        self.model: Any = None
        self.cache: QdqCache | None = None
        if isinstance(model, nn.Module):
            self._prepare(model)  # refuses an fp32 or dynamic model before anything is exported
            super().__init__(self.model, int8=False, **options)
            self.facts["inc_units"] = sorted({e.unit for e in self.plan.values()})
        else:
            self._from_cache(Path(model), **options)
        self.name = OV_ENGINE
        self.int8 = True  # an INT8 graph: compiled blobs keep their repacked weights (compile_model's weightless)
        self.facts["quantization"] = INC_QDQ_METHOD

    def _prepare(self, model: nn.Module) -> None:
        """What building the graph takes from the INT8 model: INC's plan and the fp32 model to export."""
        self.plan = qdq_plan(model, OV_ENGINE)
        self.digest = plan_digest(model, self.plan)
        self.model = export_model(model, self.plan)

    def _from_cache(
        self,
        artifact: Path,
        *,
        workdir: str | Path | None = None,
        max_seq_length: int | None = None,
        buckets: Sequence[int] | None = None,
        batch_sizes: Sequence[int] = BATCH_SIZES,
        threads: int | None = None,
        precision: str = "f32",
        calibration: Any = None,
        calibration_key: Any = None,
    ) -> None:
        """OpenVinoEngine's state for an artifact directory, set here rather than by OpenVinoEngine.__init__, which
        needs the model (its num_layers, max_seq_length, and the hash of its weights naming its folder): taken from
        the cache's index instead, the folder inside the cache's."""
        if model_kind(artifact) != "int8":
            raise _not_int8(OV_ENGINE)
        require_openvino()
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.artifact, self.precision, self.threads = artifact, precision, threads
        self._root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qala-openvino-"))
        self.cache = QdqCache(self._root, artifact)
        self.facts: dict[str, Any] = {}
        # An index written before max_seq_length was recorded: that graph is built again (once), which records it.
        cached_qdq(self, "plain", self._fp32_plain, needs=("max_seq_length",))
        index = self.cache.index
        self.num_layers = int(index["num_layers"])
        self.keep_margins = artifact_configs(artifact).qala_config.keep_margins
        self.max_seq_length = int(max_seq_length or index["max_seq_length"])
        self.buckets = tuple(sorted(int(b) for b in buckets)) if buckets else default_buckets(self.max_seq_length)
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self._calibration, self.calibration_key = calibration, calibration_key  # unused: the scales are INC's
        # Compiled blobs (ov_cache) keyed by the artifact's content, as its QDQ graphs.
        self.folder = self.cache.folder / "openvino"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._bases: dict[Key, Any] = {}
        self._compiled: dict[tuple[Key, int, int], Any] = {}
        self._local = threading.local()
        self.compile_seconds: dict[str, float] = {}
        self.facts.update(buckets=list(self.buckets), batch_sizes=list(self.batch_sizes))
        self.facts.update(inference_precision=precision, inc_units=list(index.get("inc_units", [])))

    def key(self, keep_ratios: Sequence[float] | torch.Tensor | None, length_config: Sequence[int] | None) -> Key:
        key = super().key(keep_ratios, length_config)
        if key is not None:
            raise ValueError(
                f"engine {OV_ENGINE!r} runs full length only, not keep configuration "
                f"[{', '.join(f'{v:g}' for v in key[1])}]; use 'onnxruntime-inc'"
            )
        return key

    def default_configs(self) -> list[Sequence[float] | None]:
        """Full length only (not also the model's own keep ratios, which this engine refuses)."""
        return [None]

    def base(self, key: Key) -> Any:
        if key not in self._bases:  # key is None: key() refuses every other
            if self.cache is None:
                plain = qdq_file(self, self._fp32_plain(), "plain")
            else:
                plain = cached_qdq(self, "plain", self._fp32_plain, needs=("max_seq_length",))
            self._bases[key] = read_model(plain)
        return self._bases[key]

    def _fp32_plain(self) -> Path:
        """OpenVinoEngine's fp32 plain export, in the exported weights' folder (the engine's own, or, built from an
        artifact directory, the one onnxruntime-inc exports to)."""
        folder = self.folder if self.cache is None else artifact_dir(self._root, self.model)
        fp32 = folder / "plain.onnx"  # OpenVinoEngine's name for the fp32 plain export
        if not fp32.is_file():
            export_onnx(self.model, fp32, graph="plain")
        return fp32
