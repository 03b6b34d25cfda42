"""The units a length-adaptive model is quantized in, and the module that replaces each of them.

A length-adaptive encoder is no single static graph: which tokens survive each layer (and so every
shape after the first layer) depends on the length configuration and on the attention values. The
token selection therefore stays in Python (`qala/model.py`'s forward), and what gets exported and
quantized are the pieces between selections:

- `encoder.layer.{i}.attention`     (hidden [B, S, H], additive mask [B, 1, 1, S]) -> (output, probs)
- `encoder.layer.{i}.intermediate`  x -> h
- `encoder.layer.{i}.output`        (h, x) -> y
- `qa_outputs`                      hidden -> logits

Each is exported with dynamic batch and sequence dimensions, so one quantized unit serves every
length configuration, batch size and sequence length, and is swapped into the model in place of the
original module (as torchao's `quantize_` swaps weights): the model's forward is unchanged.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

APPROACHES = ("static", "dynamic", "qat")
# Stages of a QuantizedUnit's graph.
PREPARED, CONVERTED = "prepared", "converted"
# The tensors the model's forward takes; other keys of a batch (labels, offsets, ids) are not inputs.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# Export examples use this many rows: torch.export specialises a dimension of size 0 or 1, so the
# batch dimension of an example must be at least 2 to stay dynamic.
EXAMPLE_BATCH = 2
_LAYER_UNITS = ("attention", "intermediate", "output")
HEAD_UNIT = "qa_outputs"


class QuantizedUnit(nn.Module):
    """A unit of the model replaced by its exported PT2E graph, prepared (observers or fake-quant) or converted.

    The wrapper exists because exported graphs refuse `.train()` / `.eval()` (their dropout is baked
    into the graph), so `model.eval()` would fail on a bare GraphModule. Here, a fake-quant (QAT)
    graph follows the mode (dropout on/off, observers thawed/frozen); a converted graph is
    inference-only and ignores it. It also keeps what the artifact needs to rebuild the unit exactly: the fp32
    weights it was quantized from and its observer state at conversion, as plain attributes so that
    they do not show up in the model's state_dict.
    """

    def __init__(
        self,
        name: str,
        graph: torch.fx.GraphModule,
        *,
        approach: str,
        quant_config: dict,
        source_keys: Sequence[str],
        example_shape: Sequence[int],
        reduce_range: bool,
    ) -> None:
        super().__init__()
        if approach not in APPROACHES:
            raise ValueError(f"approach must be one of {APPROACHES}, got {approach!r}")
        self.unit_name = name
        self.approach = approach
        self.quant_config = quant_config
        self.stage = PREPARED
        self.graph_module = graph
        # Names (relative to the unit) of the original module's parameters and buffers: what is not
        # one of these in the prepared graph's state is observer / fake-quant state.
        self.source_keys = tuple(source_keys)
        # The [batch, seq] of the export examples: the reload path exports at the same shape.
        self.example_shape = tuple(int(n) for n in example_shape)
        self.reduce_range = reduce_range
        self.source_state: dict[str, torch.Tensor] = {}
        self.observer_state: dict[str, torch.Tensor] = {}
        self._graph_training = approach == "qat"  # QAT graphs are exported in train mode
        self._observer_flags: dict[str, torch.Tensor] = {}

    def forward(self, *args: torch.Tensor) -> Any:
        return self.graph_module(*args)

    def train(self, mode: bool = True) -> QuantizedUnit:
        self.training = mode
        if self.approach == "qat" and self.stage == PREPARED and mode != self._graph_training:
            _set_dropout_training(self.graph_module, mode)
            self._graph_training = mode
            self._freeze_observers(not mode)
        return self

    def _freeze_observers(self, freeze: bool) -> None:
        """Evaluation must not move the fake-quant ranges (torchao keeps observing in eval mode).

        Freezing remembers each observer's flag and thawing restores it, so observers the caller
        disabled on purpose (late in QAT) stay disabled.
        """
        for name, module in self.graph_module.named_modules():
            flag = getattr(module, "observer_enabled", None)
            if not isinstance(flag, torch.Tensor):
                continue
            if freeze:
                self._observer_flags[name] = flag.clone()
                flag.zero_()
            elif name in self._observer_flags:
                flag.copy_(self._observer_flags.pop(name))

    def snapshot(self) -> None:
        """Keep the fp32 weights and the observer state the conversion is about to consume."""
        state = self.graph_module.state_dict()
        missing = [k for k in self.source_keys if k not in state]
        if missing:
            raise RuntimeError(
                f"unit {self.unit_name}: the exported graph lost the original parameter names {missing[:5]}; "
                "the artifact could not map its weights back (torch.export changed its naming?)"
            )
        self.source_state = {k: state[k].detach().clone() for k in self.source_keys}
        self.observer_state = {k: v.detach().clone() for k, v in state.items() if k not in set(self.source_keys)}

    def set_converted(self, graph: torch.fx.GraphModule) -> None:
        self.graph_module = graph
        self.stage = CONVERTED
        self._graph_training = False

    def extra_repr(self) -> str:
        return (
            f"unit={self.unit_name!r}, approach={self.approach!r}, stage={self.stage!r}, "
            f"reduce_range={self.reduce_range}"
        )


def cpu_has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(flag, False) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    """`reduce_range`, or (None) whether this CPU needs 7-bit activations: see reduce_activation_range."""
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
        logger.info("reduce_range=%s: this CPU %s VNNI", reduce_range, "lacks" if reduce_range else "has")
    return bool(reduce_range)


def reduce_activation_range(graph: torch.fx.GraphModule) -> int:
    """Give every activation observer of a prepared graph one bit less range (uint8 0..127); return how many.

    Without VNNI, oneDNN multiplies u8 activations by s8 weights with vpmaddubsw, which adds pairs of
    products into int16 and saturates: Inductor's int8 kernels then give wrong results (seen on an AVX2
    EPYC: max error 1.08 on a Linear whose outputs reach 2.5, against 5e-7 with 7-bit activations),
    while the uncompiled q/dq graph looks fine. This is torchao's `reduce_range=True`; INC's configs
    have no such field, so the observers INC created are narrowed after its prepare. Weight observers
    (fed by a parameter) keep their full int8 range.
    """
    count = 0
    for node in graph.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr":
            continue
        observer = graph.get_submodule(str(node.target))
        observer = getattr(observer, "activation_post_process", observer)  # a fake-quantizer's observer
        if observer.quant_max - observer.quant_min > 127:  # not already reduced (shared observers)
            observer.quant_min, observer.quant_max = observer.quant_min // 2, observer.quant_max // 2
            count += 1
    return count


def _set_dropout_training(graph: torch.fx.GraphModule, mode: bool) -> None:
    """Switch the graph's dropout ops between train and eval, keeping each one's probability.

    Not torchao's move_exported_model_to_train/eval: they rewrite dropout by pattern with literals
    ignored, and a train -> eval -> train round trip comes back with p=0.5 whatever p was
    (seen with torchao 0.18), which would silently change QAT after the first evaluation.
    """
    changed = False
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.dropout.default:
            x, p, *_ = node.args
            node.args = (x, p, mode)
            changed = True
    if changed:
        graph.recompile()


def unit_names(model: nn.Module) -> list[str]:
    """Every quantizable unit of a length-adaptive model, in execution order."""
    names = [f"encoder.layer.{i}.{kind}" for i in range(model.num_layers) for kind in _LAYER_UNITS]
    return names + [HEAD_UNIT]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding unit `name` as a direct child, and the child's attribute name."""
    root = model if name == HEAD_UNIT else model.backbone
    parent, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


