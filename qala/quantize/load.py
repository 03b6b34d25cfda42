"""The one seam that loads any qala model directory: fp32 or INT8, eager or compiled.

Every stage that reads a model (evaluate, tune, search, answer, bench) calls `load_model`; nothing
else decides whether a directory is an INT8 artifact. It lives in qala.quantize because that is the
lowest step that knows both formats: an fp32 directory is LengthAdaptiveForQuestionAnswering's
save_pretrained output (or any BERT/RoBERTa QA checkpoint), an INT8 one is recognised by the
quantization.json that `save_quantized` writes. `load_tokenizer` is the matching seam for the
tokenizer stored beside the model.

What is refused, each with one line naming the file: a path that names no directory ("model directory
not found"); a file that differs from the directory's manifest.json (written by qala.train and
save_quantized; a directory without one, e.g. a plain transformers checkpoint, loads with a note);
weights that are truncated, do not fit config.json, lack the span head, or hold NaN/inf; tokenizer
files that are missing or whose vocabulary does not fit config.json's vocab_size (transformers would
quietly build a 5-token vocabulary and answer from [UNK]s).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from qala.model import QALA_CONFIG_NAME, LengthAdaptiveConfig, LengthAdaptiveForQuestionAnswering
from qala.quantize.artifact import (
    INT8_WEIGHTS_NAME,
    OBSERVERS_NAME,
    QUANTIZATION_NAME,
    ArtifactError,
    _read_record,
    check_finite,
    load_quantized,
)
from qala.quantize.compile import CompiledQA
from qala.utils import (
    MANIFEST_NAME,
    PACKAGE_SCHEME,
    VOCABULARY_FILES,
    IntegrityError,
    check_manifest,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

Kind = Literal["fp32", "int8"]
T = TypeVar("T")

# Everything a tokenizer reads: these entries of a manifest are checked when only the tokenizer is loaded.
TOKENIZER_FILES = (
    *VOCABULARY_FILES,
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def local_directory(path: str | Path) -> Path | None:
    """The local directory `path` names, or None for a Hugging Face Hub id ("org/name").

    Anything that looks like a path (exists, starts with . / ~, package://, or has more than two
    parts) but is no directory: FileNotFoundError "model directory not found: PATH".
    """
    text = str(path)
    local = Path(resolve_model_path(text)).expanduser()
    if local.is_dir():
        return local
    if local.exists() or text.startswith((".", "/", "~", PACKAGE_SCHEME)) or len(Path(text).parts) > 2:
        raise FileNotFoundError(f"model directory not found: {path}")
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host (HF_ENDPOINT) takes a TCP connection within `timeout` seconds. Without a network,
    huggingface_hub retries for most of a minute before it gives up; this says so in a few seconds. Behind a
    proxy the client is left to find out."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def _from_hub(load: Callable[..., T], name: str) -> T:
    """`load(name)` for a name that is no local directory; its failure said as the missing directory it may be.
    With the Hub out of reach, only the local cache is read (at once, not after a minute of retries)."""
    try:
        if not _offline() and not _hub_reachable():
            try:
                return load(name, local_files_only=True)
            except (OSError, ValueError):
                raise OSError(f"the Hub cannot be reached from here and {name} is not in the local cache") from None
        return load(name)
    except (OSError, ValueError) as e:  # no such repo, offline, or not a valid repo id (HFValidationError)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"model directory not found: {name} (nor a Hugging Face Hub model: {reason})") from e


def model_kind(path: str | Path) -> Kind:
    """ "int8" for an artifact written by save_quantized, "fp32" for any other directory.

    A directory holding INT8 artifact files but no quantization.json is neither: ArtifactError naming
    the missing file, rather than a silent attempt to read it as an fp32 model.
    """
    directory = Path(resolve_model_path(str(path))).expanduser()
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
    local = local_directory(path)
    kind = model_kind(local) if local is not None else "fp32"
    if expect is not None and kind != expect:
        hint = (
            "point it at qala.tune's OUTPUT_DIR/model for INT8"
            if expect == "int8"
            else "it is an INT8 artifact; use the INT8 backend or an fp32 model directory"
        )
        raise FileNotFoundError(f"{path} is an {kind} model directory, expected {expect}: {hint}")
    if kind == "int8":
        model = load_quantized(local)  # checks its manifest, shapes and weights itself
    elif local is None:
        model = _from_hub(LengthAdaptiveForQuestionAnswering.from_pretrained, str(path))
        check_finite(model.state_dict(), path)
    else:
        model = _load_fp32(local)
    model.eval()
    return CompiledQA(model) if compiled else model


@dataclass(frozen=True)
class ModelConfigs:
    """A model's configs without its weights: what a caller needs before, or instead of, loading the model."""

    config: PretrainedConfig
    qala_config: LengthAdaptiveConfig

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)


