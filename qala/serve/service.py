"""The model side of the service: one loaded QalaModel, the per-request choice of a frontier
configuration under load, batched answering off the event loop, and the Prometheus metrics.

Nothing here knows HTTP (qala.serve.app) or Ray (qala.serve.ray_serve): a batcher hands `Service.run`
a list of requests and gets one answer (a dict) or one error (an exception) per request back.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from qala.answer import FrontierPoint, QalaModel

logger = logging.getLogger(__name__)

# Latency histogram buckets, seconds: a served SQuAD question takes milliseconds to a second on CPUs.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The online correction of the cost model (measured / predicted batch time) moves by this share of each
# new batch's ratio, and stays within these bounds (a single slow batch, e.g. a GC pause, cannot
# send every later request to the fastest configuration).
COST_SCALE_STEP = 0.2
COST_SCALE_BOUNDS = (0.25, 8.0)
# Warm-up question for the answering path (tokenizer, post-processing) after the engine's own warm-up.
WARMUP = ("What is warmed up?", "The service answers one question at start so that the first request is not slower.")


@dataclass(frozen=True)
class ServeConfig:
    """What `python -m qala.serve` serves and how; every field is a command-line option.

    `p95_ms`: the latency target that load adaptation holds (None: every request gets the most accurate
    configuration its own budget_ms allows). `calibrate`: correct the cost model online by the measured
    batch times (off only in tests that check the choice against the cost model itself).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    p95_ms: float | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_context_chars: int = 100_000
    max_batch_items: int = 64
    max_queue: int = 256
    timeout_s: float = 30.0
    engine: str | None = None
    calibration_data: str | None = None
    threads: int | None = None
    calibrate: bool = True
    ray: bool = False
    replicas: int = 1
    replica_cpus: float = 1.0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "max_batch", "max_context_chars", "max_batch_items", "max_queue", "replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "port" else 1):
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("p95_ms", "max_wait_ms", "timeout_s", "replica_cpus", "threads"):
            value = getattr(self, name)
            if value is None and name in ("p95_ms", "threads"):
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and name != "max_wait_ms"):
                problems.append(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Item:
    """One request waiting to be answered; `arrival` is time.monotonic() when it was queued."""

    question: str
    context: str
    budget_ms: float | None = None
    arrival: float = field(default_factory=time.monotonic)


def slot_ms(target_ms: float, batch_waits: Sequence[float], behind_waits: Sequence[float] = ()) -> float:
    """The time each request may take so that all requests in sight finish within `target_ms`.

    A batch of n requests completes together, and the k-th request queued behind it completes after
    n + k requests' work: with s ms per request, request j (waited w_j, with p_j requests' work up to
    and including its own) completes at w_j + p_j * s. The slot is the largest s that keeps every one
    within the target (negative when one is already late: then nothing fits and the fastest is used).
    `behind_waits`: the waits of the requests queued behind the batch, oldest first.
    """
    n = len(batch_waits)
    slot = (target_ms - max(batch_waits)) / n
    for k, wait in enumerate(behind_waits, start=1):
        slot = min(slot, (target_ms - wait) / (n + k))
    return slot


def _cap(*budgets: float | None) -> float | None:
    present = [b for b in budgets if b is not None]
    return min(present) if present else None


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

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def configuration_label(point: FrontierPoint) -> str:
    """ "keep_ratios=1,0.75" or "length_config=384,256": a Prometheus label and a readable name."""
    if point.keep_ratios is not None:
        return "keep_ratios=" + ",".join(f"{r:g}" for r in point.keep_ratios)
    if point.length_config is not None:
        return "length_config=" + ",".join(str(n) for n in point.length_config)
    return "full"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Service:
    """A loaded model answering batches of requests, choosing each request's configuration.

    `run(items, behind)` answers a batch in the service's one model thread (so the event loop stays free
    and one forward pass runs at a time). With a p95 target, each request gets the most accurate frontier
    configuration whose predicted time fits its slot (`slot_ms`: the target less the wait, shared with
    everything queued) scaled by the measured/predicted ratio of recent batches; its own budget_ms (model
    time, as in QalaModel.answer) caps it.
    """

    def __init__(self, model: QalaModel, config: ServeConfig, *, engine: str | None = None) -> None:
        self.model = model
        self.config = config
        self.engine = engine or config.engine
        self.metrics = Metrics()
        self.cost_scale = 1.0
        self._by_name = {json.dumps(p.model_kwargs(), sort_keys=True): p for p in model.points}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qala-model")

    @classmethod
    def load(cls, config: ServeConfig) -> Service:
        """Load the model and its frontier (QalaModel.from_pretrained: the engine warms every shape and the
        cost models are fitted or read back), then answer one question so the first request is not slower."""
        started = time.perf_counter()
        model = QalaModel.from_pretrained(
            config.model, threads=config.threads, backend=config.engine, calibration_data=config.calibration_data
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
            "max_batch": self.config.max_batch,
            "max_wait_ms": self.config.max_wait_ms,
            "cost_scale": round(self.cost_scale, 4),
            "configurations": [
                {
                    "name": configuration_label(p),
                    "keep_ratios": list(p.keep_ratios) if p.keep_ratios is not None else None,
                    "length_config": list(p.length_config) if p.length_config is not None else None,
                    "f1": _finite(p.f1),
                    "ms_at_max_length": p.latency_ms,
                }
                for p in self.model.points
            ],
        }

    async def run(self, items: Sequence[Item], behind: Sequence[float] = ()) -> list[dict[str, Any] | Exception]:
        """Answers (or errors) for `items`, computed in the model thread; `behind`: arrival times of the
        requests queued after them, oldest first."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_batch, list(items), list(behind))

    def run_batch(self, items: Sequence[Item], behind: Sequence[float] = ()) -> list[dict[str, Any] | Exception]:
        """Answer a batch now (blocking): choose budgets, answer each group of equal budget with one
        answer_batch call (its windows batched in forward passes), and update the cost-model correction."""
        if not items:
            return []
        started = time.monotonic()
        waits = [(started - item.arrival) * 1000 for item in items]
        target = self.config.p95_ms
        slot = slot_ms(target, waits, [(started - a) * 1000 for a in behind]) if target is not None else None
        scale = self.cost_scale if self.config.calibrate else 1.0
        # The slot is wall time; the cost models predict model time, which runs `scale` times slower or faster.
        budgets = [_cap(slot / scale if slot is not None else None, item.budget_ms) for item in items]
        groups: dict[float | None, list[int]] = collections.defaultdict(list)
        for i, budget in enumerate(budgets):
            groups[budget].append(i)
        outcomes: list[dict[str, Any] | Exception] = [RuntimeError("not answered")] * len(items)
        measured: list[float] = [0.0] * len(items)
        for budget, rows in groups.items():
            group_start = time.perf_counter()
            answers = self._answer_group([items[i] for i in rows], budget)
            elapsed = (time.perf_counter() - group_start) * 1000
            for i, outcome in zip(rows, answers, strict=True):
                outcomes[i], measured[i] = outcome, elapsed
        batch_ms = (time.monotonic() - started) * 1000
        predicted = sum(o["expected_ms"] for o in outcomes if isinstance(o, dict))
        if self.config.calibrate and predicted > 0:
            ratio = batch_ms / predicted
            low, high = COST_SCALE_BOUNDS
            self.cost_scale = min(high, max(low, (1 - COST_SCALE_STEP) * self.cost_scale + COST_SCALE_STEP * ratio))
            self.metrics.cost_scale.set(self.cost_scale)
        self.metrics.batch_size.observe(len(items))
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
                predicted_completion_ms=round(completion, 3),
                fits_target=fits_target,
                queue_ms=round(waits[i], 3),
                batch_size=len(items),
            )
        return outcomes

    def _answer_group(self, items: Sequence[Item], budget: float | None) -> list[dict[str, Any] | Exception]:
        """One answer_batch call; if it refuses the batch (a question the model cannot take), each
        question alone, so one bad question fails only its own request."""
        import warnings

        questions, contexts = [i.question for i in items], [i.context for i in items]
        with warnings.catch_warnings():
            # "no frontier configuration fits": normal under load (the fastest is used and fits_target says
            # so); QalaModel's logger still records it.
            warnings.simplefilter("ignore", UserWarning)
            try:
                return list(self.model.answer_batch(questions, contexts, budget_ms=budget))
            except ValueError:
                if len(items) == 1:
                    raise
            answers: list[dict[str, Any] | Exception] = []
            for question, context in zip(questions, contexts, strict=True):
                try:
                    answers.append(self.model.answer_batch([question], [context], budget_ms=budget)[0])
                except ValueError as e:
                    answers.append(e)
            return answers


def _kwargs(answer: dict[str, Any]) -> dict[str, list]:
    if answer.get("keep_ratios") is not None:
        return {"keep_ratios": answer["keep_ratios"]}
    return {"length_config": answer["length_config"]} if answer.get("length_config") is not None else {}


class Overloaded(RuntimeError):
    """The queue is full: the request is refused at once (503) rather than left to time out."""


class LocalBatcher:
    """Batches concurrent requests in one process: an asyncio queue and a single worker task that takes up
    to max_batch requests, or what has arrived max_wait_ms after the oldest one, and runs them as one
    Service.run call (in the model thread, so the event loop keeps accepting requests meanwhile)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._waiting: collections.deque[tuple[Item, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def depth(self) -> int:
        return sum(not future.done() for _, future in self._waiting)

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._work(), name="qala-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(Overloaded("the service is shutting down"))
        self._waiting.clear()

    async def submit(self, item: Item) -> dict[str, Any]:
        if self._arrived is None:
            raise Overloaded("the service is not started")
        if self.depth() >= self.service.config.max_queue:
            raise Overloaded(f"{self.service.config.max_queue} requests are already waiting (--max-queue)")
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
                continue
            behind = [item.arrival for item, future in self._waiting if not future.done()]
            try:
                outcomes = await self.service.run([item for item, _ in batch], behind)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the worker
                logger.exception("a batch of %d failed", len(batch))
                outcomes = [e] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
