"""The INT8 artifact: a directory that rebuilds a quantized length-adaptive model exactly, with no pickle.

    config.json, qala_config.json   the backbone's and qala's configs (as LengthAdaptive...save_pretrained)
    model.safetensors               the fp32 weights the units were quantized from (for QAT: the trained ones)
    observers.safetensors           every observer / fake-quant buffer of every prepared unit, "<unit>:<key>"
    quantization.json               approach, config, units, example shape, served length configs,
                                    versions and the SHA-256 of both weight files
    (tokenizer files, if a tokenizer is given)

Loading replays the quantization without data: rebuild the fp32 model, export each unit, prepare it
with the recorded config, load its observer state, convert. Conversion is a pure function of the
weights and the observer state, so the reloaded model computes exactly what the saved one did.
A torch.export .pt2 archive was not used because it pickles parts of the program.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import importlib.metadata
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from qala.model import (
    QALA_CONFIG_NAME,
    WEIGHTS_NAME,
    LengthAdaptiveConfig,
    LengthAdaptiveForQuestionAnswering,
    check_length_config,
)
from qala.quantize import pt2e, qat
from qala.quantize.units import (
    APPROACHES,
    QuantizedUnit,
    capture_unit_inputs,
    get_unit,
    observer_keys,
    quantized_units,
    state_prefix,
    swap_unit,
    synthetic_batch,
    unit_names,
)
from qala.utils import atomic_directory, atomic_write_json, atomic_write_text, directory_bytes

logger = logging.getLogger(__name__)

FORMAT = "qala-int8-pt2e"
FORMAT_VERSION = 1
QUANTIZATION_NAME = "quantization.json"
OBSERVERS_NAME = "observers.safetensors"
_VERSIONED = ("torch", "torchao", "neural-compressor-pt", "transformers")


class ArtifactError(ValueError):
    """A quantized artifact that is missing, incomplete or inconsistent; the message names the file."""


def _versions() -> dict[str, str | None]:
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unit_approach(units: Mapping[str, QuantizedUnit]) -> tuple[str, dict, bool]:
    ways = {(u.approach, json.dumps(u.quant_config, sort_keys=True), u.reduce_range) for u in units.values()}
    if len(ways) != 1:
        raise ValueError(f"the model's units were quantized in different ways: {sorted(w[0] for w in ways)}")
    approach, config, reduce_range = ways.pop()
    return approach, json.loads(config), reduce_range


def save_quantized(
    model: nn.Module,
    path: str | Path,
    *,
    approach: str,
    quant_config: Mapping[str, Any] | None = None,
    fp32_units: Sequence[str] = (),
    served_length_configs: Sequence[Sequence[int]] | None = None,
    extra: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> int:
    """Write the INT8 artifact of a quantized (converted) model to `path` atomically; return its size in bytes.

    `approach` and `quant_config` (INC's `config.to_dict()`; for QAT None or `qat.QAT_CONFIG`) must be
    what the model was quantized with: they are checked against the units. `fp32_units` are the
    patterns given to quantize_/prepare_qat_, recorded with the unit names they resolved to. A
    tokenizer, if given, is written into the same directory (the directory is replaced as a whole).
    """
    units = quantized_units(model)
    if not units:
        raise ValueError("the model has no quantized units; quantize it with quantize_ or prepare_qat_/convert_qat_")
    not_converted = [name for name, u in units.items() if u.stage != "converted"]
    if not_converted:
        raise ValueError(f"units {not_converted[:3]} are not converted yet (QAT: call convert_qat_ first)")
    unit_approach, unit_config, reduce_range = _unit_approach(units)
    if approach != unit_approach:
        raise ValueError(f"approach={approach!r}, but the model was quantized with {unit_approach!r}")
    if quant_config is not None and json.loads(json.dumps(dict(quant_config))) != unit_config:
        raise ValueError(
            f"quant_config {dict(quant_config)} differs from the one the units were made with: {unit_config}"
        )
    fp32 = [name for name in unit_names(model) if name not in units]
    matched = [name for name in unit_names(model) if any(fnmatch.fnmatchcase(name, p) for p in fp32_units)]
    if fp32_units and matched != fp32:
        raise ValueError(f"fp32_units {list(fp32_units)} select {matched}, but the model's fp32 units are {fp32}")
    served = [list(map(int, c)) for c in served_length_configs] if served_length_configs is not None else None
    for lengths in served or []:
        check_length_config(lengths, num_layers=model.num_layers)

    weights = fp32_state_dict(model)
    observers = {f"{name}:{key}": t.contiguous() for name, u in units.items() for key, t in u.observer_state.items()}
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "approach": approach,
        "quant_config": unit_config,
        # Not part of INC's config, and not visible in the observer state: the reload must replay it.
        "reduce_range": reduce_range,
        "fp32_units": list(fp32_units),
        "units": {"quantized": list(units), "fp32": fp32},
        "example_shape": list(next(iter(units.values())).example_shape),
        "served_length_configs": served,
        "versions": _versions(),
        "extra": dict(extra or {}),
    }
    config = copy.deepcopy(model.config)
    config.architectures = [MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES[config.model_type]]
    with atomic_directory(path) as tmp:
        config.save_pretrained(tmp)
        atomic_write_text(tmp / QALA_CONFIG_NAME, model.qala_config.to_json())
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file(observers, str(tmp / OBSERVERS_NAME), metadata={"format": FORMAT})
        record["sha256"] = {name: _sha256(tmp / name) for name in (WEIGHTS_NAME, OBSERVERS_NAME)}
        atomic_write_json(tmp / QUANTIZATION_NAME, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    size = directory_bytes(path)
    logger.info("saved INT8 %s artifact to %s: %.1f MB", approach, path, size / 1e6)
    return size


def fp32_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in fp32-model naming (loadable by LengthAdaptiveForQuestionAnswering).

    Converted units give back the weights they were quantized from; fake-quant (QAT) units their
    current, trained weights, so this also makes a plain fp32 checkpoint in the middle of QAT.
    """
    units = quantized_units(model)
    inside = tuple(state_prefix(model, name) for name in units)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(inside)}
    for name, unit in units.items():
        if unit.stage == "converted":
            source = unit.source_state
        else:
            graph_state = unit.graph_module.state_dict()
            source = {k: graph_state[k] for k in unit.source_keys}
        state.update({state_prefix(model, name) + k: v.detach().contiguous() for k, v in source.items()})
    return state


