"""The model side of the service: one loaded QalaModel, the per-request choice of a frontier
configuration under load, batched answering off the event loop, and the Prometheus metrics.

Nothing here knows HTTP (qala.serve.app) or Ray (qala.serve.ray_serve): a batcher hands `Service.run`
a list of requests and gets one answer (a dict) or one error (an exception) per request back.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qala.answer import FrontierPoint, QalaModel, select_point
from qala.lengths import config_json, config_label
from qala.search import FRONTIER_NAME, read_frontier
from qala.utils import resolve_model_path

logger = logging.getLogger(__name__)

# Latency histogram buckets, seconds: a served SQuAD question takes milliseconds to a second on CPUs.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The online correction of the cost model (measured / predicted batch time) moves by this share of each
# new batch's ratio, and stays within these bounds (a single slow batch, e.g. a GC pause, cannot
# send every later request to the fastest configuration).
COST_SCALE_STEP = 0.2
COST_SCALE_BOUNDS = (0.25, 8.0)
# With --p95-ms T and no --shed-ms, a request predicted to complete after SHED_FACTOR * T is refused at once:
# the prediction drains the queue at the fastest configuration (a lower bound), so such a request would miss
# the target by 2x or more even if everything ahead moved down the frontier; waiting only adds it to the queue
# that makes later requests late too.
SHED_FACTOR = 2.0
# Feedback on the tail the service delivers. The slots plan each batch to finish within the target, but
# predictions err (batch-time noise, the event loop's own work, GC) and the target is a p95: planning every
# request to *just* fit puts far more than 5% over it (adaptive mode missed a 100 ms target by 6 ms at 60 and
# 90 rps, benchmarks/results/serve_load_span_gpu_zen5, 2026-12-04). So the service plans to target_scale x
# the target, where target_scale follows the p95 of the last P95_WINDOW answered requests (arrival to answer,
# in the server): each batch multiplies it by (target / observed p95) ** (P95_GAIN x requests answered), within
# TARGET_SCALE_BOUNDS, so it moves per request, not per batch (batches grow under load). At 60 rps and 10% over
# the target, the scale falls ~10% a second. Under light load the observed p95 is far below the target and the
# scale rests at 1.
P95_WINDOW = 200
P95_MIN_SEEN = 20  # fewer answered requests than this: no tail to read yet, the scale stays
P95_GAIN = 0.02
TARGET_SCALE_BOUNDS = (0.5, 1.0)
# Warm-up question for the answering path (tokenizer, post-processing) after the engine's own warm-up.
WARMUP = ("What is warmed up?", "The service answers one question at start so that the first request is not slower.")


@dataclass(frozen=True)
class ServeConfig:
    """What `python -m qala.serve` serves and how; every field is a command-line option.

    `p95_ms`: the latency target that load adaptation holds (None: every request gets the most accurate
    configuration its own budget_ms allows). `shed_ms`: refuse a request at once (503) whose predicted
    completion exceeds it (None: SHED_FACTOR x p95_ms, or no shedding without a target; 0: no shedding).
    `calibrate`: correct the cost model online by the measured batch times, and the planning target by the
    p95 delivered (off only in tests that check the choice against the cost model itself).
    `min_f1`: frontier configurations whose recorded F1 is below it are never served (under load requests
    then wait, or are shed, instead of being answered by a configuration that loses most answers).
    `concurrent_batches`: batches in the model at once, each in its own model thread with `threads` /
    concurrent_batches engine threads (see Service.load for why 2 pays at saturation).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    p95_ms: float | None = None
    shed_ms: float | None = None
    min_f1: float | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_context_chars: int = 100_000
    max_batch_items: int = 64
    max_queue: int = 256
    timeout_s: float = 30.0
    engine: str | None = None
    calibration_data: str | None = None
    threads: int | None = None
    concurrent_batches: int = 1
    calibrate: bool = True
    ray: bool = False
    replicas: int = 1
    replica_cpus: float = 1.0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "port",
            "max_batch",
            "max_context_chars",
            "max_batch_items",
            "max_queue",
            "replicas",
            "concurrent_batches",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "port" else 1):
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("p95_ms", "shed_ms", "min_f1", "max_wait_ms", "timeout_s", "replica_cpus", "threads"):
            value = getattr(self, name)
            if value is None and name in ("p95_ms", "shed_ms", "min_f1", "threads"):
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if name == "shed_ms" and (not ok or value < 0):
                problems.append(f"--shed-ms must be a positive number of ms (or 0: no shedding), got {value!r}")
            elif not ok or value < 0 or (value == 0 and name not in ("max_wait_ms", "shed_ms")):
                problems.append(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def shed_threshold_ms(self) -> float | None:
        """Predicted completion (ms) past which a request is refused at once; None: never refused early."""
        if self.shed_ms is not None:
            return self.shed_ms or None
        return SHED_FACTOR * self.p95_ms if self.p95_ms is not None else None


class Overloaded(RuntimeError):
    """The queue is full: the request is refused at once (503) rather than left to time out.
    `retry_after_s`: when a retry is predicted to be admitted (the Retry-After header; None: not sent)."""

    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Shed(Overloaded):
    """The request would not be answered within the shed threshold: refused at once (503), not queued."""

    kind = "shed"


@dataclass
class Item:
    """One request waiting to be answered; `arrival` is time.monotonic() when it was queued."""

    question: str
    context: str
    budget_ms: float | None = None
    arrival: float = field(default_factory=time.monotonic)


def slot_ms(
    target_ms: float, batch_waits: Sequence[float], behind_waits: Sequence[float] = (), lanes: int = 1
) -> float:
    """The time each request may take so that all requests in sight finish within `target_ms`.

    A batch of n requests completes together, and the k-th request queued behind it completes after
    n + k requests' work: with s ms per request, request j (waited w_j, with p_j requests' work up to
    and including its own) completes at w_j + p_j * s. The slot is the largest s that keeps every one
    within the target (negative when one is already late: then nothing fits and the fastest is used).
    `behind_waits`: the waits of the requests queued behind the batch, oldest first. With `lanes` batches
    in the model at once (ServeConfig.concurrent_batches) the queue behind drains `lanes` times faster: the
    k-th request behind completes after about n + k / lanes requests' work (an approximation: the other
    lanes' batches are not in sight here).
    """
    n = len(batch_waits)
    slot = (target_ms - max(batch_waits)) / n
    for k, wait in enumerate(behind_waits, start=1):
        slot = min(slot, (target_ms - wait) / (n + k / lanes))
    return slot


class Metrics:
    """Prometheus metrics of one service, in a registry of its own (two apps in one process, as in the
    tests, do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qala_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "qala_request_latency_seconds",
            "Request latency in the server, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.configuration = Counter(
            "qala_configuration_chosen",
            "Questions answered, by the frontier configuration chosen",
            ["configuration", "f1"],
            registry=r,
        )
        self.queue_depth = Gauge("qala_queue_depth", "Requests waiting for the model", registry=r)
        self.errors = Counter("qala_errors", "Failed requests, by kind", ["kind"], registry=r)
        self.batch_size = Histogram("qala_batch_size", "Requests per model call", buckets=BATCH_BUCKETS, registry=r)
        self.over_target = Counter(
            "qala_predicted_over_target", "Questions whose predicted completion missed the p95 target", registry=r
        )
        self.cost_scale = Gauge(
            "qala_cost_scale", "Measured / predicted batch time (online cost-model correction)", registry=r
        )
        self.cost_scale.set(1.0)
        self.target_scale = Gauge(
            "qala_target_scale", "Share of the p95 target planned to (feedback on the p95 delivered)", registry=r
        )
        self.target_scale.set(1.0)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def batch_threads(threads: int | None, concurrent_batches: int) -> int | None:
    """Engine threads of each of `concurrent_batches` batches sharing `threads` (None: torch's choice)."""
    if concurrent_batches == 1:
        return threads
    return max(1, (threads or torch.get_num_threads()) // concurrent_batches)


def _require_f1(f1s: Sequence[float | None], min_f1: float, name: str) -> None:
    """Refuse a floor that no frontier configuration (recorded F1s `f1s`) reaches, in one line."""
    best = max((f for f in f1s if f is not None and math.isfinite(f)), default=None)
    if best is None or best < min_f1:
        raise ValueError(f"--min-f1 {min_f1:g}: no frontier configuration of {name} scores that (best F1: {best})")


def _at_least_f1(model: QalaModel, min_f1: float, name: str) -> QalaModel:
    """A view of `model` that serves only the frontier configurations with a recorded F1 >= min_f1 (the
    engine, tokenizer and cost models are shared; the model passed in is not changed)."""
    _require_f1([p.f1 for p in model.points], min_f1, name)
    kept = [p for p in model.points if p.f1 is not None and math.isfinite(p.f1) and p.f1 >= min_f1]
    view = copy.copy(model)
    view.points = kept
    return view


def configuration_label(point: FrontierPoint) -> str:
    """ "keep_ratios=1,0.75" or "length_config=384,256": a Prometheus label and a readable name."""
    return config_label(point.keep_ratios, point.length_config)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Service:
    """A loaded model answering batches of requests, choosing each request's configuration.

    `run(items, behind)` answers a batch in the service's one model thread (so the event loop stays free
    and one forward pass runs at a time). With a p95 target, a batch gets the most accurate frontier
    configuration whose predicted time for all its requests fits their slots (`slot_ms`: the target less
    the wait, shared with everything queued) scaled by the measured/predicted ratio of recent batches; a
    request's own budget_ms (model time, as in QalaModel.answer) caps it. `admit` refuses a request at
    once whose predicted completion is past the shed threshold (ServeConfig.shed_threshold_ms).
    """

    def __init__(self, model: QalaModel, config: ServeConfig, *, engine: str | None = None) -> None:
        if config.min_f1 is not None:
            model = _at_least_f1(model, config.min_f1, config.model)
        self.model = model
        self.config = config
        self.engine = engine or config.engine
        self.metrics = Metrics()
        self.cost_scale = 1.0
        self.target_scale = 1.0
        self._latencies: collections.deque[float] = collections.deque(maxlen=P95_WINDOW)
        self._by_name = {json.dumps(p.model_kwargs(), sort_keys=True): p for p in model.points}
        # The configuration the queue drains at, for admission: with a target, the fastest (the service moves
        # everything there under load, so a request predicted late even there cannot be helped); without
        # one, the most accurate, which every request without its own budget gets.
        full_window = [model.max_seq_length]
        if config.p95_ms is not None:
            self._drain_point = min(model.points, key=lambda p: (p.expected_ms(full_window), -p.f1))
        else:
            self._drain_point = select_point(model.points, None, full_window)[0]
        # Model ms of a recent request at the drain configuration (its windows, by the cost model), moving
        # like cost_scale; until a batch is answered, one full-length window (real windows are shorter).
        self.request_ms = self._drain_point.expected_ms(full_window)
        self._request_ms_seen = False
        self._state_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=config.concurrent_batches, thread_name_prefix="qala-model")

    @classmethod
    def load(cls, config: ServeConfig) -> Service:
        """Load the model and its frontier (QalaModel.from_pretrained: the engine warms every shape and the
        cost models are fitted or read back), then answer one question so the first request is not slower."""
        import qala.quantize.onnx

        # The model shares the cores with the event loop: ONNX Runtime's threads must not spin (SPIN_WAIT's note).
        qala.quantize.onnx.SPIN_WAIT = False
        # Concurrent batches split the threads: N batches at once, each on threads / N, beat one batch on all
        # of them at saturation on 2 cores (onnxruntime-int8, reference model, Zen 5, ad hoc in-process runs of
        # 512 dev questions in batches of 8: 1 x 2 threads 138-141 answers/s, 2 x 1 thread 179-181): a
        # one-thread batch never waits for a second thread that the event loop or the load generator holds,
        # and the Python parts of one batch (tokenizing, post-processing) overlap the other's forward pass.
        # The latency of a lone request rises (one thread instead of all), so it is an option, not a default.
        threads = batch_threads(config.threads, config.concurrent_batches)
        if (
            config.min_f1 is not None
        ):  # before the model loads (a minute with warm-up): a floor nothing reaches fails now
            frontier = Path(resolve_model_path(config.model)) / FRONTIER_NAME
            points = read_frontier(frontier)["frontier"] if frontier.is_file() else []
            _require_f1([p.get("f1") for p in points], config.min_f1, config.model)
        started = time.perf_counter()
        model = QalaModel.from_pretrained(
            config.model, threads=threads, backend=config.engine, calibration_data=config.calibration_data
        )
        model.answer(*WARMUP)
        logger.info(
            "loaded %s (%d configurations, engine %s) in %.1f s",
            config.model,
            len(model.points),
            config.engine or "default",
            time.perf_counter() - started,
        )
        return cls(model, config)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        """What /healthz reports: the model, its configurations and the serving settings."""
        return {
            "model": str(self.config.model),
            "engine": self.engine or "default",
            # Where an engine that quantizes on its own (openvino-int8) took its calibration windows; else None.
            "calibration": getattr(self.model, "calibration", None),
            "pid": os.getpid(),
            "p95_ms": self.config.p95_ms,
            "shed_ms": self.config.shed_threshold_ms,
            "max_batch": self.config.max_batch,
            "max_wait_ms": self.config.max_wait_ms,
            "cost_scale": round(self.cost_scale, 4),
            "target_scale": round(self.target_scale, 4),
            "configurations": [
                {
                    "name": configuration_label(p),
                    **config_json(p.keep_ratios, p.length_config),
                    "f1": _finite(p.f1),
                    "ms_at_max_length": p.latency_ms,
                }
                for p in self.model.points
            ],
        }

    def per_request_ms(self) -> float:
        """Predicted wall ms of one request when the queue drains: a recent request's model time at the drain
        configuration times cost_scale (measured / predicted time of recent batches, batching included)."""
        return self.request_ms * (self.cost_scale if self.config.calibrate else 1.0)

    def predicted_completion_ms(self, ahead: int, running: int = 0, running_ms: float = 0.0) -> float:
        """When a request arriving now would be answered, in ms from now: the `running` requests in the model
        (for `running_ms` already) finish, then the `ahead` waiting ones and itself, each per_request_ms."""
        # With concurrent batches per_request_ms (one batch's time per request) is `lanes` times a request's
        # share of the model's time: the queue drains that much faster.
        per_request = self.per_request_ms() / self.config.concurrent_batches
        in_model = max(0.0, running * per_request - running_ms)
        return in_model + (ahead + 1) * per_request

    def admit(self, ahead: int, running: int = 0, running_ms: float = 0.0) -> None:
        """Refuse (Shed, a 503 with Retry-After) a request whose predicted completion is past the shed
        threshold: queued, it would wait its way to a timeout, and everything behind it would wait longer;
        refused at once, its client learns in a millisecond and can retry or go elsewhere."""
        threshold = self.config.shed_threshold_ms
        if threshold is None:
            return
        predicted = self.predicted_completion_ms(ahead, running, running_ms)
        if predicted <= threshold:
            return
        source = "--shed-ms" if self.config.shed_ms else f"{SHED_FACTOR:g}x --p95-ms"
        # Retry once the queue ahead has drained below the threshold (at least 1 s: Retry-After is whole seconds).
        retry = max(1, math.ceil((predicted - threshold) / 1000))
        raise Shed(
            f"refused at once: the service is overloaded; a request arriving now would be answered in about "
            f"{predicted:.0f} ms ({ahead} waiting and {running} in the model ahead of it, ~"
            f"{self.per_request_ms():.0f} ms each), over the shed threshold of {threshold:g} ms "
            f"({source}); retry after {retry} s",
            retry,
        )

    def retry_after_s(self, ahead: int) -> int:
        """Seconds until `ahead` queued requests are predicted answered (the Retry-After of a full queue)."""
        return max(1, math.ceil(self.predicted_completion_ms(ahead) / 1000))

    async def run(self, items: Sequence[Item], behind: Sequence[float] = ()) -> list[dict[str, Any] | Exception]:
        """Answers (or errors) for `items`, computed in the model thread; `behind`: arrival times of the
        requests queued after them, oldest first."""
        return await self.submit(items, behind)

    def submit(self, items: Sequence[Item], behind: Sequence[float] = ()) -> asyncio.Future:
        """`run`, handed to a model thread now (not when the event loop next gets to a coroutine)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self.run_batch, list(items), list(behind))

    def run_batch(self, items: Sequence[Item], behind: Sequence[float] = ()) -> list[dict[str, Any] | Exception]:
        """Answer a batch now (blocking): one answer_batch call per own budget_ms (usually one: requests rarely
        send one), each with one configuration for all its requests, and update the cost-model correction."""
        if not items:
            return []
        started = time.monotonic()
        waits = [(started - item.arrival) * 1000 for item in items]
        target = self.config.p95_ms
        plan = None if target is None else target * (self.target_scale if self.config.calibrate else 1.0)
        behind_ms = [(started - a) * 1000 for a in behind]
        slot = slot_ms(plan, waits, behind_ms, self.config.concurrent_batches) if plan is not None else None
        scale = self.cost_scale if self.config.calibrate else 1.0
        # Why one configuration per batch: slot_ms says the batch completes together after n * slot, so the
        # budget is the batch's, not each request's. Giving each request slot / scale of its own let
        # answer_batch pick per question by its own windows (long contexts a cheaper configuration than
        # short ones), and every configuration is forward passes of its own (times its length buckets): a
        # batch of 8 ran as several smaller passes, slower per request than the batched time the cost
        # correction had learnt. That is the likely reason adaptive mode's p95 was worse than fixed mode's
        # (one configuration) at moderate load (527 vs 366 ms at 20 rps, docs/results.md; not re-measured).
        # The slot is wall time; the cost models predict model time, which runs `scale` times slower or faster.
        groups: dict[float | None, list[int]] = collections.defaultdict(list)
        for i, item in enumerate(items):
            groups[item.budget_ms].append(i)
        outcomes: list[dict[str, Any] | Exception] = [RuntimeError("not answered")] * len(items)
        measured: list[float] = [0.0] * len(items)
        for budget, rows in groups.items():
            group_budget = None if slot is None else len(rows) * slot / scale
            group_start = time.perf_counter()
            answers = self._answer_group([items[i] for i in rows], budget, group_budget)
            elapsed = (time.perf_counter() - group_start) * 1000
            for i, outcome in zip(rows, answers, strict=True):
                outcomes[i], measured[i] = outcome, elapsed
        predicted = self._learn(items, outcomes, (time.monotonic() - started) * 1000, target)
        for i, (item, outcome) in enumerate(zip(items, outcomes, strict=True)):
            if isinstance(outcome, Exception):
                continue
            point = self._by_name.get(json.dumps(_kwargs(outcome), sort_keys=True))
            completion = waits[i] + scale * predicted
            fits_target = None if target is None else completion <= target
            if fits_target is False:
                self.metrics.over_target.inc()
            label = configuration_label(point) if point is not None else "unknown"
            f1 = _finite(point.f1) if point is not None else None
            self.metrics.configuration.labels(configuration=label, f1="" if f1 is None else f"{f1:g}").inc()
            outcome.update(
                # fits_budget answers for the request's own budget_ms, as QalaModel.answer does.
                fits_budget=item.budget_ms is None or outcome["expected_ms"] <= item.budget_ms,
                measured_ms=round(measured[i], 3),
                configuration={"name": label, "f1": f1},
                budget_ms=item.budget_ms,
                target_p95_ms=target,
                slot_ms=None if slot is None else round(slot, 3),
                cost_scale=round(scale, 4),
                target_scale=None if plan is None else round(plan / target, 4),
                predicted_completion_ms=round(completion, 3),
                fits_target=fits_target,
                queue_ms=round(waits[i], 3),
                batch_size=len(items),
            )
        return outcomes

    def _learn(
        self,
        items: Sequence[Item],
        outcomes: Sequence[dict[str, Any] | Exception],
        batch_ms: float,
        target: float | None,
    ) -> float:
        """Update the cost-model correction, the planning target and request_ms from one answered batch;
        returns the batch's predicted model ms. Concurrent batches (ServeConfig.concurrent_batches) call this
        from several threads, hence the lock."""
        with self._state_lock:
            predicted = sum(o["expected_ms"] for o in outcomes if isinstance(o, dict))
            if self.config.calibrate and predicted > 0:
                ratio = batch_ms / predicted
                low, high = COST_SCALE_BOUNDS
                self.cost_scale = min(high, max(low, (1 - COST_SCALE_STEP) * self.cost_scale + COST_SCALE_STEP * ratio))
                self.metrics.cost_scale.set(self.cost_scale)
            answered = [o for o in outcomes if isinstance(o, dict)]
            if target is not None and self.config.calibrate:
                self._follow_the_tail(target, [i for i, o in zip(items, outcomes, strict=True) if isinstance(o, dict)])
            if answered:
                cost = sum(self._drain_point.expected_ms(o["tokens"]) for o in answered) / len(answered)
                step = COST_SCALE_STEP if self._request_ms_seen else 1.0  # the first batch replaces the guess
                self.request_ms = (1 - step) * self.request_ms + step * cost
                self._request_ms_seen = True
            self.metrics.batch_size.observe(len(items))
            return predicted

    def _follow_the_tail(self, target: float, answered: Sequence[Item]) -> None:
        """Move target_scale by the p95 of the last P95_WINDOW answered requests' in-server latency."""
        now = time.monotonic()
        self._latencies.extend((now - item.arrival) * 1000 for item in answered)
        if len(self._latencies) < P95_MIN_SEEN:
            return
        ranked = sorted(self._latencies)
        observed = ranked[min(len(ranked) - 1, math.ceil(0.95 * len(ranked)) - 1)]
        low, high = TARGET_SCALE_BOUNDS
        step = (target / max(observed, 1e-3)) ** (P95_GAIN * len(answered))
        self.target_scale = min(high, max(low, self.target_scale * step))
        self.metrics.target_scale.set(self.target_scale)

    def _answer_group(
        self, items: Sequence[Item], budget: float | None, batch_budget: float | None = None
    ) -> list[dict[str, Any] | Exception]:
        """One answer_batch call (`budget`: each question's own cap; `batch_budget`: the whole call's, one
        configuration for all); if it refuses the batch (a question the model cannot take), each question
        alone with its share of batch_budget, so one bad question fails only its own request."""
        import warnings

        questions, contexts = [i.question for i in items], [i.context for i in items]
        with warnings.catch_warnings():
            # "no frontier configuration fits": normal under load (the fastest is used and fits_target says
            # so); QalaModel's logger still records it.
            warnings.simplefilter("ignore", UserWarning)
            try:
                answered = self.model.answer_batch(questions, contexts, budget_ms=budget, batch_budget_ms=batch_budget)
                return list(answered)
            except ValueError:
                if len(items) == 1:
                    raise
            share = None if batch_budget is None else batch_budget / len(items)
            answers: list[dict[str, Any] | Exception] = []
            for question, context in zip(questions, contexts, strict=True):
                try:
                    answers.append(
                        self.model.answer_batch([question], [context], budget_ms=budget, batch_budget_ms=share)[0]
                    )
                except ValueError as e:
                    answers.append(e)
            return answers


def _kwargs(answer: dict[str, Any]) -> dict[str, list]:
    if answer.get("keep_ratios") is not None:
        return {"keep_ratios": answer["keep_ratios"]}
    return {"length_config": answer["length_config"]} if answer.get("length_config") is not None else {}


class LocalBatcher:
    """Batches concurrent requests in one process: an asyncio queue and a single worker task that takes up
    to max_batch requests, or what has arrived max_wait_ms after the oldest one, and runs them as one
    Service.run call (in a model thread, so the event loop keeps accepting requests meanwhile); up to
    ServeConfig.concurrent_batches such calls run at once, the next batch forming while they run."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._waiting: collections.deque[tuple[Item, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # The batches in the model now: their sizes and when the oldest started (admission counts them as ahead).
        self._in_model: dict[asyncio.Task, tuple[int, float]] = {}
        self._lanes: asyncio.Semaphore | None = None

    def depth(self) -> int:
        return sum(not future.done() for _, future in self._waiting)

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._lanes = asyncio.Semaphore(self.service.config.concurrent_batches)
        self._worker = asyncio.create_task(self._work(), name="qala-batcher")

    async def stop(self) -> None:
        for task in [self._worker, *self._in_model]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(Overloaded("the service is shutting down"))
        self._waiting.clear()

    async def submit(self, item: Item) -> dict[str, Any]:
        if self._arrived is None:
            raise Overloaded("the service is not started")
        depth = self.depth()
        if depth >= self.service.config.max_queue:
            raise Overloaded(
                f"{self.service.config.max_queue} requests are already waiting (--max-queue)",
                self.service.retry_after_s(depth),
            )
        running = sum(n for n, _ in self._in_model.values())
        oldest = min((since for _, since in self._in_model.values()), default=None)
        running_ms = (time.monotonic() - oldest) * 1000 if oldest is not None else 0.0
        self.service.admit(depth, running, running_ms)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _work(self) -> None:
        config = self.service.config
        while True:
            await self._lanes.acquire()  # a model thread is free: form the next batch for it
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            # Up to max_wait_ms after the oldest request's arrival (at once if it waited that long already).
            deadline = self._waiting[0][0].arrival + config.max_wait_ms / 1000
            while len(self._waiting) < config.max_batch and (remaining := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._waiting and len(batch) < config.max_batch:
                item, future = self._waiting.popleft()
                if not future.done():  # a request that timed out meanwhile is dropped
                    batch.append((item, future))
            if not batch:
                self._lanes.release()
                continue
            behind = [item.arrival for item, future in self._waiting if not future.done()]
            # The model thread gets the batch now: a task's first step would wait behind every callback the
            # event loop has queued (the previous batch's responses among them), leaving the thread idle.
            running = self.service.submit([item for item, _ in batch], behind)
            task = asyncio.create_task(self._answer(batch, running))
            self._in_model[task] = (len(batch), time.monotonic())

    async def _answer(self, batch: list[tuple[Item, asyncio.Future]], running: asyncio.Future) -> None:
        try:
            outcomes = await running
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the worker
            logger.exception("a batch of %d failed", len(batch))
            outcomes = [e] * len(batch)
        finally:
            self._in_model.pop(asyncio.current_task(), None)
            self._lanes.release()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
