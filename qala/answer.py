"""Budget-aware question answering on real, unpadded inputs.

    python -m qala.answer --model DIR [--budget-ms 15] --question "..." (--context "..." | --context-file F)

prints one JSON object: the answer, its score (start + end logit), the configuration used and its
predicted time. A model directory (fp32, or an INT8 artifact) carries the frontier.json that
`python -m qala.search` installs there (without one, it answers at full length).

Windows are never padded beyond the longest window of a batch, and a configuration's cost depends
on the question: each configuration has a small cost model, ms = a + b*t + c*t^2 for a window of t
tokens, fitted at load from latencies measured on this host (cached beside the model as
latency_<host>.json and read back on the next load). A question's predicted time is the sum over
its windows; the most accurate configuration whose prediction fits the budget is used. A budget
that nothing fits gets the fastest configuration and a warning.
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

import numpy as np
import torch

from qala.cli import add_verbose, guarded, setup_logging
from qala.data import postprocess_with_scores, prepare_eval_features
from qala.evaluate import check_positive, predict_logits
from qala.model import MODEL_INPUTS, batch_inputs
from qala.quantize.engines import make_engine
from qala.quantize.load import load_model, load_tokenizer, model_kind
from qala.search import FRONTIER_NAME, read_frontier
from qala.utils import atomic_write_json, median_latency_ms, resolve_model_path

logger = logging.getLogger(__name__)

# Window lengths the cost models are fitted on (clipped to the model's max_seq_length).
CALIBRATION_LENGTHS = (32, 128, 256, 384)
# Windows per forward pass: bounds memory whatever the context length (a 100k-character context is
# ~100 windows; one batch of them took 2 GB).
MAX_BATCH_WINDOWS = 8
# Engine per model kind when none is asked for: "eager" starts answering at once. "compile-dynamic"
# runs INT8 faster but warms ~15 graphs at load (minutes on 2 cores): the choice of a long-lived
# server (QalaModel.from_pretrained(..., backend="compile-dynamic")), not of a one-shot CLI call.
DEFAULT_BACKEND = {"fp32": "eager", "int8": "eager"}
CACHE_FORMAT = 2


@dataclass(frozen=True)
class FrontierPoint:
    """One served configuration: its lengths, its F1 from the search, and its cost on this host.

    `keep_ratios` (qala's units) or `length_config` (absolute, paper mode) says what each layer keeps.
    `cost` = (a, b, c) of ms = a + b*t + c*t^2 per window of t tokens; without it, every window is
    assumed to take `latency_ms`.
    """

    length_config: tuple[int, ...] | None
    f1: float
    latency_ms: float
    keep_ratios: tuple[float, ...] | None = None
    cost: tuple[float, float, float] | None = None

    @property
    def name(self) -> list[float] | list[int] | None:
        return (
            list(self.keep_ratios)
            if self.keep_ratios is not None
            else (list(self.length_config) if self.length_config is not None else None)
        )

    def model_kwargs(self) -> dict[str, list]:
        if self.keep_ratios is not None:
            return {"keep_ratios": list(self.keep_ratios)}
        return {"length_config": list(self.length_config)} if self.length_config is not None else {}

    def expected_ms(self, windows: int | Sequence[int]) -> float:
        """Predicted ms for `windows` windows (a count) or windows of these token counts."""
        if isinstance(windows, int) or self.cost is None:
            count = windows if isinstance(windows, int) else len(windows)
            return self.latency_ms * count
        a, b, c = self.cost
        return float(sum(max(a + b * t + c * t * t, 0.0) for t in windows))


def select_point(
    points: Sequence[FrontierPoint], budget_ms: float | None, windows: int | Sequence[int] = 1
) -> tuple[FrontierPoint, bool]:
    """(the most accurate point whose predicted time fits the budget, whether it fits).

    `windows`: a count (each costs latency_ms) or the token counts of a question's windows (each costs
    the point's cost model at its length), so a short question can afford a slower configuration than
    a long one. No budget: the most accurate point. Nothing fits: the fastest, and False. Equal F1:
    the faster point.
    """
    if not points:
        raise ValueError("no frontier configurations to choose from")
    if budget_ms is None:
        return max(points, key=lambda p: (p.f1, -p.expected_ms(windows))), True
    fitting = [p for p in points if p.expected_ms(windows) <= budget_ms]
    if fitting:
        return max(fitting, key=lambda p: (p.f1, -p.expected_ms(windows))), True
    return min(points, key=lambda p: (p.expected_ms(windows), -p.f1)), False


def fit_cost_model(lengths: Sequence[int], ms: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of ms = a + b*t + c*t^2 (numpy.polyfit; fewer than 3 points: lower degree)."""
    degree = min(2, len(lengths) - 1)
    coefficients = np.polyfit(np.asarray(lengths, float), np.asarray(ms, float), degree)[::-1]
    a, b, c = (list(coefficients) + [0.0, 0.0])[:3]
    return float(a), float(b), float(c)


def host_name() -> str:
    """This host's name, safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


class QalaModel:
    """A length-adaptive QA model with its frontier: answers real questions within a latency budget."""

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
        max_batch_windows: int = MAX_BATCH_WINDOWS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.points = sorted(points, key=lambda p: p.latency_ms)
        self.max_seq_length = max_seq_length
        self.doc_stride = doc_stride
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.max_batch_windows = max_batch_windows

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        latency_repeats: int = 3,
        remeasure: bool = False,
        backend: str | None = None,
        compile: bool = True,
    ) -> QalaModel:
        """Load the model (fp32 or INT8), its tokenizer and frontier.json, the serving engine (`backend`,
        default DEFAULT_BACKEND by model kind; `compile=False` forces "eager"), warm every shape the
        engine needs so no request waits for a compile, and fit each configuration's cost model from
        latencies on this host (cached in latency_<host>.json; re-measured when the cache is for other
        threads, engine, lengths or configurations, or with `remeasure`)."""
        model_dir = Path(resolve_model_path(str(model_dir)))
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if threads:
            torch.set_num_threads(threads)
        kind = model_kind(model_dir)
        model = load_model(model_dir)
        frontier = _frontier_or_full_length(model_dir, model)
        backend = "eager" if not compile else (backend or DEFAULT_BACKEND[kind])
        engine = make_engine(model, backend)
        seq_length = int(frontier["max_seq_length"])
        lengths = sorted({min(n, seq_length) for n in CALIBRATION_LENGTHS})
        if hasattr(engine, "warmup"):
            engine.warmup(lengths=lengths)
        tokenizer = load_tokenizer(model_dir)
        points = [_point(row) for row in frontier["frontier"]]
        costs = _host_costs(
            engine,
            tokenizer,
            points,
            lengths,
            cache=model_dir / f"latency_{host_name()}.json",
            backend=f"{kind}:{backend}",
            repeats=latency_repeats,
            remeasure=remeasure,
        )
        points = [
            FrontierPoint(p.length_config, p.f1, _at(costs[_key(p)], seq_length), p.keep_ratios, costs[_key(p)])
            for p in points
        ]
        return cls(
            engine, tokenizer, points, max_seq_length=seq_length, doc_stride=int(frontier.get("doc_stride", 128))
        )

    # ------------------------------------------------------------------ answering

    def answer(self, question: str, context: str, budget_ms: float | None = None) -> dict[str, Any]:
        """{answer, score, configuration, expected_ms, fits_budget, windows}; the answer is a span of context."""
        return self.answer_batch([question], [context], budget_ms=budget_ms)[0]

    def answer_batch(
        self, questions: Sequence[str], contexts: Sequence[str], budget_ms: float | None = None
    ) -> list[dict[str, Any]]:
        """Answers for question/context pairs. `budget_ms` is per question: each gets the most accurate
        configuration whose predicted time for its own windows fits. Windows are unpadded and run in
        batches of at most max_batch_windows, each padded only to its longest window."""
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(questions)} questions and {len(contexts)} contexts")
        for i, (question, context) in enumerate(zip(questions, contexts, strict=True)):
            _check_text(question, f"question {i}")
            _check_text(context, f"context {i}")
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
            pad_to_max_length=False,
        )
        by_question: dict[str, list[int]] = {}
        for j, qid in enumerate(features["example_id"]):
            by_question.setdefault(qid, []).append(j)
        chosen: dict[str, tuple[FrontierPoint, bool, float]] = {}
        for qid, rows in by_question.items():
            tokens = [len(features["input_ids"][j]) for j in rows]
            point, fits = select_point(self.points, budget_ms, tokens)
            chosen[qid] = (point, fits, round(point.expected_ms(tokens), 3))
            if not fits:
                message = (
                    f"no frontier configuration fits {budget_ms} ms for {len(rows)} window(s): using the fastest, "
                    f"{point.name}, expected {chosen[qid][2]} ms"
                )
                warnings.warn(message, stacklevel=3)
                logger.warning(message)
        starts: list[np.ndarray] = [np.empty(0)] * len(features["input_ids"])
        ends: list[np.ndarray] = [np.empty(0)] * len(features["input_ids"])
        # One configuration per group of questions; within it, windows batched by length.
        groups: dict[FrontierPoint, list[int]] = {}
        for qid, rows in by_question.items():
            groups.setdefault(chosen[qid][0], []).extend(rows)
        for point, rows in groups.items():
            group = {k: [features[k][j] for j in rows] for k in MODEL_INPUTS if k in features}
            group_starts, group_ends = predict_logits(
                self.model, group, batch_size=self.max_batch_windows, progress=False, **point.model_kwargs()
            )
            for j, start_logits, end_logits in zip(rows, group_starts, group_ends, strict=True):
                starts[j], ends[j] = start_logits, end_logits
        scored = postprocess_with_scores(
            examples, features, starts, ends, n_best_size=self.n_best_size, max_answer_length=self.max_answer_length
        )
        results = []
        for qid in examples["id"]:
            text, score = scored[qid]
            point, fits, expected = chosen[qid]
            results.append(
                {
                    "answer": text,
                    "score": score if math.isfinite(score) else None,
                    "keep_ratios": list(point.keep_ratios) if point.keep_ratios is not None else None,
                    "length_config": list(point.length_config) if point.length_config is not None else None,
                    "expected_ms": expected,
                    "fits_budget": fits,
                    "windows": len(by_question[qid]),
                    "tokens": [len(features["input_ids"][j]) for j in by_question[qid]],
                }
            )
        return results


def _check_text(text: Any, what: str) -> None:
    """A question or context must be a string with something besides whitespace: a blank one has no answer."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a non-blank string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what}: {'empty' if not text else 'only whitespace'}; expected a non-blank string")


