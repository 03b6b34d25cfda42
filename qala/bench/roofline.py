"""This CPU's GEMM peak, fp32 and INT8, as the best of the engines the benchmark itself uses.

A single engine is not the machine's limit: on AMD CPUs torch's fp32 GEMM (MKL) ran well below ONNX
Runtime's, so rows timed through ONNX Runtime showed 187% "of peak". The peak of a dtype is therefore
the fastest of every engine measured for it, and each engine's own figure is kept beside it:

fp32  torch.mm; ONNX Runtime MatMul (a one-node graph with a constant weight)
int8  a Linear quantized as qala.quantize does (torchao X86InductorQuantizer, PT2E) and compiled by
      Inductor with freezing into oneDNN qlinear; ONNX Runtime's dynamic INT8 MatMul (quantize_dynamic
      of the fp32 graph: DynamicQuantizeLinear + MatMulInteger, as the ONNX Runtime rows run)
Both INT8 paths include quantizing the activations, as the models do. torch._int_mm (s8s8->s32, no
quantization) is recorded too, and used only when no INT8 engine ran.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qala.utils import time_calls

ORT_INT8 = "(DynamicQuantizeLinear + MatMulInteger), includes activation quantization"


def _gmacs(fn: Callable[[], Any], macs: int, repeats: int) -> float:
    """GMAC/s of `fn` from the median of `repeats` timed calls after one warm-up call (qala's one timer)."""
    seconds = time_calls(fn, warmup=1, repeats=repeats, min_repeats=repeats)
    return round(macs / statistics.median(seconds) / 1e9, 2)


def _onnx_matmul(size: int, folder: Path, int8: bool) -> tuple[Callable[[], Any], str]:
    """(call, method) of a session running X[size, size] @ W[size, size], W a constant; INT8 through
    quantize_dynamic (DynamicQuantizeLinear + MatMulInteger, as the ONNX Runtime rows run)."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from qala.quantize.onnx import OPSET, ort_session, quantize_onnx

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), name="W")
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size]) for name in "XY")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "gemm", [x], [y], initializer=[weight])
    path = folder / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    if int8:
        quantize_onnx(path, folder / "matmul.int8.onnx")
        path = folder / "matmul.int8.onnx"
    session = ort_session(path, torch.get_num_threads())
    feed = {"X": rng.standard_normal((size, size), dtype=np.float32)}
    method = "quantize_dynamic of the MatMul " + ORT_INT8 if int8 else "MatMul fp32, constant weight"
    return lambda: session.run(None, feed), f"ONNX Runtime {method}"


def _pt2e_qlinear(size: int) -> tuple[Callable[[], Any], str]:
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from qala.quantize.units import resolve_reduce_range

    reduce_range = resolve_reduce_range(None)
    linear = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)).eval()
    x = torch.randn(size, size)
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    prepared = prepare_pt2e(torch.export.export(linear, (x,)).module(), xiq.X86InductorQuantizer().set_global(config))
    prepared(x)
    compiled = torch.compile(convert_pt2e(prepared))

    def call() -> Any:
        # Freezing is scoped to the call, as CompiledQA does (compilation happens inside the first call).
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(x)

    method = (
        f"Linear({size},{size}) via torchao X86InductorQuantizer (reduce_range={reduce_range}) + "
        "torch.compile freezing (oneDNN qlinear, includes activation quantize/dequantize)"
    )
    return call, method


def gemm_peak(threads: int | None, size: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """fp32 and INT8 GEMM throughput of this CPU: the best engine per dtype, and every engine's figure."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    qa, qb = (torch.randint(-128, 127, (size, size), dtype=torch.int8) for _ in range(2))
    # (name, dtype, build(folder) -> (call, method)): an engine that cannot run here is recorded with its error.
    candidates: list[tuple[str, str, Callable[[Path], tuple[Callable[[], Any], str]]]] = [
        ("torch.mm", "fp32", lambda _: (lambda: torch.mm(a, b), "torch.mm fp32")),
        ("onnxruntime.MatMul", "fp32", lambda f: _onnx_matmul(size, f, False)),
        ("pt2e.qlinear", "int8", lambda _: _pt2e_qlinear(size)),
        ("onnxruntime.MatMulInteger", "int8", lambda f: _onnx_matmul(size, f, True)),
        ("torch._int_mm", "int8_raw", lambda _: (lambda: torch._int_mm(qa, qb), "torch._int_mm s8s8->s32")),
    ]
    engines: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype, build in candidates:
            try:
                fn, method = build(Path(folder))
                engines[name] = {"dtype": dtype, "gmacs_per_s": _gmacs(fn, size**3, repeats), "method": method}
            except Exception as e:  # noqa: BLE001 - an engine that cannot run here is recorded, not fatal
                engines[name] = {"dtype": dtype, "error": f"{type(e).__name__}: {e}"[:300]}
    result: dict[str, Any] = {"size": size, "threads": torch.get_num_threads(), "repeats": repeats, "engines": engines}
    for dtype in ("fp32", "int8"):
        ran = {n: e for n, e in engines.items() if e["dtype"] == dtype and "gmacs_per_s" in e}
        if not ran and dtype == "int8" and "gmacs_per_s" in engines["torch._int_mm"]:
            ran = {"torch._int_mm": engines["torch._int_mm"]}  # no quantizing engine ran: raw int8 GEMM
        if ran:
            best = max(ran, key=lambda n: ran[n]["gmacs_per_s"])
            result[f"{dtype}_gmacs_per_s"] = ran[best]["gmacs_per_s"]
            result[f"{dtype}_method"] = f"best of {sorted(ran)}: {best} ({ran[best]['method']})"
    return result
