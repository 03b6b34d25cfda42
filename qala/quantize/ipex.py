"""Optional backend: static INT8 with Intel Extension for PyTorch (IPEX), one TorchScript graph per served shape.

IPEX is retired (its last release is 2.8) and each IPEX release runs only with its own torch minor
version: it needs torch 2.8.x + intel-extension-for-pytorch 2.8.x, in an environment of its own
(qala's main environment pins torch 2.13). Versions are checked from package metadata before
importing IPEX, because a mismatched IPEX aborts the process on import. Nothing here is imported by
`import qala` or `import qala.quantize`.

IPEX quantizes eagerly (observers per op) and then needs a traced graph; tracing bakes in the Python
token selection, so each length configuration gets its own calibrated, converted model, and each
(length_config, batch, seq) its own frozen trace, built on first use and cached.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from qala.quantize.units import model_inputs

logger = logging.getLogger(__name__)

IPEX_DIST = "intel-extension-for-pytorch"
REQUIRED_MINOR = "2.8"
INSTALL_HINT = (
    "the IPEX backend needs torch 2.8.x and intel-extension-for-pytorch 2.8.x (IPEX is retired; 2.8 is its last "
    "release and runs only with torch 2.8), in a separate environment, e.g.: python -m venv .venv-ipex && "
    ".venv-ipex/bin/pip install 'torch==2.8.*' 'intel-extension-for-pytorch==2.8.*' -e . "
    "(with --no-deps for qala if pip refuses its torch pin); or use qala's default PT2E backend (quantize_)"
)


class IpexUnavailableError(RuntimeError):
    """IPEX is missing or does not match the installed torch."""


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def ipex_status() -> tuple[str | None, str]:
    """(installed IPEX version or None, torch version), read without importing IPEX."""
    try:
        ipex_version = importlib.metadata.version(IPEX_DIST)
    except importlib.metadata.PackageNotFoundError:
        ipex_version = None
    return ipex_version, torch.__version__


def import_ipex() -> Any:
    """The `intel_extension_for_pytorch` module, or IpexUnavailableError saying which versions are needed."""
    ipex_version, torch_version = ipex_status()
    found = f"found torch {torch_version} and {IPEX_DIST} {ipex_version or '(not installed)'}"
    if ipex_version is None or _minor(ipex_version) != _minor(torch_version) or _minor(torch_version) != REQUIRED_MINOR:
        raise IpexUnavailableError(f"{found}; {INSTALL_HINT}")
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as e:  # an IPEX build error surfaces as anything from ImportError to OSError
        raise IpexUnavailableError(f"{found}, but importing it failed ({e!r}); {INSTALL_HINT}") from e
    return ipex


class _FixedLengthQA(nn.Module):
    """The model at one length configuration, with tensor-only inputs and outputs (what tracing needs)."""

    def __init__(self, model: nn.Module, length_config: Sequence[int] | None) -> None:
        super().__init__()
        self.model = model
        self.length_config = None if length_config is None else [int(n) for n in length_config]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, attention_mask, token_type_ids, length_config=self.length_config)
        return out.start_logits, out.end_logits


class IpexStaticQA:
    """IPEX static INT8 of a length-adaptive model; call like CompiledQA: `qa(**inputs, length_config=...)`.

    `calibration` is kept (as a list) because every new length configuration is calibrated on it.
    Outputs are transformers' QuestionAnsweringModelOutput, as from the model itself.
    """

    def __init__(self, model: nn.Module, calibration: Iterable[Mapping[str, Any]]) -> None:
        self.ipex = import_ipex()
        self.model = model.eval()
        self.calibration = [model_inputs(batch)[0] for batch in calibration]
        if not self.calibration:
            raise ValueError("calibration yielded no batch; IPEX static quantization needs at least one")
        self._converted: dict[tuple[int, ...] | None, nn.Module] = {}
        self._traced: dict[tuple, torch.jit.ScriptModule] = {}

    @staticmethod
    def _args(inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        types = inputs.get("token_type_ids", torch.zeros_like(ids))
        return ids, mask, types

    @torch.no_grad()
    def _convert(self, lengths: tuple[int, ...] | None) -> nn.Module:
        from intel_extension_for_pytorch.quantization import convert, prepare

        fixed = _FixedLengthQA(copy.deepcopy(self.model), lengths).eval()
        example = self._args(self.calibration[0])
        prepared = prepare(fixed, self.ipex.quantization.default_static_qconfig_mapping, example_inputs=example)
        for batch in self.calibration:
            prepared(*self._args(batch))
        logger.info("IPEX: calibrated length config %s on %d batches", lengths, len(self.calibration))
        return convert(prepared)

    @torch.no_grad()
    def __call__(self, length_config: Sequence[int] | None = None, **inputs: torch.Tensor) -> Any:
        lengths = length_config if length_config is not None else self.model.qala_config.length_config
        lengths = None if lengths is None else tuple(int(n) for n in lengths)
        args = self._args(inputs)
        key = (lengths, *args[0].shape)
        if key not in self._traced:
            if lengths not in self._converted:
                self._converted[lengths] = self._convert(lengths)
            traced = torch.jit.trace(self._converted[lengths], args, check_trace=False)
            self._traced[key] = torch.jit.freeze(traced)
            # TorchScript's profiling executor optimises on the first runs; warm it before serving.
            for _ in range(2):
                self._traced[key](*args)
        start_logits, end_logits = self._traced[key](*args)
        return QuestionAnsweringModelOutput(start_logits=start_logits, end_logits=end_logits)
