"""Budget-aware question answering: the most accurate frontier configuration that fits a latency budget.

    python -m qala.answer --model DIR [--budget-ms 15] --question "..." --context "..." [--threads N]

prints one JSON object: the answer, its score (start + end logit), the length configuration used and
its expected latency. A model directory (fp32, or an INT8 artifact with quantization.json) carries
the frontier.json that `python -m qala.search` installs there. On first load the latency of each
frontier configuration is measured on this host and cached beside the model as latency_<host>.json;
later loads read it. A budget that nothing fits gets the fastest configuration and a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qala.cli import add_verbose, guarded, setup_logging
from qala.data import postprocess_with_scores, prepare_eval_features
from qala.model import MODEL_INPUTS, batch_inputs
from qala.quantize.load import load_model, model_kind
from qala.search import FRONTIER_NAME, read_frontier
from qala.utils import atomic_write_json, median_latency_ms, resolve_model_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontierPoint:
    """One served configuration: its lengths, its F1 from the search, its latency per window on this host."""

    length_config: tuple[int, ...]
    f1: float
    latency_ms: float


def select_point(
    points: Sequence[FrontierPoint], budget_ms: float | None, windows: int = 1
) -> tuple[FrontierPoint, bool]:
    """(the most accurate point whose expected time fits the budget, whether it fits).

    Expected time is latency_ms * windows: latency is measured for one window, and a batch of windows
    is assumed to cost no more than that many single windows (batching only helps on CPUs), so the
    estimate errs on the safe side. No budget: the most accurate point. Nothing fits: the fastest
    point, and False. Equal F1: the faster point.
    """
    if not points:
        raise ValueError("no frontier configurations to choose from")
    if budget_ms is None:
        return max(points, key=lambda p: (p.f1, -p.latency_ms)), True
    fitting = [p for p in points if p.latency_ms * windows <= budget_ms]
    if fitting:
        return max(fitting, key=lambda p: (p.f1, -p.latency_ms)), True
    return min(points, key=lambda p: (p.latency_ms, -p.f1)), False


def host_name() -> str:
    """This host's name, safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


class QalaModel:
    """A length-adaptive QA model with its frontier: answers within a latency budget."""

    def __init__(
        self,
        model: Callable,
        tokenizer: Any,
        points: Sequence[FrontierPoint],
        *,
        max_seq_length: int,
        doc_stride: int = 128,
        n_best_size: int = 20,
        max_answer_length: int = 30,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.points = sorted(points, key=lambda p: p.latency_ms)
        self.max_seq_length = max_seq_length
        self.doc_stride = doc_stride
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        latency_repeats: int = 5,
        remeasure: bool = False,
        compile: bool = True,
    ) -> QalaModel:
        """Load the model (fp32, or INT8 when the directory has quantization.json), its tokenizer and
        frontier.json, and the per-configuration latency on this host (cached in latency_<host>.json,
        re-measured when the cache is for other threads, backend or configurations, or with `remeasure`).
        INT8 runs through qala.quantize.CompiledQA, one compiled graph per configuration and batch shape;
        `compile=False` runs it eagerly (no compile wait, slower calls).
        """
        from transformers import AutoTokenizer

        model_dir = Path(resolve_model_path(str(model_dir)))
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if threads:
            torch.set_num_threads(threads)
        int8 = model_kind(model_dir) == "int8"
        model: Callable = load_model(model_dir)
        frontier = _frontier_or_full_length(model_dir, model)
        if int8:
            from qala.quantize import CompiledQA

            model = CompiledQA(model, compile=compile)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        seq_length = int(frontier["max_seq_length"])
        configs = [tuple(int(n) for n in row["length_config"]) for row in frontier["frontier"]]
        # F1 is unknown (None) for the full-length point of a model without a frontier.
        f1 = {tuple(row["length_config"]): float(row["f1"] or "nan") for row in frontier["frontier"]}
        latency = _host_latencies(
            model,
            tokenizer,
            configs,
            seq_length,
            cache=model_dir / f"latency_{host_name()}.json",
            backend=("int8" if compile else "int8-eager") if int8 else "fp32",
            repeats=latency_repeats,
            remeasure=remeasure,
        )
        points = [FrontierPoint(c, f1[c], latency[c]) for c in configs]
        return cls(model, tokenizer, points, max_seq_length=seq_length, doc_stride=int(frontier.get("doc_stride", 128)))

    # ------------------------------------------------------------------ answering

    def answer(self, question: str, context: str, budget_ms: float | None = None) -> dict[str, Any]:
        """{answer, score, length_config, expected_ms, fits_budget, windows}; the answer is a span of context."""
        return self.answer_batch([question], [context], budget_ms=budget_ms)[0]

    def answer_batch(
        self, questions: Sequence[str], contexts: Sequence[str], budget_ms: float | None = None
    ) -> list[dict[str, Any]]:
        """Answers for question/context pairs, all windows in one forward pass at one configuration.

        `budget_ms` is for the whole call: the configuration is chosen for the total number of windows.
        """
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(questions)} questions and {len(contexts)} contexts")
        if not questions:
            return []
        examples = {
            "id": [str(i) for i in range(len(questions))],
            "question": list(questions),
            "context": list(contexts),
        }
        features = prepare_eval_features(
            examples,
            self.tokenizer,
            max_seq_length=self.max_seq_length,
            doc_stride=self.doc_stride,
            pad_to_max_length=True,
        )
        windows = len(features["input_ids"])
        point, fits = select_point(self.points, budget_ms, windows)
        expected = round(point.latency_ms * windows, 3)
        if not fits:
            message = (
                f"no frontier configuration fits {budget_ms} ms for {windows} window(s): using the fastest, "
                f"{list(point.length_config)}, expected {expected} ms"
            )
            warnings.warn(message, stacklevel=3)
            logger.warning(message)
        inputs = batch_inputs(features)
        with torch.no_grad():
            out = self.model(**inputs, length_config=list(point.length_config))
        scored = postprocess_with_scores(
            examples,
            features,
            out.start_logits.float().numpy(),
            out.end_logits.float().numpy(),
            n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
        )
        results = []
        for qid in examples["id"]:
            text, score = scored[qid]
            results.append(
                {
                    "answer": text,
                    "score": score if math.isfinite(score) else None,
                    "length_config": list(point.length_config),
                    "expected_ms": expected,
                    "fits_budget": fits,
                    "windows": windows,
                }
            )
        return results


