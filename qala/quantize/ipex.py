"""Optional backend: static INT8 with Intel Extension for PyTorch (IPEX), one TorchScript graph per served shape.

IPEX is retired (its last release is 2.8) and each IPEX release runs only with its own torch minor
version: it needs torch 2.8.x + intel-extension-for-pytorch 2.8.x, in an environment of its own
(qala's main environment pins torch 2.13); `bash benchmarks/ipex_env.sh` builds one at .venv-ipex.
Versions are checked from package metadata before importing IPEX, because a mismatched IPEX aborts the
process on import. Nothing here is imported by `import qala` or `import qala.quantize`.

How a model is quantized (the path ITREX took, through Intel Neural Compressor's IPEX backend):

1. calibrate: INC 3.x `prepare(model, StaticQuantConfig(...), example_inputs)` -> run the calibration
   batches -> `convert`. With IPEX imported and a plain (not exported) model, INC takes its IPEX path
   (`ipex.quantization.prepare/convert` + `torch.jit.trace/freeze`). What we keep is the calibrated
   *qconf summary* (IPEX's JSON of per-op observers, scales and zero points), not INC's traced graph.
   Without INC, IPEX's own `prepare`/calibrate/`save_qconf_summary` produce the same summary with the
   same qconfig (`calibrated_with` says which ran).
2. build: `ipex.quantization.prepare` at the served shape, `load_qconf_summary`, `convert`, trace,
   freeze. This reproduces INC's converted graph exactly (max logit difference 0.0, checked on the
   reference model) and works at any batch size.

IPEX quantizes eagerly (observers per op) and then needs a traced graph; tracing bakes in the Python
token selection, so each length configuration is calibrated on its own (its op sequence differs) and
each (length configuration, batch, sequence length) gets its own frozen trace, built on first use; at
full length one trace serves every shape (nothing in it depends on the shape), so unpadded windows of
any length need no bucketing.
A qconf summary fits every batch size but only sequence lengths at which the same layers drop tokens
(padded inputs: always); a shape where it does not fit is reported, not guessed.

Non-quantized ops stay fp32: INC would run them in bf16 on CPUs with bf16 (`excluded_precisions`
empty), which qala turns off so that IPEX rows compare with the PT2E rows (INT8 + fp32) everywhere.

As qala.tune's quantizer (quantization.backend: ipex, named in qala.tune.QUANTIZERS): `check_recipe` and
`quantize_and_score` calibrate, score and time the model, and keep the calibration
(OUTPUT_DIR/ipex_calibration.json).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from qala.quantize.units import model_inputs
from qala.utils import BackendUnavailableError

logger = logging.getLogger(__name__)

IPEX_DIST = "intel-extension-for-pytorch"
REQUIRED_MINOR = "2.8"
INSTALL_HINT = (
    "the IPEX backend needs torch 2.8.x and intel-extension-for-pytorch 2.8.x (IPEX is retired; 2.8 is its last "
    "release and runs only with torch 2.8), in a separate environment: bash benchmarks/ipex_env.sh builds one at "
    ".venv-ipex; or use qala's default PT2E backend (quantize_)"
)
ARTIFACT_NAME = "IPEX calibration"  # what qala.tune's summary calls the file quantize_and_score keeps
# INC StaticQuantConfig fields used unless the caller gives others: the entry of recipes/squad_int8.yaml
# that the PT2E rows start from (min/max calibration, asymmetric activations, per-channel weights).
DEFAULT_STATIC_CONFIG: dict[str, Any] = {"act_algo": "minmax", "act_sym": False, "w_granularity": "per_channel"}
QCONF_FORMAT = "qala-ipex-qconf/1"

LengthKey = tuple[int, ...] | None


class IpexUnavailableError(BackendUnavailableError):
    """IPEX is missing or does not match the installed torch (an ImportError, as for qala's other optional
    backends: entry points report it as a user error, with what to install)."""


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
    except Exception as e:  # an IPEX build error surfaces as anything from ImportError to OSError/NameError
        raise IpexUnavailableError(
            f"{found}, but importing it failed ({e!r}; with transformers >= 5.24 IPEX 2.8's import fails, "
            f"see benchmarks/ipex_env.sh); {INSTALL_HINT}"
        ) from e
    return ipex


def versions() -> dict[str, str | None]:
    """The versions an IPEX result depends on."""
    found: dict[str, str | None] = {}
    for dist in ("torch", IPEX_DIST, "neural-compressor-pt", "transformers"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def length_key(length_config: Sequence[int] | None) -> LengthKey:
    return None if length_config is None else tuple(int(n) for n in length_config)


def qconfig_mapping() -> Any:
    """The QConfigMapping INC's IPEX path prepares with (and so must a rebuild from its qconf summary):
    per-tensor affine uint8 activations (min/max), per-channel symmetric int8 weights. Op-wise choices
    (algorithm, symmetry, fp32 ops) live in the qconf summary and override it."""
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

    qconfig = QConfig(
        activation=MinMaxObserver.with_args(qscheme=torch.per_tensor_affine, dtype=torch.quint8),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    return QConfigMapping().set_global(qconfig)


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


def _args(inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    types = inputs.get("token_type_ids")
    return (
        ids,
        torch.ones_like(ids) if mask is None else mask,
        torch.zeros_like(ids) if types is None else types,
    )


@contextlib.contextmanager
def _scratch_cwd() -> Iterator[Path]:
    """INC writes its IPEX qconf files under ./nc_workspace/<time>/ of the working directory: keep them out
    of the caller's folder."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="qala-ipex-") as scratch:
        os.chdir(scratch)
        try:
            yield Path(scratch)
        finally:
            os.chdir(previous)