def _read_record(path: Path) -> dict[str, Any]:
    file = path / QUANTIZATION_NAME
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; {path} is not a qala INT8 artifact (save it with save_quantized)")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: not valid JSON ({e})") from e
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{file}: format {record.get('format')!r} version {record.get('format_version')!r}; "
            f"this qala reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    missing = [
        k for k in ("approach", "quant_config", "reduce_range", "units", "example_shape", "sha256") if k not in record
    ]
    if missing:
        raise ArtifactError(f"{file}: missing keys {missing}")
    if record["approach"] not in APPROACHES:
        raise ArtifactError(f"{file}: unknown approach {record['approach']!r}; expected one of {list(APPROACHES)}")
    for name in (WEIGHTS_NAME, OBSERVERS_NAME, "config.json"):
        if not (path / name).is_file():
            raise ArtifactError(f"{path / name}: missing from the artifact")
    for name, digest in record["sha256"].items():
        if _sha256(path / name) != digest:
            raise ArtifactError(
                f"{path / name}: SHA-256 differs from {QUANTIZATION_NAME}; the file changed after saving"
            )
    saved, now = record.get("versions", {}), _versions()
    differing = {k: (saved.get(k), now[k]) for k in _VERSIONED if saved.get(k) != now[k]}
    if differing:
        logger.warning("%s: saved with different versions (saved, installed): %s; logits may differ", file, differing)
    return record


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{file}: cannot be read as safetensors ({e})") from e


