"""The one seam that loads any qala model directory: fp32 or INT8, eager or compiled.

Every stage that reads a model (evaluate, tune, search, answer, bench) calls `load_model`; nothing
else decides whether a directory is an INT8 artifact. It lives in qala.quantize because that is the
lowest step that knows both formats: an fp32 directory is LengthAdaptiveForQuestionAnswering's
save_pretrained output (or any BERT/RoBERTa QA checkpoint), an INT8 one is recognised by the
quantization.json that `save_quantized` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize.artifact import (
    INT8_WEIGHTS_NAME,
    OBSERVERS_NAME,
    QUANTIZATION_NAME,
    ArtifactError,
    load_quantized,
)
from qala.quantize.compile import CompiledQA
from qala.utils import resolve_model_path

Kind = Literal["fp32", "int8"]


def model_kind(path: str | Path) -> Kind:
    """"int8" for an artifact written by save_quantized, "fp32" for any other directory.

    A directory holding INT8 artifact files but no quantization.json is neither: ArtifactError naming
    the missing file, rather than a silent attempt to read it as an fp32 model.
    """
    directory = Path(resolve_model_path(str(path)))
    if (directory / QUANTIZATION_NAME).is_file():
        return "int8"
    leftovers = [name for name in (INT8_WEIGHTS_NAME, OBSERVERS_NAME) if (directory / name).is_file()]
    if leftovers:
        raise ArtifactError(
            f"{directory / QUANTIZATION_NAME}: missing, but {leftovers[0]} is there: an incomplete INT8 artifact "
            "(quantize again with qala.tune, or restore the file)"
        )
    return "fp32"


def load_model(
    path: str | Path, *, compiled: bool = False, expect: Kind | None = None
) -> LengthAdaptiveForQuestionAnswering | CompiledQA:
    """The model stored in `path`, in eval mode; with `compiled`, wrapped in CompiledQA (the served path).

    `expect` refuses the other kind with a message that says what the directory is. An INT8
    artifact's model.safetensors must never be read as an fp32 model (it may hold only int8 data),
    which is why the kind is decided here and only here. CompiledQA keeps the eager model as `.model`.
    """
    local = Path(resolve_model_path(str(path)))
    looks_local = local.exists() or str(path).startswith((".", "/", "~")) or len(Path(str(path)).parts) > 2
    if looks_local and not local.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    kind = model_kind(local) if local.is_dir() else "fp32"
    if expect is not None and kind != expect:
        hint = (
            "point it at qala.tune's OUTPUT_DIR/model for INT8"
            if expect == "int8"
            else "it is an INT8 artifact; use the INT8 backend or an fp32 model directory"
        )
        raise FileNotFoundError(f"{path} is an {kind} model directory, expected {expect}: {hint}")
    if kind == "int8":
        model = load_quantized(local)
    else:
        model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(local) if local.is_dir() else str(path))
    model.eval()
    return CompiledQA(model) if compiled else model
