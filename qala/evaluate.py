"""Evaluate a length-adaptive QA model on a SQuAD-format file at any length configuration.

    python -m qala.evaluate MODEL_DIR DATA.json [--length-config 300,260,...] [--keep-ratio 0.6] [--out PRED.json]

prints one JSON line (exact_match, f1, n, the length configuration, wall time) and writes the
official-format predictions file (question id -> answer text) when --out is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from qala.cli import add_verbose, guarded, setup_logging
from qala.data import featurize, load_squad, postprocess_predictions, references_from, squad_metrics
from qala.model import batch_inputs, check_length_config, constant_ratio_length_config
from qala.quantize.load import load_model
from qala.utils import atomic_write_json, resolve_model_path

logger = logging.getLogger(__name__)

@torch.no_grad()
def predict_logits(
    model: Callable,
    features,
    *,
    batch_size: int = 32,
    length_config: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits [num_features, seq_len] for eval features (padded to one length).

    `model` is a LengthAdaptiveForQuestionAnswering, fp32 or quantized, or any callable taking the
    same keyword inputs (a compiled wrapper).
    """
    device = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device
    starts, ends = [], []
    for i in tqdm(range(0, len(features), batch_size), desc="predict", disable=not progress, leave=False):
        batch = features[i : i + batch_size]
        inputs = batch_inputs(batch, device=device)
        kwargs = {"length_config": length_config} if length_config is not None else {}
        out = model(**inputs, **kwargs)
        starts.append(out.start_logits.float().cpu().numpy())
        ends.append(out.end_logits.float().cpu().numpy())
    return np.concatenate(starts), np.concatenate(ends)


def evaluate_features(
    model: Callable,
    examples,
    features,
    *,
    length_config: Sequence[int] | None = None,
    batch_size: int = 32,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """SQuAD EM/F1 of `model` on already featurized examples; returns (metrics, predictions)."""
    start = time.perf_counter()
    start_logits, end_logits = predict_logits(
        model, features, batch_size=batch_size, length_config=length_config, progress=progress
    )
    predictions = postprocess_predictions(
        examples, features, start_logits, end_logits, n_best_size=n_best_size, max_answer_length=max_answer_length
    )
    metrics = squad_metrics(predictions, references_from(examples))
    metrics["length_config"] = list(length_config) if length_config is not None else None
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics, predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qala.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a directory written by qala (or any BERT/RoBERTa QA checkpoint)")
    parser.add_argument("data", help="SQuAD-format JSON file, or a datasets hub name such as 'squad'")
    parser.add_argument("--split", default="validation", help="split, for hub datasets (default: validation)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--length-config", help="comma-separated tokens kept after each layer, e.g. 300,260,220,180,140,100"
    )
    group.add_argument("--keep-ratio", type=float, help="each layer keeps this share of the previous layer's tokens")
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: the model's (384)")
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument("--out", help="write predictions (question id -> answer text) to this JSON file")
    add_verbose(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: _evaluate(args))


def _evaluate(args) -> int:
    model_dir = resolve_model_path(args.model_dir)
    model = load_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_squad(args.data, split=args.split)
    if args.max_samples:
        examples = examples.select(range(min(args.max_samples, len(examples))))
    max_seq_length = args.max_seq_length or model.qala_config.max_seq_length

    length_config = None
    try:
        if args.length_config:
            length_config = [int(n) for n in args.length_config.split(",")]
        elif args.keep_ratio is not None:
            length_config = constant_ratio_length_config(args.keep_ratio, model.num_layers, max_seq_length)
        if length_config is not None:
            check_length_config(length_config, num_layers=model.num_layers, max_seq_length=max_seq_length)
    except ValueError as e:
        raise ValueError(f"--length-config: {e}") from None

    # Padded to max_seq_length so that length configurations mean what they mean in deployment.
    features = featurize(
        examples,
        tokenizer,
        train=False,
        max_seq_length=max_seq_length,
        doc_stride=args.doc_stride,
        pad_to_max_length=True,
    )
    metrics, predictions = evaluate_features(
        model, examples, features, length_config=length_config, batch_size=args.batch_size
    )
    metrics.update(model=str(args.model_dir), data=str(args.data))
    if args.out:
        atomic_write_json(Path(args.out), predictions)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