def get_unit(model: nn.Module, name: str) -> nn.Module:
    parent, leaf = _owner(model, name)
    return getattr(parent, leaf)


def swap_unit(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where unit `name` is; return what was there."""
    parent, leaf = _owner(model, name)
    old = getattr(parent, leaf)
    setattr(parent, leaf, module)
    return old


def state_prefix(model: nn.Module, name: str) -> str:
    """Where unit `name`'s parameters sit in the model's state_dict."""
    return f"{HEAD_UNIT}." if name == HEAD_UNIT else f"{model.base_model_prefix}.{name}."


def quantizable_units(model: nn.Module) -> dict[str, nn.Module]:
    """Unit name -> the module now in that place (a QuantizedUnit once quantized)."""
    return {name: get_unit(model, name) for name in unit_names(model)}


def select_units(model: nn.Module, fp32_units: Sequence[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """Split the units into those to quantize and those kept fp32 (fnmatch patterns on unit names).

    A pattern that matches no unit is an error: a typo would otherwise silently quantize everything.
    """
    if isinstance(fp32_units, str):
        raise TypeError(f"fp32_units must be a list of patterns, got the string {fp32_units!r}")
    units = quantizable_units(model)
    already = [name for name, module in units.items() if isinstance(module, QuantizedUnit)]
    if already:
        raise ValueError(f"the model is already quantized (units {already[:3]}...); start again from an fp32 model")
    unmatched = [p for p in fp32_units if not fnmatch.filter(units, p)]
    if unmatched:
        raise ValueError(f"fp32_units patterns {unmatched} match no unit; the units are: {list(units)}")
    keep = [name for name in units if any(fnmatch.fnmatchcase(name, p) for p in fp32_units)]
    selected = {name: module for name, module in units.items() if name not in keep}
    if not selected:
        raise ValueError(f"fp32_units {list(fp32_units)} keeps every unit in fp32: nothing to quantize")
    return selected, keep


def model_inputs(batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Sequence[int] | None]:
    """The forward's tensor inputs of a calibration batch, and its length configuration (or None)."""
    if "input_ids" not in batch:
        raise ValueError(f"a calibration batch needs 'input_ids'; got keys {sorted(batch)}")
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"calibration batch key {key!r} must be a 2-D tensor [batch, seq], got {value!r:.80}")
    return inputs, batch.get("length_config")