def _point(row: dict[str, Any]) -> FrontierPoint:
    """A frontier row (keep_ratios or length_config; F1 None for an unsearched full length) as a point."""
    ratios = row.get("keep_ratios")
    lengths = row.get("length_config")
    return FrontierPoint(
        tuple(int(n) for n in lengths) if lengths is not None else None,
        float(row["f1"]) if row.get("f1") is not None else float("nan"),
        0.0,
        tuple(float(r) for r in ratios) if ratios is not None else None,
    )


def _key(point: FrontierPoint) -> str:
    return json.dumps(point.model_kwargs(), sort_keys=True)


def _at(cost: tuple[float, float, float], t: int) -> float:
    a, b, c = cost
    return round(a + b * t + c * t * t, 3)


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
        "%s has no %s: answering at full length. `python -m qala.search RECIPE.yaml` "
        "with search.model=%s gives it configurations for latency budgets",
        model_dir,
        FRONTIER_NAME,
        model_dir,
    )
    return {"max_seq_length": seq_length, "frontier": [{"keep_ratios": [1.0] * model.num_layers, "f1": None}]}


def _host_costs(
    model: Callable,
    tokenizer: Any,
    points: Sequence[FrontierPoint],
    lengths: Sequence[int],
    *,
    cache: Path,
    backend: str,
    repeats: int,
    remeasure: bool,
) -> dict[str, tuple[float, float, float]]:
    """Each point's cost model (a, b, c), from the cache when it matches this setup, else measured:
    median ms of one unpadded window of each calibration length, batch 1, fitted by fit_cost_model."""
    key = {
        "format": CACHE_FORMAT,
        "host": host_name(),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "lengths": list(lengths),
    }
    wanted = [_key(p) for p in points]
    if cache.is_file() and not remeasure:
        try:
            data = json.loads(cache.read_text())
            measured = {row["config"]: tuple(row["cost"]) for row in data.get("configs", [])}
            if {k: data.get(k) for k in key} == key and all(k in measured for k in wanted):
                return {k: measured[k] for k in wanted}
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring unreadable latency cache %s (%s)", cache, e)
    logger.info("measuring %d configurations at %s tokens on %s (%s)", len(points), list(lengths), key["host"], backend)
    windows = {t: _window(tokenizer, t) for t in lengths}
    rows, costs = [], {}
    with torch.no_grad():
        for point, k in zip(points, wanted, strict=True):
            kwargs = point.model_kwargs()
            ms = [
                median_latency_ms(lambda w=windows[t], kw=kwargs: model(**w, **kw), repeats=repeats)["median_ms"]
                for t in lengths
            ]
            costs[k] = fit_cost_model(lengths, ms)
            rows.append({"config": k, "cost": list(costs[k]), "ms": dict(zip(map(str, lengths), ms, strict=True))})
    try:
        atomic_write_json(cache, {**key, "configs": rows})
    except OSError as e:  # a read-only model directory: measure again next time
        logger.warning("could not cache latencies in %s (%s)", cache, e)
    return costs


