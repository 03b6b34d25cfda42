"""Serve a qala model over HTTP: batched, holding a p95 latency target by moving along the frontier.

    pip install -e ".[serve]"
    python -m qala.serve --model DIR [--host 127.0.0.1] [--port 8000] [--p95-ms 50] [--shed-ms 100] [--max-batch 8]
        [--max-wait-ms 5] [--max-context-chars 100000] [--engine NAME] [--calibration-data FILE] [--timeout-s 30]
    python -m qala.serve --model DIR --ray --replicas 2          # the same app on Ray Serve

    curl -s localhost:8000/answer -d '{"question": "Who?", "context": "...", "budget_ms": 20}'

Routes: POST /answer {question, context, budget_ms?} -> the fields of QalaModel.answer (answer, score,
flag, keep_ratios / length_config, expected_ms, fits_budget, windows, tokens) plus measured_ms, the
configuration chosen ({name, f1}), queue_ms, slot_ms, predicted_completion_ms, fits_target, batch_size
and server_ms; POST /answer/batch {requests: [...]} -> {answers: [...]}; GET /healthz; GET /metrics
(Prometheus: qala_requests_total, qala_request_latency_seconds, qala_configuration_chosen_total,
qala_queue_depth, qala_errors_total by kind, qala_batch_size, qala_cost_scale).

How it works (qala/serve/service.py): the model loads and warms once at start (QalaModel.from_pretrained,
then one answer). Requests wait in one queue; a single worker takes up to --max-batch of them, or what
arrived within --max-wait-ms of the oldest, and answers them with one QalaModel.answer_batch call in a
model thread (windows of several requests share forward passes; the event loop keeps accepting);
--concurrent-batches N runs N such batches at once in N model threads on --threads / N engine threads
each (on 2 cores N=2 served 1.25x the answers/s of N=1 at saturation, docs/results.md). With
--p95-ms T, a batch gets the most accurate frontier configuration whose predicted time for all its
requests fits their slots: T less the time they already waited, shared with every request in the batch
and queued behind it (service.slot_ms), the cost model corrected online by the measured/predicted time
of recent batches; one configuration per batch, so the batch stays one configuration's forward passes.
A burst therefore moves requests down the frontier, and they come back up as the queue drains; a
request's own budget_ms still caps its model time. Without --p95-ms every request gets the most
accurate configuration its budget_ms allows (full length when it has none).

Overload is refused on arrival, not after a wait: a request whose predicted completion (the requests
ahead of it answered at the fastest configuration's cost of a recent request, times the online cost
correction; without --p95-ms at the most accurate one) is past --shed-ms (default 2x --p95-ms; none
without a target; 0: never) gets 503 {"error": "shed"} with a Retry-After header at once, counted in
qala_errors_total{kind="shed"}.

Bad requests get a 4xx JSON {error, field, message} naming the field (422 for a missing, blank or
mistyped field or a bad budget, 400 for malformed JSON, 413 for a context over --max-context-chars or
a batch over --max-batch-items); a request not answered within --timeout-s gets 504, a full queue
(--max-queue) 503 {"error": "overloaded"} with Retry-After. The service keeps serving after any of them.

When to move from one process to Ray Serve
------------------------------------------
Stay with one process (the default) while one host serves the load: its single batcher already groups
concurrent requests into shared forward passes, torch spreads each pass over the host's cores, and
load adaptation sees the whole queue, so it trades F1 for latency with full knowledge. Ray adds a proxy
hop per request, a Ray instance to run (memory, seconds to start), and one model copy and one queue per
replica (each replica adapts to its own queue only).

Move to Ray (`--ray --replicas N`) when one of these holds:
- More than one host is needed, or you want Ray's replica health checks, restarts, autoscaling or
  rolling upgrades.
- One process is saturated while CPU is left idle: the queue stays non-empty (qala_queue_depth > 0) and
  adaptation sits at the fastest configuration (qala_configuration_chosen_total), yet the host's cores
  are not busy. On many-core hosts a batch-8 MiniLM forward does not use 16+ torch threads well; N
  replicas of C threads each (--replicas N --replica-cpus C, N*C = cores) serve more at saturation.
  Measure both on your host with benchmarks/serve_load.py before switching.
- Requests with very long contexts (many windows) would hold the single model thread for long: several
  replicas keep short questions from queueing behind them.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from qala.serve.server import main as _main

    return _main(argv)