def synthetic_batch(shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """A batch of the given [batch, seq] shape: exporting needs shapes and dtypes only, not values."""
    batch, seq = (int(n) for n in shape)
    return {
        "input_ids": torch.zeros(batch, seq, dtype=torch.long),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
    }


@torch.no_grad()
def capture_unit_inputs(
    model: nn.Module, names: Sequence[str], batch: Mapping[str, Any]
) -> tuple[dict[str, tuple[torch.Tensor, ...]], tuple[int, int]]:
    """Each unit's positional inputs in one full-length eval forward over `batch`'s first rows.

    Returns the inputs by unit name and the [batch, seq] shape they were captured at.
    """
    inputs, _ = model_inputs(batch)
    rows, seq = inputs["input_ids"].shape
    if seq < 2:
        raise ValueError(f"the example batch has sequence length {seq}; export needs at least 2 tokens")
    # Row 0 repeated when the batch has one row: see EXAMPLE_BATCH.
    index = torch.arange(EXAMPLE_BATCH) % rows
    inputs = {k: v.index_select(0, index) for k, v in inputs.items()}

    captured: dict[str, tuple[torch.Tensor, ...]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if kwargs:
                raise RuntimeError(
                    f"unit {name} was called with keyword arguments {sorted(kwargs)}; expected positional"
                )
            captured.setdefault(name, tuple(a.detach().clone() for a in args))

        return record

    handles = [get_unit(model, name).register_forward_pre_hook(hook(name), with_kwargs=True) for name in names]
    was_training = model.training
    try:
        model.eval()  # LayerDrop would skip layers in train mode
        model(**inputs, length_config=[seq] * model.num_layers)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in names if name not in captured]
    if missing:
        raise RuntimeError(f"units {missing} were not called by the model's forward; cannot capture their inputs")
    return captured, (EXAMPLE_BATCH, seq)


def dynamic_shapes(name: str) -> tuple[dict[int, Any], ...]:
    """Batch and sequence dimensions of each positional input of unit `name`, as torch.export wants them."""
    from torch.export import Dim

    # min=1: a length configuration may keep one token ([CLS]), and a batch may hold one row.
    batch, seq = Dim("batch", min=1), Dim("seq", min=1)
    kind = name.rpartition(".")[2]
    if kind == "attention":
        return ({0: batch, 1: seq}, {0: batch, 3: seq})
    if kind == "output":
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
    return ({0: batch, 1: seq},)


def observer_keys(graph: torch.fx.GraphModule, source_keys: Sequence[str]) -> list[str]:
    """State entries of a prepared graph that belong to observers / fake-quantizers."""
    source = set(source_keys)
    return [k for k in graph.state_dict() if k not in source]


def quantized_units(model: nn.Module) -> dict[str, QuantizedUnit]:
    return {name: m for name, m in quantizable_units(model).items() if isinstance(m, QuantizedUnit)}


def graph_ops(module: nn.Module) -> set[str]:
    """The call_function targets of a unit's graph (for tests and inspection)."""
    graph = module.graph_module if isinstance(module, QuantizedUnit) else module
    if not isinstance(graph, torch.fx.GraphModule):
        return set()
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
