"""Evaluate a length-adaptive QA model on a SQuAD-format file at any length configuration.

    python -m qala.evaluate MODEL_DIR DATA.json [--keep-ratios 0.9,0.8,0.7,0.6,0.5,0.4 | --keep-ratios keep=0.8]
    python -m qala.evaluate MODEL_DIR DATA.json --length-config 300,260,220,180,140,100   # paper mode, padded
    python -m qala.evaluate MODEL_DIR covidQA.json --skip-invalid   # drop (count, log) questions that fail validation

prints one JSON line (exact_match, f1, n questions, windows, the length configuration, wall time) and writes the
official-format predictions file (question id -> answer text) when --out is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qala.cli import add_verbose, guarded, setup_logging
from qala.data import featurize, load_squad, postprocess_predictions, references_from, squad_metrics
from qala.lengths import (
    check_length_config,
    config_json,
    config_kwargs,
    constant_config,
    parse_keep_ratios,
)
from qala.model import MODEL_INPUTS, SELECTION_RULES, LengthAdaptiveConfig, batch_inputs, macs_per_sample
from qala.quantize.load import load_model, load_tokenizer
from qala.utils import atomic_write_json, resolve_model_path

logger = logging.getLogger(__name__)


def check_output_file(path: str | Path | None, option: str) -> None:
    """Raise ValueError unless `path` (a CLI option's file to write, None: not given) can be written as a file:
    checked before the work, so that a bad path does not lose a whole evaluation's results at the end."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name (e.g. {path / 'predictions.json'})")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {parent} is not writable")


def check_engine(name: str | None, option: str) -> None:
    """Raise ValueError unless `name` (None: not given) is a serving engine of qala.quantize.engines."""
    from qala.quantize.engines import BACKENDS

    if name is not None and name not in BACKENDS:
        raise ValueError(f"{option} {name!r}: unknown serving engine; choose one of {sorted(BACKENDS)}")


def check_positive(**options: int | float | None) -> None:
    """Raise ValueError naming the first CLI option (given as its dest, e.g. batch_size=0) that is set but not
    positive: a batch size, sample count or thread count of 0 or less has no meaning."""
    for name, value in options.items():
        if value is not None and not value > 0:  # `not >` also refuses NaN
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if value is not None and math.isinf(value):  # no limit is the option left out; inf is not JSON
            raise ValueError(f"--{name.replace('_', '-')} must be a finite positive number, got {value}")


@torch.no_grad()
def predict_logits(
    model: Callable,
    features,
    *,
    batch_size: int = 32,
    length_config: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    keep_margins: Sequence[float | None] | None = None,
    progress: bool = True,
    kept_tokens: list[list[int]] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start/end logits of each eval window, one array per window as long as the window.

    `features`: a featurized datasets.Dataset, or a mapping column -> one list per window.
    Windows may be padded (all max_seq_length) or not: unpadded windows are batched by length (so a
    batch pads only to its own longest window) and returned in their original order.
    `model` is a LengthAdaptiveForQuestionAnswering, fp32 or quantized, or any callable taking the
    same keyword inputs (a compiled wrapper). At most one of length_config / keep_ratios; `keep_margins`
    (qala models only) drops by logit margin under them. `kept_tokens`, a list: filled with each window's
    per-layer kept token counts, in window order, when the model reports them (qala's eager model does).
    """
    if batch_size < 1:  # range(0, n, 0) raises, and a negative step silently predicts nothing
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device
    lengths = [len(ids) for ids in features["input_ids"]]
    # Longest windows first (a stable sort: padded windows, all one length, keep their order), so that each
    # batch fits in the blocks the previous one freed. Batches growing in length fragmented glibc's heap:
    # RSS grew with every batch, to 6 GB on COVID-QA (and stayed flat with a fixed M_MMAP_THRESHOLD).
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    kwargs = config_kwargs(keep_ratios, length_config)
    if keep_margins is not None:
        kwargs["keep_margins"] = list(keep_margins)
    counts: list[list[int] | None] = [None] * len(lengths)
    # All windows' logits in one allocation made before the first batch: no small per-batch arrays left
    # behind between the blocks a batch frees.
    all_starts = np.zeros((len(lengths), max(lengths, default=0)), np.float32)
    all_ends = np.zeros_like(all_starts)
    for i in tqdm(range(0, len(order), batch_size), desc="predict", disable=not progress, leave=False):
        chunk = order[i : i + batch_size]
        rows = (
            features.select(chunk)[:]
            if hasattr(features, "select")
            else {k: [features[k][j] for j in chunk] for k in MODEL_INPUTS if k in features}
        )
        out = model(**batch_inputs(rows, device=device), **kwargs)
        start_logits, end_logits = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        kept = getattr(out, "kept_tokens", None)
        for row, j in enumerate(chunk):
            all_starts[j, : lengths[j]] = start_logits[row, : lengths[j]]
            all_ends[j, : lengths[j]] = end_logits[row, : lengths[j]]
            counts[j] = None if kept is None else kept[row].tolist()
    if kept_tokens is not None and all(c is not None for c in counts):
        kept_tokens.extend(counts)
    return [all_starts[j, :n] for j, n in enumerate(lengths)], [all_ends[j, :n] for j, n in enumerate(lengths)]


def evaluate_features(
    model: Callable,
    examples,
    features,
    *,
    length_config: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    keep_margins: Sequence[float | None] | None = None,
    batch_size: int = 32,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """SQuAD EM/F1 of `model` on already featurized examples; returns (metrics, predictions). With a qala
    model, also `macs_ratio`: the MACs of the tokens each layer kept, over full length, summed over the windows
    at their real lengths (qala.model.macs_per_sample); under keep_margins the counts vary with each window."""
    start = time.perf_counter()
    kept_tokens: list[list[int]] = []
    start_logits, end_logits = predict_logits(
        model,
        features,
        batch_size=batch_size,
        length_config=length_config,
        keep_ratios=keep_ratios,
        keep_margins=keep_margins,
        progress=progress,
        kept_tokens=kept_tokens,
    )
    predictions = postprocess_predictions(
        examples, features, start_logits, end_logits, n_best_size=n_best_size, max_answer_length=max_answer_length
    )
    metrics = squad_metrics(predictions, references_from(examples))
    metrics.update(config_json(keep_ratios, length_config))
    if keep_margins is not None:
        metrics["keep_margins"] = list(keep_margins)
    if kept_tokens and hasattr(model, "config"):
        real = [sum(mask) for mask in features["attention_mask"]]
        full = sum(macs_per_sample(model.config, None, n) for n in real)
        kept = sum(macs_per_sample(model.config, k, n) for k, n in zip(kept_tokens, real, strict=True))
        metrics["macs_ratio"] = round(kept / full, 4)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics, predictions


def parse_keep_margins(text: str, *, num_layers: int) -> list[float | None]:
    """'none,5,4.5,4,3.5,3.5' -> [None, 5.0, 4.5, 4.0, 3.5, 3.5] (ValueError naming --keep-margins otherwise)."""
    try:
        margins = [None if v.strip().lower() in ("none", "-", "") else float(v) for v in text.split(",")]
        if len(margins) != num_layers:
            raise ValueError(f"{len(margins)} entries, the model has {num_layers} layers")
        LengthAdaptiveConfig(keep_margins=margins)
    except ValueError as e:
        raise ValueError(f"--keep-margins {text!r}: {e}") from None
    return margins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qala.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a directory written by qala (or any BERT/RoBERTa QA checkpoint)")
    parser.add_argument("data", help="SQuAD-format JSON file, or a datasets hub name such as 'squad'")
    parser.add_argument("--split", default="validation", help="split, for hub datasets (default: validation)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--length-config", help="comma-separated tokens kept after each layer, e.g. 300,260,220,180,140,100"
    )
    group.add_argument(
        "--keep-ratios",
        help="qala's units: per-layer shares of each window's real length, e.g. 0.9,0.8,0.7,0.6,0.5,0.4, or "
        "keep=0.8 for a constant per-layer keep (0.8, 0.64, ...); windows are not padded",
    )
    group.add_argument(
        "--padded-keep-ratio",
        type=float,
        help="paper mode: each layer keeps this share of the previous layer's positions of the padded window "
        "(LAT's length_drop_ratio; becomes a --length-config)",
    )
    parser.add_argument(
        "--keep-margins",
        help="per-layer logit margins under the keep ratios (qala.model LengthAdaptiveConfig.keep_margins), 'none' for "
        "none, e.g. none,5,4.5,4,3.5,3.5: a layer keeps each window's tokens whose span score is within its margin of "
        "the window's best; the reported macs_ratio counts what each window kept",
    )
    parser.add_argument(
        "--padded",
        action="store_true",
        help="pad every window to max_seq_length (implied by --length-config and --padded-keep-ratio, the paper mode)",
    )
    parser.add_argument(
        "--selection",
        choices=SELECTION_RULES,
        help="how each layer ranks the tokens it keeps (default: the model's qala_config.json, else attention); "
        "span: the span head's max(start, end) logit on the layer's output",
    )
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: the model's (384)")
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument(
        "--skip-samples",
        type=int,
        default=0,
        help="leave out the first N questions (before --max-samples): e.g. the questions a search scored on, "
        "so a configuration it picked is checked on questions it never saw",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip questions that fail validation (e.g. an answer_start off its text), counted in one warning, "
        "instead of refusing the file; the metrics cover the questions kept",
    )
    parser.add_argument("--out", help="write predictions (question id -> answer text) to this JSON file")
    add_verbose(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: _evaluate(args))


def _evaluate(args) -> int:
    # Before the model loads: a bad number fails at once.
    check_positive(batch_size=args.batch_size, max_samples=args.max_samples, max_seq_length=args.max_seq_length)
    check_output_file(args.out, "--out")
    if args.skip_samples < 0:
        raise ValueError(f"--skip-samples: expected a count >= 0, got {args.skip_samples}")
    if args.padded_keep_ratio is not None and not 0 < args.padded_keep_ratio <= 1:
        raise ValueError(f"--padded-keep-ratio: expected a share in (0, 1], got {args.padded_keep_ratio}")
    model_dir = resolve_model_path(args.model_dir)
    model = load_model(model_dir)
    if args.selection:
        model.qala_config.selection = args.selection
    tokenizer = load_tokenizer(model_dir)
    examples = load_squad(args.data, split=args.split, skip_invalid=args.skip_invalid, skip_option="--skip-invalid")
    if args.skip_samples:
        if args.skip_samples >= len(examples):
            raise ValueError(
                f"--skip-samples: {args.data} has {len(examples)} questions, none left after {args.skip_samples}"
            )
        examples = examples.select(range(args.skip_samples, len(examples)))
    if args.max_samples:
        examples = examples.select(range(min(args.max_samples, len(examples))))
    max_seq_length = args.max_seq_length or model.qala_config.max_seq_length

    length_config = None
    try:
        if args.length_config:
            length_config = [int(n) for n in args.length_config.split(",")]
        elif args.padded_keep_ratio is not None:
            length_config = constant_config(args.padded_keep_ratio, model.num_layers, max_seq_length)["length_config"]
        if length_config is not None:
            check_length_config(length_config, num_layers=model.num_layers, max_seq_length=max_seq_length)
    except ValueError as e:
        raise ValueError(f"{'--length-config' if args.length_config else '--padded-keep-ratio'}: {e}") from None
    keep_ratios = None
    if args.keep_ratios:
        try:
            keep_ratios = parse_keep_ratios(args.keep_ratios, num_layers=model.num_layers)
        except ValueError as e:
            raise ValueError(f"--keep-ratios: {e}") from None

    keep_margins = None
    if args.keep_margins:
        keep_margins = parse_keep_margins(args.keep_margins, num_layers=model.num_layers)

    # Absolute length configurations count positions of the padded window, so they need padding;
    # keep ratios and full length run on the real windows, batched by length.
    padded = args.padded or length_config is not None
    features = featurize(
        examples,
        tokenizer,
        train=False,
        max_seq_length=max_seq_length,
        doc_stride=args.doc_stride,
        pad_to_max_length=padded,
        source=str(args.data),
    )
    metrics, predictions = evaluate_features(
        model,
        examples,
        features,
        length_config=length_config,
        keep_ratios=keep_ratios,
        keep_margins=keep_margins,
        batch_size=args.batch_size,
    )
    metrics["padded"] = padded
    metrics["selection"] = model.qala_config.selection
    metrics["windows"] = len(features)
    metrics["skip_samples"] = args.skip_samples
    metrics.update(model=str(args.model_dir), data=str(args.data))
    if args.out:
        atomic_write_json(Path(args.out), predictions)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