def load_quantized(path: str | Path) -> LengthAdaptiveForQuestionAnswering:
    """Rebuild the quantized model saved by `save_quantized` (eval mode); no calibration data needed."""
    path = Path(path)
    record = _read_record(path)
    approach = record["approach"]

    qala_file = path / QALA_CONFIG_NAME
    qala_config = LengthAdaptiveConfig.from_json_file(qala_file) if qala_file.is_file() else LengthAdaptiveConfig()
    model = LengthAdaptiveForQuestionAnswering.from_config(AutoConfig.from_pretrained(str(path)), qala_config)
    try:
        model.load_state_dict(_with_versions(_load_tensors(path / WEIGHTS_NAME), model.state_dict()), strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path / WEIGHTS_NAME}: does not fit the model in config.json: {e}") from e
    model.eval()

    names = unit_names(model)
    quantized, fp32 = record["units"].get("quantized", []), record["units"].get("fp32", [])
    if sorted(quantized + fp32) != sorted(names):
        raise ArtifactError(f"{path / QUANTIZATION_NAME}: units {quantized + fp32} do not match the model's {names}")
    observers = _load_tensors(path / OBSERVERS_NAME)
    by_unit: dict[str, dict[str, torch.Tensor]] = {name: {} for name in quantized}
    for key, tensor in observers.items():
        name, _, sub = key.partition(":")
        if name not in by_unit:
            raise ArtifactError(f"{path / OBSERVERS_NAME}: entry {key!r} belongs to no quantized unit")
        by_unit[name][sub] = tensor

    example_args, _ = capture_unit_inputs(model, quantized, synthetic_batch(record["example_shape"]))
    if approach == "qat":
        config = None
    else:
        try:
            config = pt2e.config_from_dict(approach, record["quant_config"])
        except Exception as e:
            raise ArtifactError(
                f"{path / QUANTIZATION_NAME}: quant_config is not a valid {approach} config: {e}"
            ) from e
    for name in quantized:
        module = get_unit(model, name)
        reduce_range = bool(record["reduce_range"])
        if approach == "qat":
            unit = qat.prepare_unit(name, module, example_args[name], reduce_range)
        else:
            unit = pt2e.prepare_unit(name, module, example_args[name], approach, config, reduce_range)
        _load_observers(unit, by_unit[name], path / OBSERVERS_NAME)
        swap_unit(model, name, unit)
        (qat.convert_unit if approach == "qat" else pt2e.convert_unit)(unit)
    model.eval()
    logger.info("loaded INT8 %s artifact %s (%d units quantized, fp32: %s)", approach, path, len(quantized), fp32)
    return model


def _with_versions(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` carrying the module versions of `like` (a fresh state_dict).

    Without version metadata, load_state_dict treats observers as version 1 and overwrites their `eps`
    with the default, which changes the scales of a quantizer configured with another eps (torchao's
    X86 QAT recipe uses 2**-12); safetensors keeps no such metadata, so it comes from the fresh module.
    """
    versioned = OrderedDict(state)
    versioned._metadata = getattr(like, "_metadata", None)  # type: ignore[attr-defined]
    return versioned


def _load_observers(unit: QuantizedUnit, state: dict[str, torch.Tensor], file: Path) -> None:
    expected = set(observer_keys(unit.graph_module, unit.source_keys))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ArtifactError(
            f"{file}: observer state of unit {unit.unit_name} does not fit a {unit.approach} preparation "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}); was it saved with another approach or version?"
        )
    current = unit.graph_module.state_dict()
    for key, tensor in state.items():
        # Per-channel observers and fake-quantizers start with 0 or 1 elements and take their shape from
        # the data (their load_state_dict resizes them); fixed-size state such as histograms must match.
        if current[key].numel() > 1 and current[key].shape != tensor.shape:
            raise ArtifactError(
                f"{file}: {unit.unit_name}:{key} has shape {tuple(tensor.shape)}, expected {tuple(current[key].shape)}"
            )
    try:
        unit.graph_module.load_state_dict(_with_versions(state, current), strict=False)
    except RuntimeError as e:
        raise ArtifactError(f"{file}: cannot load the observer state of unit {unit.unit_name}: {e}") from e