def _window(tokenizer: Any, tokens: int) -> dict[str, torch.Tensor]:
    """A real question/context pair tokenized to exactly `tokens` positions, unpadded (as served)."""
    encoded = tokenizer(
        "what is measured here?",
        " ".join(["latency"] * tokens),
        truncation="only_second",
        max_length=tokens,
        return_tensors="pt",
    )
    return batch_inputs(encoded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qala.answer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model directory with frontier.json (fp32 or INT8)")
    parser.add_argument("--question", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", help="the passage to answer from")
    source.add_argument("--context-file", help="read the passage from this UTF-8 text file (any length)")
    parser.add_argument("--budget-ms", type=float, default=None, help="latency budget (default: most accurate)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--remeasure", action="store_true", help="ignore the cached latencies of this host")
    parser.add_argument(
        "--backend",
        default=None,
        help=f"serving engine (qala.quantize.engines); default by model kind: {DEFAULT_BACKEND}",
    )
    add_verbose(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: _answer(args))


def _answer(args) -> int:
    # Every input is checked before the model loads (and may measure latencies): a bad one fails at once.
    check_positive(threads=args.threads, budget_ms=args.budget_ms)
    context = args.context
    if args.context_file:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--context-file {args.context_file}: not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise OSError(f"--context-file {args.context_file}: cannot read it ({e.strerror or e})") from None
    _check_text(args.question, "--question")
    _check_text(context, "--context-file" if args.context_file else "--context")
    model = QalaModel.from_pretrained(args.model, threads=args.threads, remeasure=args.remeasure, backend=args.backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the logger already reports a budget nothing fits
        result = model.answer(args.question, context, budget_ms=args.budget_ms)
    print(json.dumps({**result, "budget_ms": args.budget_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
