"""`torch.compile` over the whole length-adaptive forward, one graph per served shape.

Dynamo specialises on the Python length configuration (the top-k sizes are ints) and, with
dynamic=False, on batch and sequence length: each distinct (length_config, batch, seq) gets its own
graph, built lazily on its first call and cached. Inductor then fuses the converted units'
quantize/dequantize pairs into oneDNN int8 kernels (qlinear); that needs freezing (weights as
constants, prepacked), so the compiled model is for inference only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from qala.quantize.units import cpu_has_vnni, quantized_units

logger = logging.getLogger(__name__)

# Dynamo's default of 8 graphs per function would silently fall back to eager after the 8th served
# shape; a length-adaptive server can see hundreds (configurations x batch sizes x sequence lengths).
DEFAULT_MAX_GRAPHS = 1024

CompileKey = tuple[tuple[int, ...] | None, int, int]


@contextlib.contextmanager
def compile_settings(max_graphs: int, freezing: bool) -> Iterator[None]:
    """no_grad plus the Dynamo/Inductor settings of a compiled call (CompiledQA, the compile-dynamic engine).

    Scoped to the call (compilation happens lazily inside it) rather than set globally, so other compiled code
    in the process keeps its own settings. Freezing goes through the config, not torch.compile(options=...):
    with the option, the int8 weight-prepack pass ran on fake tensors and failed
    (UnsupportedOperatorException: onednn.qlinear_prepack, torch 2.13)."""
    with (
        torch.no_grad(),
        torch._dynamo.config.patch(recompile_limit=max_graphs, accumulated_recompile_limit=max(max_graphs, 256)),
        torch._inductor.config.patch(freezing=freezing),
    ):
        yield


class CompiledQA:
    """Call a (quantized) length-adaptive model through torch.compile, timing each new graph.

    `compile_seconds[(length_config, batch, seq)]` is the wall time of the first call with that key:
    tracing, Inductor compilation and one run. `compile=False` runs the model eagerly through the
    same interface (for comparisons). `backend` is torch.compile's (tests use "eager" to count
    graphs cheaply).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool = True,
        backend: str | Callable = "inductor",
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        if compile and backend == "inductor":
            _check_int8_kernels_are_exact(model)
        self.model = model.eval()
        self.compiled = compile
        self.max_graphs = max_graphs
        self.compile_seconds: dict[CompileKey, float] = {}
        self._freezing = compile and backend == "inductor"
        self._forward = torch.compile(model, dynamic=False, backend=backend) if compile else model

    def key(self, input_ids: torch.Tensor, length_config: Sequence[int] | None) -> CompileKey:
        lengths = length_config if length_config is not None else self.model.qala_config.length_config
        return (None if lengths is None else tuple(int(n) for n in lengths), *input_ids.shape)

    def __call__(self, length_config: Sequence[int] | None = None, **inputs: torch.Tensor) -> Any:
        if length_config is not None:
            length_config = [int(n) for n in length_config]  # plain ints: tensors or numpy ints would not guard
        if not self.compiled:
            with torch.no_grad():
                return self._forward(**inputs, length_config=length_config)
        key = self.key(inputs["input_ids"], length_config)
        first = key not in self.compile_seconds
        start = time.perf_counter()
        with compile_settings(self.max_graphs, self._freezing):
            output = self._forward(**inputs, length_config=length_config)
        if first:
            self.compile_seconds[key] = time.perf_counter() - start
            logger.info("compiled %s in %.1f s", key, self.compile_seconds[key])
        return output


def _check_int8_kernels_are_exact(model: nn.Module) -> None:
    """Refuse to compile full-range INT8 units on a CPU whose int8 kernels would saturate."""
    if cpu_has_vnni():
        return
    full_range = [name for name, unit in quantized_units(model).items() if not unit.reduce_range]
    if full_range:
        raise ValueError(
            f"units {full_range[:3]} quantize activations to the full uint8 range, and this CPU has no VNNI: "
            "Inductor's int8 kernels would saturate and return wrong logits. Quantize again with "
            "reduce_range=True (the default on such CPUs), or run the model uncompiled (compile=False)"
        )