def artifact_configs(path: str | Path) -> ModelConfigs:
    """The configs of the INT8 artifact in `path` (the default qala config without qala_config.json, as
    load_quantized), after the checks of its files that load_model makes first (manifest, quantization.json): a
    damaged artifact is refused here as there, whether or not its model is ever rebuilt (an engine serving graphs
    cached by its content need not: qala.quantize.qdq)."""
    directory = Path(resolve_model_path(str(path))).expanduser()
    if model_kind(directory) != "int8":
        raise FileNotFoundError(f"{path} is an fp32 model directory, expected int8: point it at qala.tune's model")
    _read_record(directory)
    qala_file = directory / QALA_CONFIG_NAME
    qala_config = LengthAdaptiveConfig.from_json_file(qala_file) if qala_file.is_file() else LengthAdaptiveConfig()
    return ModelConfigs(AutoConfig.from_pretrained(str(directory)), qala_config)


def _load_fp32(directory: Path) -> LengthAdaptiveForQuestionAnswering:
    if not check_manifest(directory):
        logger.info("%s: no %s, its files are not verified (not saved by qala.train)", directory, MANIFEST_NAME)
    files = _check_weights_fit_config(directory)
    try:
        model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(directory))
    except SafetensorError as e:  # damage the header check could not see
        raise IntegrityError(f"{directory}: weights cannot be read ({e})") from e
    check_finite(model.state_dict(), files[0] if len(files) == 1 else directory)
    return model


def _check_weights_fit_config(directory: Path) -> list[Path]:
    """Read the safetensors headers (no data) and compare every tensor's shape with what config.json builds.

    Names a truncated or damaged weights file, a config.json edited after training (hidden_size,
    vocab_size, ...) and a checkpoint without the span head, which transformers would fill with
    random weights: a model that runs and answers nothing. Returns the weights files.
    """
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise IntegrityError(f"{config_file}: missing; {directory} is not a model directory")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{config_file}: cannot be read ({str(e).strip().splitlines()[0]})") from e
    files = sorted(directory.glob("model*.safetensors"))  # model.safetensors, or its shards
    if not files:
        return files  # a PyTorch .bin checkpoint: no header to read cheaply; transformers checks it
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: list(v.shape) for k, v in AutoModelForQuestionAnswering.from_config(config).state_dict().items()}
    stored: dict[str, list[int]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as e:
            raise IntegrityError(f"{file}: cannot be read as safetensors ({e}); truncated or damaged?") from e
        for key, shape in shapes.items():
            if key in expected and expected[key] != shape:
                raise IntegrityError(
                    f"{config_file}: does not fit {file.name}: {key} has shape {shape}, config.json makes it "
                    f"{expected[key]} (config edited, or weights of another model?)"
                )
        stored.update(shapes)
    head = [key for key in expected if key.startswith("qa_outputs.")]
    if head and not any(key in stored for key in head):
        raise IntegrityError(
            f"{files[0]}: no span head ({head[0]}): a backbone checkpoint, not a question-answering model "
            "(fine-tune it with qala.train first)"
        )
    return files


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a model (a local directory, or a Hugging Face Hub id), checked.

    A local directory must hold a vocabulary (VOCABULARY_FILES): without one, transformers builds a
    5-token vocabulary and every word becomes [UNK], a model that quietly answers nothing. The
    tokenizer's size must fit config.json's vocab_size where the directory has one: at least half of
    it (models pad their embedding table a little, never by half) and no more (ids past the table).
    """
    local = local_directory(path)
    if local is None:
        return _from_hub(AutoTokenizer.from_pretrained, str(path))
    has_vocabulary = [
        name
        for name in VOCABULARY_FILES
        if (local / name).is_file() and (name != "vocab.json" or (local / "merges.txt").is_file())
    ]
    if not has_vocabulary:
        raise IntegrityError(
            f"{local}: no tokenizer files; expected tokenizer.json, vocab.txt, vocab.json + merges.txt or a "
            "SentencePiece .model (save the tokenizer the model was trained with there)"
        )
    check_manifest(local, only=TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    config_file = local / "config.json"
    vocab_size = json.loads(config_file.read_text()).get("vocab_size") if config_file.is_file() else None
    if isinstance(vocab_size, int) and not vocab_size / 2 <= len(tokenizer) <= vocab_size:
        raise IntegrityError(
            f"{local}: the tokenizer ({', '.join(has_vocabulary)}) has {len(tokenizer)} tokens, config.json's "
            f"vocab_size is {vocab_size}: tokenizer files that do not belong to this model, or are damaged"
        )
    return tokenizer