def _inc_available() -> bool:
    try:
        importlib.metadata.version("neural-compressor-pt")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@torch.no_grad()
def calibrate(
    model: nn.Module,
    length_config: Sequence[int] | None,
    calibration: Sequence[Mapping[str, Any]],
    *,
    static_config: Mapping[str, Any] | None = None,
    use_inc: bool | None = None,
) -> tuple[dict[str, Any], str]:
    """Static INT8 calibration of `model` at one length configuration; returns (qconf summary, which path ran).

    The summary is IPEX's JSON-ready dict of per-op quantization settings with calibrated scales and zero
    points. `use_inc=None` takes INC's IPEX path when neural-compressor-pt is installed.
    """
    ipex = import_ipex()
    batches = [_args(model_inputs(batch)[0]) for batch in calibration]
    if not batches:
        raise ValueError("calibration yielded no batch; IPEX static quantization needs at least one")
    fixed = _FixedLengthQA(copy.deepcopy(model), length_config).eval()
    use_inc = _inc_available() if use_inc is None else use_inc
    params = dict(DEFAULT_STATIC_CONFIG if static_config is None else static_config)
    start = time.perf_counter()
    with _scratch_cwd() as scratch:
        if use_inc:
            from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

            config = StaticQuantConfig(**params, excluded_precisions=["bf16"])
            prepared = prepare(fixed, config, example_inputs=batches[0])
            for args in batches:
                prepared(*args)
            summary = convert(prepared).tune_cfg
            path = f"inc {versions()['neural-compressor-pt']} StaticQuantConfig({params}) -> IPEX"
        else:
            if static_config is not None:
                raise ValueError("static_config needs INC (neural-compressor-pt); IPEX alone uses qconfig_mapping()")
            prepared = ipex.quantization.prepare(fixed, qconfig_mapping(), example_inputs=batches[0], inplace=True)
            for args in batches:
                prepared(*args)
            prepared.save_qconf_summary(qconf_summary=str(scratch / "qconf.json"))
            summary = json.loads((scratch / "qconf.json").read_text())
            path = "ipex.quantization.prepare (min/max, per-channel weights), no INC"
    logger.info(
        "IPEX: calibrated length config %s on %d batches via %s in %.1f s",
        length_config,
        len(batches),
        path,
        time.perf_counter() - start,
    )
    return summary, path


@torch.no_grad()
def build(
    model: nn.Module, length_config: Sequence[int] | None, summary: Mapping[str, Any], example: Mapping[str, Any]
) -> torch.jit.ScriptModule:
    """The frozen INT8 TorchScript graph of `model` at `length_config` for inputs shaped like `example`."""
    ipex = import_ipex()
    args = _args(model_inputs(example)[0])
    fixed = _FixedLengthQA(copy.deepcopy(model), length_config).eval()
    prepared = ipex.quantization.prepare(fixed, qconfig_mapping(), example_inputs=args, inplace=True)
    with _scratch_cwd() as scratch:
        (scratch / "qconf.json").write_text(json.dumps(summary))
        try:
            prepared.load_qconf_summary(qconf_summary=str(scratch / "qconf.json"))
        except (IndexError, KeyError) as e:
            raise ValueError(
                f"the IPEX calibration of length config {length_config} does not fit inputs of shape "
                f"{tuple(args[0].shape)}: it was calibrated where a different set of layers dropped tokens "
                "(use inputs padded to the calibration's sequence length)"
            ) from e
    converted = ipex.quantization.convert(prepared)
    traced = torch.jit.freeze(torch.jit.trace(converted, args, check_trace=False).eval())
    # TorchScript's profiling executor fuses on the first runs (IPEX's LLGA INT8 groups); warm it here.
    for _ in range(2):
        traced(*args)
    return traced