def _frontier_or_full_length(model_dir: Path, model: Any) -> dict[str, Any]:
    """frontier.json of the model directory; without one (no search run yet), full length only, said once."""
    frontier_file = model_dir / FRONTIER_NAME
    if frontier_file.is_file():
        frontier = read_frontier(frontier_file)
        if not frontier["frontier"]:
            raise ValueError(f"{frontier_file} lists no configurations; run the search again")
        return frontier
    seq_length = model.qala_config.max_seq_length
    logger.warning(
        "%s has no %s: answering at full length (%d tokens per layer). `python -m qala.search RECIPE.yaml` "
        "with search.model=%s gives it configurations for latency budgets",
        model_dir,
        FRONTIER_NAME,
        seq_length,
        model_dir,
    )
    full = [seq_length] * model.num_layers
    return {"max_seq_length": seq_length, "frontier": [{"length_config": full, "f1": None}]}


def _host_latencies(
    model: Callable,
    tokenizer: Any,
    configs: Sequence[tuple[int, ...]],
    seq_length: int,
    *,
    cache: Path,
    backend: str,
    repeats: int,
    remeasure: bool,
) -> dict[tuple[int, ...], float]:
    """Median ms of one padded window per configuration, from the cache when it matches this setup."""
    key = {"host": host_name(), "backend": backend, "threads": torch.get_num_threads(), "batch_size": 1}
    if cache.is_file() and not remeasure:
        data = json.loads(cache.read_text())
        measured = {tuple(row["length_config"]): row["median_ms"] for row in data.get("configs", [])}
        if {k: data.get(k) for k in key} == key and all(c in measured for c in configs):
            return {c: measured[c] for c in configs}
    # A real question/context pair (not constant ids), padded like every served window.
    encoded = tokenizer(
        "what is measured here?",
        " ".join(["latency"] * seq_length),
        truncation="only_second",
        max_length=seq_length,
        padding="max_length",
        return_tensors="pt",
    )
    inputs = {k: v for k, v in encoded.items() if k in MODEL_INPUTS}
    logger.info("measuring %d frontier configurations on %s (%s)", len(configs), key["host"], backend)
    latency = {}
    with torch.no_grad():
        for config in configs:
            timing = median_latency_ms(lambda c=config: model(**inputs, length_config=list(c)), repeats=repeats)
            latency[config] = timing["median_ms"]
    try:
        atomic_write_json(
            cache, {**key, "configs": [{"length_config": list(c), "median_ms": ms} for c, ms in latency.items()]}
        )
    except OSError as e:  # a read-only model directory: measure again next time
        logger.warning("could not cache latencies in %s (%s)", cache, e)
    return latency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qala.answer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model directory with frontier.json (fp32 or INT8)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--context", required=True)
    parser.add_argument("--budget-ms", type=float, default=None, help="latency budget (default: most accurate)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--remeasure", action="store_true", help="ignore the cached latencies of this host")
    add_verbose(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: _answer(args))


def _answer(args) -> int:
    model = QalaModel.from_pretrained(args.model, threads=args.threads, remeasure=args.remeasure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the logger already reports a budget nothing fits
        result = model.answer(args.question, args.context, budget_ms=args.budget_ms)
    print(json.dumps({**result, "budget_ms": args.budget_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
