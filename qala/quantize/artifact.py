"""The INT8 artifact: a directory that rebuilds a quantized length-adaptive model exactly, with no pickle.

    config.json, qala_config.json   the backbone's and qala's configs (as LengthAdaptive...save_pretrained)
    int8_weights.safetensors        every quantized weight as int8 plus its scale and zero point
                                    ("<name>", "<name>.scale", "<name>.zero_point"); the word-embedding
                                    table int8 per row when it was quantized; everything else (biases,
                                    LayerNorms, position embeddings, fp32 units) as is. No fp32 copy of a
                                    quantized weight is stored.
    observers.safetensors           every observer / fake-quant buffer of every prepared unit, "<unit>:<key>"
                                    (activation ranges, and the weight ranges the scales came from)
    quantization.json               approach, config, units, example shape, served length configs,
                                    the layout of each int8 weight, versions
    manifest.json                   SHA-256 of every other file (configs and quantization.json included),
                                    written last
    (tokenizer files and extra text files such as recipe.yaml, if given)

Loading replays the quantization without data: rebuild the model with each quantized weight
dequantized from its int8 values (w = (q - zero_point) * scale, the very op the graph applies),
export each unit, prepare it with the recorded config, load its observer state, convert. The
observers give back the same scales, and quantizing the dequantized weight with them gives back
exactly the stored int8 values (checked at load), so the reloaded model computes exactly what the
saved one did. A torch.export .pt2 archive was not used because it pickles parts of the program.
Artifacts of format version 1 (fp32 weights + observers) still load.
"""

from __future__ import annotations

import copy
import fnmatch
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

from qala.lengths import check_length_config
from qala.model import QALA_CONFIG_NAME, WEIGHTS_NAME, LengthAdaptiveConfig, LengthAdaptiveForQuestionAnswering
from qala.quantize import pt2e, qat
from qala.quantize.embedding import Int8Embedding, has_int8_embeddings, word_embeddings, word_embeddings_key
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
from qala.quantize.weight_only import empty_weight_only_, weight_only_modules
from qala.utils import (
    MANIFEST_NAME,
    IntegrityError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_manifest,
    directory_bytes,
    write_manifest,
)
from qala.utils import sha256_file as _sha256

logger = logging.getLogger(__name__)

FORMAT = "qala-int8-pt2e"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
QUANTIZATION_NAME = "quantization.json"
OBSERVERS_NAME = "observers.safetensors"
INT8_WEIGHTS_NAME = "int8_weights.safetensors"
_VERSIONED = ("torch", "torchao", "neural-compressor-pt", "transformers")
_QDQ = torch.ops.quantized_decomposed
_PER_CHANNEL, _PER_TENSOR = "per_channel", "per_tensor"


class ArtifactError(IntegrityError):
    """A quantized artifact that is missing, incomplete or inconsistent; the message names the file."""


def _versions() -> dict[str, str | None]:
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _unit_approach(units: Mapping[str, QuantizedUnit]) -> tuple[str, dict, bool]:
    ways = {(u.approach, json.dumps(u.quant_config, sort_keys=True), u.reduce_range) for u in units.values()}
    if len(ways) != 1:
        raise ValueError(f"the model's units were quantized in different ways: {sorted(w[0] for w in ways)}")
    approach, config, reduce_range = ways.pop()
    return approach, json.loads(config), reduce_range


def _attr(graph: torch.fx.GraphModule, target: str) -> torch.Tensor:
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part)
    return value


def int8_weights(unit: QuantizedUnit) -> dict[str, dict[str, Any]]:
    """Each weight a converted unit quantizes: {source key: int8 values, scale, zero point and layout}.

    Read from the graph's own quantize op on the weight (per channel or per tensor), applied to the
    weight: these are the int8 values Inductor folds into its kernels.
    """
    if unit.stage != "converted":
        raise ValueError(f"unit {unit.unit_name} is not converted")
    graph, source = unit.graph_module, set(unit.source_keys)
    found: dict[str, dict[str, Any]] = {}
    for node in graph.graph.nodes:
        if node.op != "call_function" or not node.args:
            continue
        weight = node.args[0]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target in source):
            continue
        w = _attr(graph, str(weight.target)).detach()
        if node.target == _QDQ.quantize_per_channel.default:
            _, scale, zero_point, axis, qmin, qmax, dtype = node.args
            scale, zero_point = _attr(graph, scale.target).detach(), _attr(graph, zero_point.target).detach()
            q = _QDQ.quantize_per_channel(w, scale, zero_point, axis, qmin, qmax, dtype)
            layout = {"scheme": _PER_CHANNEL, "axis": int(axis)}
        elif node.target == _QDQ.quantize_per_tensor.default:
            _, scale, zero_point, qmin, qmax, dtype = node.args
            q = _QDQ.quantize_per_tensor(w, float(scale), int(zero_point), qmin, qmax, dtype)
            scale, zero_point = torch.tensor(float(scale)), torch.tensor(int(zero_point))
            layout = {"scheme": _PER_TENSOR}
        else:
            continue
        layout.update(quant_min=int(qmin), quant_max=int(qmax), dtype=str(dtype).removeprefix("torch."))
        found[str(weight.target)] = {
            "int8": q.contiguous(),
            "scale": scale.contiguous(),
            "zero_point": zero_point,
            **layout,
        }
    return found