class IpexStaticQA:
    """IPEX static INT8 of a length-adaptive model; call like CompiledQA: `qa(**inputs, length_config=...)`.

    Give `calibration` (batches of the training file) to calibrate each length configuration on first use,
    or `summaries` (from `save_summaries` / `from_summaries`) to serve calibrated configurations without
    calibration data. Outputs are transformers' QuestionAnsweringModelOutput, as from the model itself.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Iterable[Mapping[str, Any]] | None = None,
        *,
        static_config: Mapping[str, Any] | None = None,
        summaries: Mapping[LengthKey, Mapping[str, Any]] | None = None,
        use_inc: bool | None = None,
    ) -> None:
        self.ipex = import_ipex()
        self.model = model.eval()
        self.calibration = [model_inputs(batch)[0] for batch in calibration or []]
        if not self.calibration and not summaries:
            raise ValueError("calibration yielded no batch; IPEX static quantization needs at least one")
        self.static_config = static_config
        self.use_inc = use_inc
        self.summaries: dict[LengthKey, dict[str, Any]] = {k: dict(v) for k, v in (summaries or {}).items()}
        self.calibrated_with: dict[LengthKey, str] = {}
        self.build_seconds: dict[tuple, float] = {}
        self._traced: dict[tuple, torch.jit.ScriptModule] = {}

    def _lengths(self, length_config: Sequence[int] | None) -> LengthKey:
        return length_key(length_config if length_config is not None else self.model.qala_config.length_config)

    def summary(self, length_config: Sequence[int] | None) -> dict[str, Any]:
        """The qconf summary of one length configuration, calibrating it first when needed."""
        lengths = self._lengths(length_config)
        if lengths not in self.summaries:
            if not self.calibration:
                raise ValueError(f"length config {lengths} was not calibrated and no calibration data was given")
            summary, path = calibrate(
                self.model,
                lengths,
                self.calibration,
                static_config=self.static_config,
                use_inc=self.use_inc,
            )
            self.summaries[lengths] = summary
            self.calibrated_with[lengths] = path
        return self.summaries[lengths]

    def graph(self, length_config: Sequence[int] | None = None, **inputs: torch.Tensor) -> torch.jit.ScriptModule:
        """The frozen graph serving `inputs`' shape at `length_config` (built and warmed on first use)."""
        lengths = self._lengths(length_config)
        ids = inputs["input_ids"]
        # At full length the graph has no top-k: nothing in it depends on the input's shape, so one trace
        # serves every batch size and sequence length (checked against per-shape traces in tests/test_ipex.py;
        # TorchScript's profiling executor re-specializes each new shape on its first calls, tens of ms).
        # A dropping configuration bakes its top-k widths in: one trace per shape.
        key = (lengths,) if lengths is None else (lengths, *ids.shape)
        if key not in self._traced:
            start = time.perf_counter()
            self._traced[key] = build(self.model, lengths, self.summary(lengths), inputs)
            self.build_seconds[key] = round(time.perf_counter() - start, 2)
        return self._traced[key]

    @torch.no_grad()
    def __call__(
        self, length_config: Sequence[int] | None = None, keep_ratios: Any = None, **inputs: torch.Tensor
    ) -> Any:
        if keep_ratios is not None:
            # Per-row shares of each window's real length make the top-k sizes data-dependent: a traced
            # graph cannot follow them. Refuse rather than silently serve full length.
            raise ValueError(
                "the IPEX backend serves absolute length configurations only (one traced graph each), not "
                "keep_ratios; use constant_ratio_length_config(r, layers, 384) on inputs padded to 384"
            )
        start_logits, end_logits = self.graph(length_config, **inputs)(*_args(inputs))
        return QuestionAnsweringModelOutput(start_logits=start_logits, end_logits=end_logits)

    # ------------------------------------------------------------ calibration on disk

    def save_summaries(self, path: str | Path, **record: Any) -> Path:
        """Write every calibrated configuration's qconf summary to one JSON file (plus `record` fields)."""
        data = {
            "format": QCONF_FORMAT,
            "versions": versions(),
            **record,
            "configs": [
                {
                    "length_config": None if k is None else list(k),
                    "calibrated_with": self.calibrated_with.get(k),
                    "qconf_summary": v,
                }
                for k, v in self.summaries.items()
            ],
        }
        from qala.utils import atomic_write_text

        atomic_write_text(path, json.dumps(data) + "\n")
        return Path(path)

    @classmethod
    def from_summaries(cls, model: nn.Module, path: str | Path) -> IpexStaticQA:
        """Serve the configurations calibrated in a `save_summaries` file (no calibration data needed)."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != QCONF_FORMAT:
            raise ValueError(f"{path}: not a qala IPEX calibration file (format {data.get('format')!r})")
        summaries = {length_key(c["length_config"]): c["qconf_summary"] for c in data["configs"]}
        qa = cls(model, summaries=summaries)
        qa.calibrated_with = {length_key(c["length_config"]): c.get("calibrated_with") for c in data["configs"]}
        return qa


def calibrated_length_configs(path: str | Path) -> list[list[int] | None]:
    """The length configurations a `save_summaries` file holds (None: full length); readable without IPEX."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != QCONF_FORMAT:
        raise ValueError(f"{path}: not a qala IPEX calibration file (format {data.get('format')!r})")
    return [None if c["length_config"] is None else [int(n) for n in c["length_config"]] for c in data["configs"]]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def timing_callable(
    model_dir: str | Path,
    length_config: Sequence[int] | None,
    example: Mapping[str, torch.Tensor],
    *,
    summaries: str | Path | None = None,
    calibration: Iterable[Mapping[str, Any]] | None = None,
) -> tuple[Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """(call(batch) -> (start_logits, end_logits), facts) for timing one IPEX row; run in the IPEX environment.

    `model_dir` is the fp32 qala model; `summaries` a calibration file written by `save_summaries` (e.g.
    by python -m qala.bench.ipex) that holds `length_config`; without it, `calibration` batches are
    calibrated here first. The graph for `example`'s shape is built and warmed before returning, so
    calls of that shape time the INT8 graph only; another shape builds its own graph on its first call.
    """
    from qala.model import LengthAdaptiveForQuestionAnswering

    model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(model_dir)).eval()
    if summaries is not None:
        qa = IpexStaticQA.from_summaries(model, summaries)
    else:
        qa = IpexStaticQA(model, calibration)
    start = time.perf_counter()
    graph = qa.graph(length_config, **example)
    facts: dict[str, Any] = {
        "engine": "ipex",
        "versions": versions(),
        "calibrated_with": qa.calibrated_with.get(length_key(length_config)),
        "build_seconds": round(time.perf_counter() - start, 2),
        "summaries": None if summaries is None else str(summaries),
        "summaries_sha256": None if summaries is None else file_sha256(summaries),
    }
    shape = tuple(example["input_ids"].shape)

    def call(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if tuple(batch["input_ids"].shape) == shape:
                return graph(*_args(batch))
            out = qa(length_config=length_config, **batch)
            return out.start_logits, out.end_logits

    return call, facts


# ------------------------------------------------------------------ qala.tune's quantizer (quantization.backend: ipex)


def check_recipe(recipe: Any) -> None:
    """Before qala.tune loads model and data: IPEX usable here (else what to install), approach static."""
    from qala.recipe import RecipeError

    import_ipex()
    if recipe.quantization.approach != "static":
        raise RecipeError("quantization.backend", ["backend ipex supports approach static only"])


def quantize_and_score(tuner: Any, out: Path) -> tuple[dict[str, Any], int]:
    """IPEX static INT8 scored and timed by qala.tune's `tuner` (a qala.tune.Tuner: a later step, so not imported
    here), one traced graph per shape; returns (report, exit status 0), also written to OUTPUT_DIR/report.json.

    What is kept is the calibration (OUTPUT_DIR/ipex_calibration.json: IPEX's qconf summary per length
    configuration, JSON), from which IpexStaticQA.from_summaries rebuilds the graphs; IPEX's own artifacts are
    TorchScript archives, which qala does not load (they execute code).
    """
    from qala.utils import atomic_write_json, environment_info

    qa = IpexStaticQA(tuner.fp32, tuner.calibration)
    report = {"final": tuner.final_report(qa, compiled=False)}
    calibration = qa.save_summaries(out / "ipex_calibration.json", model=str(tuner.recipe.quantization.model))
    report.update(
        approach="static",
        backend="ipex",
        artifact=str(calibration),
        artifact_bytes=calibration.stat().st_size,
        environment=environment_info(),
    )
    atomic_write_json(out / "report.json", report)
    return report, 0
