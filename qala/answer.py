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

The serving engine (qala.quantize.engines) is the fastest one measured on this host:

    python -m qala.answer --model DIR --calibrate

times every engine of CALIBRATION_ENGINES on the model's configurations (one that cannot serve this model,
e.g. onnxruntime-inc on a dynamic INT8 artifact, is skipped with its reason) and records each, and which was
fastest, in latency_<host>.json; later loads serve that engine (`--engine NAME` or
QalaModel.from_pretrained(dir, engine=NAME) serves another). Before any calibration: DEFAULT_ENGINE.
Compiled or exported artifacts go to DIR/.engines/<content hash>/ (a hidden folder: not model content);
onnxruntime-inc's QDQ graphs to DIR/.engines/inc-<hash of the artifact's content and the engine code>/, so a
cold start with them cached never rebuilds the INT8 artifact (qala.quantize.qdq.QdqCache).

An engine that quantizes on its own with NNCF ("openvino-int8") calibrates on CALIBRATION_WINDOWS training
windows: of `--calibration-data` (calibration_data=; a SQuAD-format JSON file or a datasets hub name), else
of the training file named by the model's own recipe.yaml. Its quantized graphs are saved in the engine
folder under a name keyed by that source (path and content hash, or hub name), so a later load reads them
back; QalaModel.calibration (and the service's /healthz) says which source it was.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qala.cli import add_verbose, guarded, setup_logging
from qala.data import postprocess_with_scores, prepare_eval_features
from qala.evaluate import check_engine, check_positive, predict_logits
from qala.lengths import config_json, config_kwargs
from qala.model import MODEL_INPUTS, batch_inputs
from qala.quantize.engines import BACKENDS, length_batches, make_engine, warm_for_serving
from qala.quantize.load import artifact_configs, load_model, load_tokenizer, model_kind
from qala.recipe import changed_keys
from qala.search import FRONTIER_NAME, read_frontier
from qala.utils import (
    IntegrityError,
    atomic_write_json,
    code_digest,
    content_hash,
    median_latency_ms,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

# Window lengths the cost models are fitted on (clipped to the model's max_seq_length).
CALIBRATION_LENGTHS = (32, 128, 256, 384)
# Windows per forward pass: bounds memory whatever the context length (a 100k-character context is
# ~100 windows; one batch of them took 2 GB).
MAX_BATCH_WINDOWS = 8
# The engine served before a calibration has recorded a faster one: it starts answering at once.
DEFAULT_ENGINE = "eager"
# Engines a calibration compares, by model kind: those that compute what the frontier was searched on (an
# fp32 model's fp32 arithmetic; an INT8 artifact's INC units: onnxruntime-inc runs INC's own scales and fp32
# units as static QDQ, logits equal to eager's to float rounding). Engines that re-quantize on their own
# (onnxruntime-int8, openvino-int8) give other answers: served only when named. openvino-inc runs full length
# only (a frontier's keep configurations would be refused). "compile-dynamic" warms ~15 graphs at every load
# (minutes on 2 cores; Inductor's on-disk cache shortens later loads).
CALIBRATION_ENGINES = {
    "fp32": ("eager", "compile-dynamic", "onnxruntime", "openvino"),
    "int8": ("eager", "compile-dynamic", "onnxruntime-inc"),
}
# Engines that quantize on calibration windows of training data (NNCF post-training INT8), and how many
# windows: as many as the benchmark's OpenVINO INT8 rows calibrate on (qala.bench.plan.CALIBRATION_WINDOWS),
# so the engine served is the one measured. (onnxruntime-int8 quantizes dynamically: it needs no data.)
CALIBRATED_ENGINES = ("openvino-int8",)
CALIBRATION_WINDOWS = 300
# Exported and compiled engine artifacts, inside the model directory; hidden, so not part of its content hash.
ENGINE_DIR = ".engines"
CACHE_FORMAT = 3
# Timings are for the code that ran: a change to the model's forward or an engine (new graph code, a new
# ONNX Runtime) makes them stale. Before this key, latency_<host>.json kept predicting the old graphs'
# times until --remeasure. Hashed: these sources and the engine libraries' versions.
ENGINE_SOURCES = ("model.py", "lengths.py", "quantize/*.py")
ENGINE_LIBRARIES = ("torch", "onnxruntime", "openvino")
# English function words. A question whose other words are all [UNK] (the words that say what is asked)
# gives the model nothing to match in the context: it would still return a confident span.
FUNCTION_WORDS = frozenset(
    "a an the is are was were be been being do does did has have had what who whom whose which when where why "
    "how of in on at to for from by with about as and or not it its this that these those there".split()
)


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
        return next(iter(self.model_kwargs().values()), None)

    def model_kwargs(self) -> dict[str, list]:
        return config_kwargs(self.keep_ratios, self.length_config)

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


def select_batch_point(
    points: Sequence[FrontierPoint],
    batch_budget_ms: float,
    windows: Sequence[Sequence[int]],
    budget_ms: float | None = None,
) -> tuple[FrontierPoint, bool]:
    """(the most accurate point whose predicted time for all questions' windows together fits
    `batch_budget_ms` and, with `budget_ms`, each question's own windows fit it; whether it fits).

    One point for a whole call: select_point per question gives questions of different lengths
    different points (a long one a cheaper point), and each point's windows are forward passes of their
    own, so a server's batch of 8 became several smaller passes, slower than the one it budgeted for.
    `windows`: each question's window token counts. Nothing fits: the fastest for the call, and False.
    """
    if not points:
        raise ValueError("no frontier configurations to choose from")
    every = [t for tokens in windows for t in tokens]
    batch_ms = {p: p.expected_ms(every) for p in points}  # each point's prediction for the whole call, once

    def fits(p: FrontierPoint) -> bool:
        if batch_ms[p] > batch_budget_ms:
            return False
        return budget_ms is None or all(p.expected_ms(list(tokens)) <= budget_ms for tokens in windows)

    fitting = [p for p in points if fits(p)]
    if fitting:
        return max(fitting, key=lambda p: (p.f1, -batch_ms[p])), True
    return min(points, key=lambda p: (batch_ms[p], -p.f1)), False


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
        engine: str | None = None,
        grid_ms: float | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.engine = engine or getattr(model, "name", None)
        # Where an engine that quantizes on its own took its calibration windows (None: it needs none).
        self.calibration = calibration
        # Summed median ms of every configuration at every calibration length on this host (None: not timed).
        self.grid_ms = grid_ms
        self.tokenizer = tokenizer
        # answer_batch may run in several threads at once (qala.serve --concurrent-batches): transformers sets
        # truncation/padding on the fast tokenizer's shared Rust object per call, and a thread doing so while
        # another encodes fails with "Already borrowed" (huggingface/tokenizers#537, transformers#47085).
        # One thread tokenizes at a time (a small share of a request's time).
        self._tokenizer_lock = threading.Lock()
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
        engine: str | None = None,
        threads: int | None = None,
        latency_repeats: int = 3,
        remeasure: bool = False,
        backend: str | None = None,
        compile: bool = True,
        calibration_data: str | Path | None = None,
        warm: bool = True,
    ) -> QalaModel:
        """Load the model (fp32 or INT8), its tokenizer and frontier.json, and the serving engine: `engine`
        by name (`backend` is its older alias; `compile=False` forces "eager"), or None: the engine recorded
        as fastest on this host by a calibration (QalaModel.calibrate), else DEFAULT_ENGINE. The engine is
        warmed for every shape and configuration it serves, so no request waits for a compile; `warm=False`
        builds a shape on its first call instead (the one-shot CLI: one question needs one or two of the 48
        OpenVINO graphs, and warming them all took 6.9 s of a 13.3 s cold start, cached, on Zen 5). Each
        configuration's cost model comes from latencies on this host, per engine (cached in
        latency_<host>.json; measured when the cache is for other weights, threads or lengths, lacks this
        engine or a configuration, or with `remeasure`). An engine of CALIBRATED_ENGINES calibrates on
        `calibration_data` (a SQuAD-format JSON file or a datasets hub name), else on the training file of
        the model's recipe.yaml (see calibration_source); its quantized graphs are cached in ENGINE_DIR."""
        if engine is not None and backend is not None and engine != backend:
            raise ValueError(f"engine={engine!r} and backend={backend!r}: backend is engine's alias, pass one")
        engine = engine if engine is not None else backend
        if engine is not None and engine not in BACKENDS:
            raise ValueError(f"unknown serving engine {engine!r}; choose one of {sorted(BACKENDS)}")
        model_dir = Path(resolve_model_path(str(model_dir)))
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        # Before the model loads: a missing calibration source fails at once.
        calibration = calibration_source(model_dir, engine if compile else "eager", calibration_data)
        if threads:
            torch.set_num_threads(threads)
        kind = model_kind(model_dir)
        # An INT8 artifact is rebuilt (PT2E replayed: most of its cold start) only for an engine that needs it:
        # onnxruntime-inc serves the QDQ graphs cached by the artifact's content (qala.quantize.qdq).
        model = functools.cache(functools.partial(load_model, model_dir))
        configs = artifact_configs(model_dir) if kind == "int8" else model()
        model_hash = content_hash(model_dir)  # frontier.json and the latency cache must be of these weights
        frontier = _frontier_or_full_length(model_dir, configs, model_hash)
        seq_length = int(frontier["max_seq_length"])
        lengths = sorted({min(n, seq_length) for n in CALIBRATION_LENGTHS})
        tokenizer = load_tokenizer(model_dir)
        points = [_point(row) for row in frontier["frontier"]]
        wanted = [_key(p) for p in points]
        cache = LatencyCache(model_dir / f"latency_{host_name()}.json", model_hash, lengths)
        engine = "eager" if not compile else engine if engine is not None else _fastest_engine(cache, kind, wanted)
        options = _engine_options(engine, model_dir, seq_length)
        if calibration is not None:
            doc_stride = int(frontier.get("doc_stride", 128))
            options.update(_calibration_options(calibration, tokenizer, seq_length, doc_stride, model_hash))
        # The -inc engines serve their QDQ graphs from a cache keyed by the directory: no PT2E replay on a cold start.
        served = make_engine(model_dir if engine.endswith("-inc") else model(), engine, **options)
        if warm:
            warm_for_serving(
                served, lengths=lengths, max_batch=MAX_BATCH_WINDOWS, configs=[p.model_kwargs() for p in points]
            )
        costs = None if remeasure else cache.costs(engine, wanted)
        if costs is None:
            costs = cache.measure(engine, served, tokenizer, points, kind=kind, repeats=latency_repeats)
        points = [
            FrontierPoint(p.length_config, p.f1, _at(costs[_key(p)], seq_length), p.keep_ratios, costs[_key(p)])
            for p in points
        ]
        return cls(
            served,
            tokenizer,
            points,
            max_seq_length=seq_length,
            doc_stride=int(frontier.get("doc_stride", 128)),
            engine=engine,
            grid_ms=cache.grid_ms(engine, wanted),
            calibration=None if calibration is None else {**calibration, "max_windows": CALIBRATION_WINDOWS},
        )

    @classmethod
    def calibrate(
        cls,
        model_dir: str | Path,
        *,
        engines: Sequence[str] | None = None,
        threads: int | None = None,
        latency_repeats: int = 3,
        calibration_data: str | Path | None = None,
    ) -> dict[str, Any]:
        """Time every engine of `engines` (default: CALIBRATION_ENGINES of the model's kind that are installed)
        on this host, each recorded in latency_<host>.json: later loads without an engine serve the fastest.
        `calibration_data` goes to the engines of CALIBRATED_ENGINES (see from_pretrained).
        Returns {"fastest": name, "engines": {name: ms of the timing grid, or why it did not run}}."""
        kind = model_kind(resolve_model_path(str(model_dir)))
        names = list(engines) if engines is not None else [e for e in CALIBRATION_ENGINES[kind] if _installed(e)]
        report: dict[str, Any] = {}
        for name in names:
            try:
                served = cls.from_pretrained(
                    model_dir,
                    engine=name,
                    threads=threads,
                    latency_repeats=latency_repeats,
                    remeasure=True,
                    calibration_data=calibration_data if name in CALIBRATED_ENGINES else None,
                )
            except (ImportError, ValueError) as e:  # an engine missing here, or refusing this model (one line)
                logger.warning("engine %s not calibrated: %s", name, e)
                report[name] = f"not run: {e}"
                continue
            except Exception as e:  # failed to build, warm or time (ONNX Runtime's errors are not RuntimeErrors)
                # One engine's failure must not cost the others' timings: skipped, with the traceback in the log.
                logger.warning("engine %s not calibrated: %s: %s", name, type(e).__name__, e, exc_info=True)
                report[name] = f"not run: {type(e).__name__}: {e}"
                continue
            report[name] = served.grid_ms
        timed = {n: ms for n, ms in report.items() if isinstance(ms, float) and n in CALIBRATION_ENGINES[kind]}
        return {"fastest": min(timed, key=timed.get) if timed else None, "engines": report}

    # ------------------------------------------------------------------ answering

    def answer(self, question: str, context: str, budget_ms: float | None = None) -> dict[str, Any]:
        """{answer, score, configuration, expected_ms, fits_budget, windows}; the answer is a span of context."""
        return self.answer_batch([question], [context], budget_ms=budget_ms)[0]

    def _choose_points(
        self, tokens_of: dict[str, list[int]], budget_ms: float | None, batch_budget_ms: float | None
    ) -> dict[str, tuple[FrontierPoint, bool, float]]:
        """Per question id: (its frontier point, whether it fits, its expected ms), see answer_batch; a budget
        nothing fits gets the fastest point, a warning and a log line."""
        chosen: dict[str, tuple[FrontierPoint, bool, float]] = {}
        misses: list[str] = []
        if batch_budget_ms is not None:
            point, fits = select_batch_point(self.points, batch_budget_ms, list(tokens_of.values()), budget_ms)
            for qid, tokens in tokens_of.items():
                chosen[qid] = (point, fits, round(point.expected_ms(tokens), 3))
            if not fits:
                windows = sum(len(tokens) for tokens in tokens_of.values())
                misses.append(
                    f"no frontier configuration fits {batch_budget_ms:.3f} ms for {len(tokens_of)} question(s), "
                    f"{windows} window(s): using the fastest, {point.name}"
                )
        else:
            for qid, tokens in tokens_of.items():
                point, fits = select_point(self.points, budget_ms, tokens)
                chosen[qid] = (point, fits, round(point.expected_ms(tokens), 3))
                if not fits:
                    misses.append(
                        f"no frontier configuration fits {budget_ms} ms for {len(tokens)} window(s): using the "
                        f"fastest, {point.name}, expected {chosen[qid][2]} ms"
                    )
        for message in misses:
            warnings.warn(message, stacklevel=4)  # the user's line when called through answer()
            logger.warning(message)
        return chosen

    def _logits(
        self, features: dict[str, list[Any]], groups: dict[FrontierPoint, list[int]]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits of every window: each group's windows run at its configuration, batched by length
        (length_batches, at most max_batch_windows a call)."""
        starts: list[np.ndarray] = [np.empty(0)] * len(features["input_ids"])
        ends: list[np.ndarray] = [np.empty(0)] * len(features["input_ids"])
        for point, rows in groups.items():
            lengths = [len(features["input_ids"][j]) for j in rows]
            for batch in length_batches(lengths, self.max_batch_windows):
                chosen_rows = [rows[b] for b in batch]
                group = {k: [features[k][j] for j in chosen_rows] for k in MODEL_INPUTS if k in features}
                group_starts, group_ends = predict_logits(
                    self.model, group, batch_size=len(batch), progress=False, **point.model_kwargs()
                )
                for j, start_logits, end_logits in zip(chosen_rows, group_starts, group_ends, strict=True):
                    starts[j], ends[j] = start_logits, end_logits
        return starts, ends

    def answer_batch(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        budget_ms: float | None = None,
        *,
        batch_budget_ms: float | None = None,
    ) -> list[dict[str, Any]]:
        """Answers for question/context pairs. `budget_ms` is per question: each gets the most accurate
        configuration whose predicted time for its own windows fits. `batch_budget_ms`: instead, one
        configuration for every question, the most accurate whose predicted time for all the windows fits
        it (and each question's budget_ms, if given; select_batch_point), so the call runs one
        configuration's forward passes (qala.serve's batches); fits_budget then says whether that fit.
        Windows are unpadded; a configuration's windows are sorted by length and grouped per 32 tokens
        (qala.quantize.engines.length_batches), so a call of at most max_batch_windows windows pads each by
        fewer than 32 positions."""
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(questions)} questions and {len(contexts)} contexts")
        for i, (question, context) in enumerate(zip(questions, contexts, strict=True)):
            # Named 1-based, "question #1", as the windows' ids below: "question 0" read as a count on the CLI.
            _check_text(question, f"question #{i + 1}")
            _check_text(context, f"context #{i + 1}")
        if not questions:
            return []
        examples = {
            "id": [f"#{i + 1}" for i in range(len(questions))],
            "question": list(questions),
            "context": list(contexts),
        }
        with self._tokenizer_lock:
            features = prepare_eval_features(
                examples,
                self.tokenizer,
                max_seq_length=self.max_seq_length,
                doc_stride=self.doc_stride,
                pad_to_max_length=False,
            )
            flags = [unreadable(self.tokenizer, question) for question in questions]
        by_question: dict[str, list[int]] = {}
        for j, qid in enumerate(features["example_id"]):
            by_question.setdefault(qid, []).append(j)
        tokens_of = {qid: [len(features["input_ids"][j]) for j in rows] for qid, rows in by_question.items()}
        chosen = self._choose_points(tokens_of, budget_ms, batch_budget_ms)
        groups: dict[FrontierPoint, list[int]] = {}  # the windows of each chosen configuration
        for qid, rows in by_question.items():
            groups.setdefault(chosen[qid][0], []).extend(rows)
        starts, ends = self._logits(features, groups)
        scored = postprocess_with_scores(
            examples, features, starts, ends, n_best_size=self.n_best_size, max_answer_length=self.max_answer_length
        )
        results = []
        for qid, flag in zip(examples["id"], flags, strict=True):
            text, score = scored[qid]
            point, fits, expected = chosen[qid]
            if flag is not None:  # no span is an answer to a question the model cannot read
                text, score = "", math.nan
            results.append(
                {
                    "answer": text,
                    "score": score if math.isfinite(score) else None,
                    "flag": flag,
                    **config_json(point.keep_ratios, point.length_config),
                    "expected_ms": expected,
                    "fits_budget": fits,
                    "windows": len(by_question[qid]),
                    "tokens": [len(features["input_ids"][j]) for j in by_question[qid]],
                }
            )
        return results


def unreadable(tokenizer: Any, question: str) -> str | None:
    """Why the model cannot read `question`, or None: all its words are [UNK], or all but function words
    (FUNCTION_WORDS) are. A word is [UNK] when every token it splits into is the tokenizer's unknown token
    (a script or language the vocabulary does not cover); punctuation does not count as a word."""
    unk = tokenizer.unk_token_id
    if unk is None:  # byte-level vocabularies (RoBERTa's) read any text
        return None
    encoded = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = encoded["input_ids"]
    word_ids = encoded.word_ids() if tokenizer.is_fast else list(range(len(ids)))
    words: dict[int, tuple[list[int], str]] = {}
    for token, word, (start, end) in zip(ids, word_ids, encoded["offset_mapping"], strict=True):
        tokens, text = words.get(word, ([], ""))
        words[word] = ([*tokens, token], text + question[start:end])
    real = {w: (tokens, text) for w, (tokens, text) in words.items() if any(c.isalnum() for c in text)}
    unknown = {w for w, (tokens, _) in real.items() if all(t == unk for t in tokens)}
    content = {w for w, (_, text) in real.items() if text.lower() not in FUNCTION_WORDS}
    if not unknown or (unknown != set(real) and not content <= unknown):
        return None
    return (
        f"the model cannot read the question: {len(unknown)} of its {len(real)} words are unknown to its vocabulary "
        f"([UNK]){'' if unknown == set(real) else ', and the others are function words'} (a language or script it "
        "was not trained on?); no answer given"
    )


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


def _frontier_or_full_length(model_dir: Path, model: Any, model_hash: str) -> dict[str, Any]:
    """frontier.json of the model directory; without one (no search run yet), full length only, said once.

    A frontier searched on other weights (a model retrained or replaced in place) is refused: its
    configurations and F1 figures are another model's. One that does not record its model is used with a
    warning."""
    frontier_file = model_dir / FRONTIER_NAME
    if frontier_file.is_file():
        frontier = read_frontier(frontier_file)
        if not frontier["frontier"]:
            raise ValueError(f"{frontier_file} lists no configurations; run the search again")
        searched = ((frontier.get("search") or {}).get("inputs") or {}).get("model")
        if searched is None:
            logger.warning("%s does not record the model it was searched on: not checked against it", frontier_file)
        elif searched != model_hash:
            raise IntegrityError(
                f"{frontier_file}: searched on another model (content {searched}, this model's is {model_hash}: "
                "retrained or replaced since); run qala.search on this model again, or delete the file to answer "
                "at full length"
            )
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


def _fastest_engine(cache: LatencyCache, kind: str, wanted: Sequence[Any]) -> str:
    """The engine a calibration measured fastest on this host for these configurations, else DEFAULT_ENGINE."""
    fastest = cache.fastest([e for e in CALIBRATION_ENGINES[kind] if _installed(e)], wanted)
    engine = fastest or DEFAULT_ENGINE
    logger.info("serving engine %s (%s)", engine, "the fastest measured on this host" if fastest else "default")
    return engine


def engine_code() -> str:
    """A short hash of what an engine runs here: qala's model and engine sources and the engine libraries'
    versions (a library not installed counts as absent)."""
    return code_digest(ENGINE_SOURCES, ENGINE_LIBRARIES)[:16]


class LatencyCache:
    """latency_<host>.json beside the model: per engine, each configuration's cost model on this host.

    {format, host, model, threads, lengths, code, engines: {name: {configs: [{config, cost, ms}]}}, fastest}. All
    of it is for one setup (these weights, this thread count, these calibration lengths, this engine code:
    engine_code): a file for another setup
    is ignored and rewritten by the next measurement. Engines are compared by their grid: the summed median
    ms of the served configurations at every calibration length (batch 1, unpadded windows). A file that
    lists one engine at the top level (`backend` "kind:name", `configs`) is read as that engine's entry.
    """

    def __init__(self, path: Path, model_hash: str, lengths: Sequence[int]) -> None:
        self.path = path
        self.setup = {
            "format": CACHE_FORMAT,
            "host": host_name(),
            "model": model_hash,
            "threads": torch.get_num_threads(),
            "lengths": list(lengths),
            "code": engine_code(),
        }
        self.engines: dict[str, list[dict[str, Any]]] = self._read()

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            stale = changed_keys({k: data.get(k) for k in self.setup}, self.setup)
            if stale:
                logger.info("%s is for another setup (%s): measuring again", self.path, "; ".join(stale))
                return {}
            engines = {str(name): list(entry["configs"]) for name, entry in (data.get("engines") or {}).items()}
            if data.get("backend") and "configs" in data:
                engines.setdefault(str(data["backend"]).split(":")[-1], list(data["configs"]))
            for rows in engines.values():
                for row in rows:
                    row["cost"] = tuple(float(v) for v in row["cost"])
            return engines
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("ignoring unreadable latency cache %s (%s)", self.path, e)
            return {}

    def costs(self, engine: str, wanted: Sequence[str]) -> dict[str, tuple[float, float, float]] | None:
        """The cost model of each wanted configuration under `engine`, or None when one is not recorded."""
        measured = {row["config"]: row["cost"] for row in self.engines.get(engine, [])}
        if all(k in measured for k in wanted):
            return {k: measured[k] for k in wanted}
        if self.engines:
            logger.info("%s has no costs of engine %s for these configurations: measuring", self.path, engine)
        return None

    def grid_ms(self, engine: str, wanted: Sequence[str]) -> float | None:
        """The engine's summed ms over the wanted configurations and the calibration lengths (None: not timed)."""
        rows = {row["config"]: row.get("ms") for row in self.engines.get(engine, [])}
        if not all(rows.get(k) for k in wanted):
            return None
        return round(sum(float(ms) for k in wanted for ms in rows[k].values()), 3)

    def fastest(self, among: Sequence[str], wanted: Sequence[str]) -> str | None:
        """The engine of `among` with the smallest grid over `wanted` (None: none of them timed)."""
        timed = {name: self.grid_ms(name, wanted) for name in among if name in self.engines}
        timed = {name: ms for name, ms in timed.items() if ms is not None}
        return min(timed, key=timed.get) if timed else None

    def measure(
        self,
        engine: str,
        model: Callable,
        tokenizer: Any,
        points: Sequence[FrontierPoint],
        *,
        kind: str,
        repeats: int,
    ) -> dict[str, tuple[float, float, float]]:
        """Each point's cost model (a, b, c) under `engine`: median ms of one unpadded window of each calibration
        length, batch 1, fitted by fit_cost_model; recorded in the file (the fastest engine of `kind` with it)."""
        lengths = self.setup["lengths"]
        logger.info(
            "measuring %d configurations at %s tokens on %s (%s)", len(points), lengths, self.setup["host"], engine
        )
        windows = {t: _window(tokenizer, t) for t in lengths}
        rows, costs = [], {}
        with torch.no_grad():
            for point in points:
                k, kwargs = _key(point), point.model_kwargs()
                ms = [
                    median_latency_ms(lambda w=windows[t], kw=kwargs: model(**w, **kw), repeats=repeats)["median_ms"]
                    for t in lengths
                ]
                costs[k] = fit_cost_model(lengths, ms)
                rows.append({"config": k, "cost": costs[k], "ms": dict(zip(map(str, lengths), ms, strict=True))})
        self.engines[engine] = rows
        wanted = [_key(p) for p in points]
        document = {
            **self.setup,
            "engines": {
                name: {"configs": [{**r, "cost": list(r["cost"])} for r in rs]} for name, rs in self.engines.items()
            },
            "fastest": self.fastest(CALIBRATION_ENGINES[kind], wanted),
        }
        try:
            atomic_write_json(self.path, document)
        except OSError as e:  # a read-only model directory: measure again next time
            logger.warning("could not cache latencies in %s (%s)", self.path, e)
        return costs


def _installed(engine: str) -> bool:
    """Whether the libraries of `engine` are importable here (onnxruntime*, openvino*; torch engines always)."""
    import importlib.util

    needed = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
    for prefix, modules in needed.items():
        if engine.startswith(prefix):
            return all(importlib.util.find_spec(m) is not None for m in modules)
    return True


def _engine_options(engine: str, model_dir: Path, seq_length: int) -> dict[str, Any]:
    """make_engine's options when serving from `model_dir`: exported/compiled artifacts in its ENGINE_DIR (a
    temporary folder when the directory is read-only), windows up to seq_length."""
    if not engine.startswith(("onnxruntime", "openvino")):
        return {}
    workdir: Path | None = model_dir / ENGINE_DIR
    try:
        workdir.mkdir(exist_ok=True)
    except OSError:
        workdir = None  # the engine makes a temporary folder
    options: dict[str, Any] = {"workdir": workdir, "threads": torch.get_num_threads()}
    if engine.startswith("openvino"):
        options["max_seq_length"] = seq_length
    return options


def calibration_source(
    model_dir: str | Path, engine: str | None, calibration_data: str | Path | None = None
) -> dict[str, Any] | None:
    """Where `engine` takes its calibration windows when serving from `model_dir`: None for an engine that
    needs none (not in CALIBRATED_ENGINES), else {"data": the absolute file (with "sha256", 16 hex digits of
    its content) or hub name (with "split"), "from": "calibration_data" or "recipe.yaml data.train"}: of
    `calibration_data` when given, else of the training file named by model_dir/recipe.yaml (as qala.train
    writes it beside every model) when that file exists here. Nothing is loaded; a missing source, or
    calibration data for an engine that does not use it, raises a one-line ValueError."""
    model_dir = Path(model_dir)
    if engine not in CALIBRATED_ENGINES:
        if calibration_data is not None:
            named = f"engine {engine!r}" if engine else "the default engine (never one that re-quantizes)"
            raise ValueError(
                f"calibration data ({calibration_data}) is only used by {', '.join(map(repr, CALIBRATED_ENGINES))}, "
                f"which quantize on it; {named} needs none"
            )
        return None
    if calibration_data is not None:
        return _data_source(str(calibration_data), "calibration_data")
    recipe_file = model_dir / "recipe.yaml"
    train = _recipe_train(recipe_file)
    hint = (
        f"pass --calibration-data (calibration_data=): a SQuAD-format JSON file or a datasets hub name of "
        f"training questions, of which the first {CALIBRATION_WINDOWS} windows calibrate the INT8 quantization"
    )
    if train is None:
        raise ValueError(
            f"engine {engine!r} quantizes with NNCF on training windows and {recipe_file} names none: {hint}"
        )
    path = Path(resolve_model_path(train))
    if not path.is_file():
        raise ValueError(
            f"engine {engine!r} quantizes with NNCF on training windows and the training data of {recipe_file} "
            f"({train}) is no file here: {hint}"
        )
    return _data_source(str(path), "recipe.yaml data.train")


def _recipe_train(recipe_file: Path) -> str | None:
    """data.train of a model's recipe.yaml (None: no readable recipe, or no training data in it)."""
    import yaml

    try:
        recipe = yaml.safe_load(recipe_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    data = recipe.get("data") if isinstance(recipe, dict) else None
    train = data.get("train") if isinstance(data, dict) else None
    return str(train) if isinstance(train, str) and train.strip() else None


def _data_source(data: str, origin: str) -> dict[str, Any]:
    """A calibration source as recorded and keyed: a local file by absolute path and content, else a hub name."""
    path = Path(resolve_model_path(data))
    if path.is_file():
        return {"data": str(path.resolve()), "sha256": content_hash(path), "from": origin}
    if data.endswith(".json"):
        raise ValueError(f"calibration data {data}: no such file (a SQuAD-format JSON file or a datasets hub name)")
    return {"data": data, "split": "train", "from": origin}


def _calibration_options(
    source: dict[str, Any], tokenizer: Any, seq_length: int, doc_stride: int, model_hash: str
) -> dict[str, Any]:
    """make_engine's calibration options: the windows, built only when a graph is quantized (not when the
    quantized graphs are read back), and the key their quantized graphs are saved under: the source's
    content, how it is windowed, and the model directory's content (its tokenizer makes the windows)."""
    from qala.data import calibration_windows

    def windows() -> list[dict[str, Any]]:
        logger.info("calibration windows: the first %d of %s", CALIBRATION_WINDOWS, source["data"])
        return calibration_windows(
            source["data"],
            tokenizer,
            count=CALIBRATION_WINDOWS,
            max_seq_length=seq_length,
            doc_stride=doc_stride,
            split=source.get("split", "train"),
            skip_invalid=True,  # representative windows are enough: a malformed question is left out
        )

    key = {k: v for k, v in source.items() if k != "from"}
    key.update(windows=CALIBRATION_WINDOWS, max_seq_length=seq_length, doc_stride=doc_stride, model=model_hash)
    return {"calibration": windows, "calibration_key": key}


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
    parser.add_argument("--question", help="the question (required unless --calibrate)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--context", help="the passage to answer from")
    source.add_argument("--context-file", help="read the passage from this UTF-8 text file (any length)")
    parser.add_argument("--budget-ms", type=float, default=None, help="latency budget (default: most accurate)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--remeasure", action="store_true", help="ignore the cached latencies of this host")
    parser.add_argument(
        "--engine",
        default=None,
        help="serving engine (qala.quantize.engines); default: the fastest recorded by --calibrate on this host, "
        f"else {DEFAULT_ENGINE!r}",
    )
    parser.add_argument("--backend", default=None, help="older name of --engine")
    parser.add_argument(
        "--calibration-data",
        default=None,
        help=f"training questions (SQuAD-format JSON or a datasets hub name) whose first {CALIBRATION_WINDOWS} "
        f"windows calibrate an engine that quantizes on its own ({', '.join(CALIBRATED_ENGINES)}); default: the "
        "training file of the model's recipe.yaml",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help=f"time the engines of this model's kind ({CALIBRATION_ENGINES}) on this host, record the fastest "
        "(served from then on) and print the timings; no question needed",
    )
    add_verbose(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: _answer(args))


def _answer(args) -> int:
    # Every input is checked before the model loads (and may measure latencies): a bad one fails at once.
    check_positive(threads=args.threads, budget_ms=args.budget_ms)
    check_engine(args.engine, "--engine")
    check_engine(args.backend, "--backend")
    if args.engine and args.backend and args.engine != args.backend:
        raise ValueError(f"--engine {args.engine} and --backend {args.backend}: --backend is --engine's old name")
    engine = args.engine or args.backend
    if args.calibrate:
        if not Path(resolve_model_path(args.model)).is_dir():
            raise FileNotFoundError(f"--model {args.model}: model directory not found")
        calibration_source(resolve_model_path(args.model), engine, args.calibration_data)  # a one-line refusal
        report = QalaModel.calibrate(
            args.model,
            engines=[engine] if engine else None,
            threads=args.threads,
            calibration_data=args.calibration_data,
        )
        print(json.dumps(report))
        return 0
    if args.question is None or (args.context is None and args.context_file is None):
        raise ValueError("--question and --context (or --context-file) are required unless --calibrate")
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
    flag = unreadable(load_tokenizer(resolve_model_path(args.model)), args.question)
    if flag is not None:  # before the model loads (and may measure latencies)
        raise ValueError(f"--question: {flag}")
    model = QalaModel.from_pretrained(
        args.model,
        threads=args.threads,
        remeasure=args.remeasure,
        engine=engine,
        calibration_data=args.calibration_data,
        warm=False,  # one question: build only the shapes it needs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the logger already reports a budget nothing fits
        result = model.answer(args.question, context, budget_ms=args.budget_ms)
    print(json.dumps({**result, "budget_ms": args.budget_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