def _dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, layout: Mapping[str, Any]
) -> torch.Tensor:
    dtype = getattr(torch, layout["dtype"])
    if layout["scheme"] == _PER_CHANNEL:
        return _QDQ.dequantize_per_channel(
            q, scale, zero_point, layout["axis"], layout["quant_min"], layout["quant_max"], dtype
        )
    return _QDQ.dequantize_per_tensor(q, float(scale), int(zero_point), layout["quant_min"], layout["quant_max"], dtype)


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
    extra_files: Mapping[str, str] | None = None,
) -> int:
    """Write the INT8 artifact of a quantized (converted) model to `path` atomically; return its size in bytes.

    `approach` and `quant_config` (INC's `config.to_dict()`; for QAT None or `qat.QAT_CONFIG`) must be
    what the model was quantized with: they are checked against the units. `fp32_units` are the
    patterns given to quantize_/prepare_qat_, recorded with the unit names they resolved to. A
    tokenizer, if given, is written into the same directory (the directory is replaced as a whole),
    and so are `extra_files` (file name -> text, e.g. the recipe); the manifest covers them all.
    """
    units = quantized_units(model)
    unit_config, reduce_range = _check_save_arguments(model, units, approach, quant_config, fp32_units, extra_files)
    fp32 = [name for name in unit_names(model) if name not in units]
    served = [list(map(int, c)) for c in served_length_configs] if served_length_configs is not None else None
    for lengths in served or []:
        check_length_config(lengths, num_layers=model.num_layers)
    weights, layouts = _stored_weights(model, units)
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
        "int8_weights": layouts,
        "embeddings": "int8_per_row" if has_int8_embeddings(model) else "fp32",
        # Linears of fp32 units stored int8 weight-only (qweight, scale), rebuilt as such at load.
        "weight_only_int8": weight_only_modules(model),
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
        save_file(weights, str(tmp / INT8_WEIGHTS_NAME), metadata={"format": FORMAT})
        save_file(observers, str(tmp / OBSERVERS_NAME), metadata={"format": FORMAT})
        atomic_write_json(tmp / QUANTIZATION_NAME, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
        write_manifest(tmp, format=FORMAT)
    size = directory_bytes(path)
    logger.info("saved INT8 %s artifact to %s: %.1f MB", approach, path, size / 1e6)
    return size


def _check_save_arguments(
    model: nn.Module,
    units: Mapping[str, QuantizedUnit],
    approach: str,
    quant_config: Mapping[str, Any] | None,
    fp32_units: Sequence[str],
    extra_files: Mapping[str, str] | None,
) -> tuple[dict, bool]:
    """Raise ValueError unless save_quantized's arguments say how the model was really quantized; return the
    units' (quant config, reduce_range)."""
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
    reserved = {QUANTIZATION_NAME, OBSERVERS_NAME, INT8_WEIGHTS_NAME, MANIFEST_NAME, "config.json", QALA_CONFIG_NAME}
    clash = sorted(set(extra_files or {}) & reserved)
    if clash:
        raise ValueError(f"extra_files {clash} would overwrite the artifact's own files")
    return unit_config, reduce_range


def _stored_weights(
    model: nn.Module, units: Mapping[str, QuantizedUnit]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """What int8_weights.safetensors holds (fp32 weights, and each quantized weight as int8 values, scale and
    zero point) and the layout of each quantized weight."""
    weights = fp32_state_dict(model)
    layouts: dict[str, dict[str, Any]] = {}
    for name, unit in units.items():
        for key, entry in int8_weights(unit).items():
            full = state_prefix(model, name) + key
            weights[full] = entry.pop("int8")
            weights[f"{full}.scale"] = entry.pop("scale")
            weights[f"{full}.zero_point"] = entry.pop("zero_point")
            layouts[full] = entry
    return weights, layouts


def fp32_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in fp32-model naming (loadable by LengthAdaptiveForQuestionAnswering).

    Converted units give back the weights they were quantized from; fake-quant (QAT) units their
    current, trained weights, so this also makes a plain fp32 checkpoint in the middle of QAT. An
    int8 word-embedding table comes back as its int8 buffers (qweight, scale).
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


def check_finite(state: Mapping[str, torch.Tensor], file: str | Path) -> None:
    """Refuse NaN or inf in any floating-point weight, naming the tensor: such a model runs and answers garbage."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise IntegrityError(
                f"{file}: {name} holds {bad} NaN/inf values of {tensor.numel()}; the weights are unusable "
                "(a diverged training run, or a damaged file)"
            )


def _read_record(path: Path) -> dict[str, Any]:
    file = path / QUANTIZATION_NAME
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    # Before reading anything, so an edited file is named as such.
    verified = check_manifest(
        path, required=(QUANTIZATION_NAME, INT8_WEIGHTS_NAME, OBSERVERS_NAME, "config.json"), error=ArtifactError
    )
    if not verified and not file.is_file():
        raise ArtifactError(f"{file}: missing; {path} is not a qala INT8 artifact (save it with save_quantized)")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: not valid JSON ({e})") from e
    version = record.get("format_version")
    if record.get("format") != FORMAT or version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{file}: format {record.get('format')!r} version {version!r}; "
            f"this qala reads {FORMAT!r} versions {list(READABLE_VERSIONS)}"
        )
    if version >= 2 and not (path / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{path / MANIFEST_NAME}: missing; the artifact cannot be verified")
    required = ("approach", "quant_config", "reduce_range", "units", "example_shape")
    required += ("sha256",) if version == 1 else ("int8_weights", "embeddings")
    missing = [k for k in required if k not in record]
    if missing:
        raise ArtifactError(f"{file}: missing keys {missing}")
    if record["approach"] not in APPROACHES:
        raise ArtifactError(f"{file}: unknown approach {record['approach']!r}; expected one of {list(APPROACHES)}")
    if version == 1:  # fp32 weights, checksums inside the record
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


def _model_state(path: Path, record: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict to load before the units are rebuilt: quantized weights dequantized from int8."""
    if record["format_version"] == 1:
        return _load_tensors(path / WEIGHTS_NAME)
    file = path / INT8_WEIGHTS_NAME
    stored = _load_tensors(file)
    state = {}
    for key, layout in record["int8_weights"].items():
        try:
            q, scale, zero_point = stored.pop(key), stored.pop(f"{key}.scale"), stored.pop(f"{key}.zero_point")
            state[key] = _dequantize(q, scale, zero_point, layout)
        except (KeyError, RuntimeError, AttributeError) as e:
            raise ArtifactError(f"{file}: int8 weight {key} is missing or does not fit its layout ({e})") from e
    try:
        empty_weight_only_(model, record.get("weight_only_int8", []))
    except (AttributeError, ValueError) as e:
        raise ArtifactError(f"{path / QUANTIZATION_NAME}: weight_only_int8 names no Linear of the model ({e})") from e
    if record["embeddings"] == "int8_per_row":
        prefix = word_embeddings_key(model)
        try:
            table = Int8Embedding(
                stored[f"{prefix}.qweight"], stored[f"{prefix}.scale"], word_embeddings(model).padding_idx
            )
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{file}: the int8 word-embedding table is missing or malformed ({e})") from e
        model.backbone.embeddings.word_embeddings = table
    state.update(stored)
    return state


def load_quantized(path: str | Path) -> LengthAdaptiveForQuestionAnswering:
    """Rebuild the quantized model saved by `save_quantized` (eval mode); no calibration data needed."""
    path = Path(path)
    record = _read_record(path)
    approach = record["approach"]
    weights_file = path / (WEIGHTS_NAME if record["format_version"] == 1 else INT8_WEIGHTS_NAME)

    qala_file = path / QALA_CONFIG_NAME
    qala_config = LengthAdaptiveConfig.from_json_file(qala_file) if qala_file.is_file() else LengthAdaptiveConfig()
    model = LengthAdaptiveForQuestionAnswering.from_config(AutoConfig.from_pretrained(str(path)), qala_config)
    state = _model_state(path, record, model)
    check_finite(state, weights_file)
    try:
        model.load_state_dict(_with_versions(state, model.state_dict()), strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{weights_file}: does not fit the model in config.json: {e}") from e
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
        if record["format_version"] >= 2:
            _check_int8_reproduced(model, name, unit, state, record["int8_weights"], weights_file)
    model.eval()
    logger.info("loaded INT8 %s artifact %s (%d units quantized, fp32: %s)", approach, path, len(quantized), fp32)
    return model


def _check_int8_reproduced(
    model: nn.Module,
    name: str,
    unit: QuantizedUnit,
    state: Mapping[str, torch.Tensor],
    layouts: Mapping[str, Any],
    file: Path,
) -> None:
    """The rebuilt unit must quantize its weights to exactly the stored int8 values (else logits would drift)."""
    prefix = state_prefix(model, name)
    rebuilt = int8_weights(unit)
    expected = {k for k in layouts if k.startswith(prefix)}
    if {prefix + k for k in rebuilt} != expected:
        raise ArtifactError(
            f"{file}: unit {name} quantizes weights {sorted(rebuilt)}, the file holds {sorted(expected)}"
        )
    for key, entry in rebuilt.items():
        # Equal dequantized weights: the graph multiplies by exactly the values that were saved.
        again = _dequantize(entry["int8"], entry["scale"], entry["zero_point"], layouts[prefix + key])
        if not torch.equal(again, state[prefix + key]):
            raise ArtifactError(
                f"{file}: {prefix + key} does not come back to the stored int8 values with the recorded scales "
                "(saved with other library versions?)"
            )


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
