"""`python -m qala.serve`: parse the options, load the model once, serve with uvicorn (or Ray Serve).

See qala/serve/__init__.py for the routes, the batching and load adaptation, and when to use --ray.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import replace
from pathlib import Path

from qala.cli import add_verbose, guarded, setup_logging

logger = logging.getLogger(__name__)

INSTALL_HINT = 'the service needs the serve extra: pip install -e ".[serve]"'


class MissingExtra(ImportError):
    """A library of the serve extra is not installed (exit status 2 with the install command)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qala.serve", description="Serve a qala model over HTTP, holding a p95 latency target."
    )
    p.add_argument("--model", required=True, help="a model directory with frontier.json (fp32 or INT8)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--p95-ms",
        type=float,
        default=None,
        help="latency target: each request gets the most accurate configuration whose predicted completion "
        "(queue included) fits it (default: no target, the most accurate configuration)",
    )
    p.add_argument(
        "--shed-ms",
        type=float,
        default=None,
        help="refuse a request at once (503, Retry-After) when its predicted completion (the queue ahead of it "
        "answered at the fastest configuration; without --p95-ms, the most accurate) exceeds this many ms "
        "(default: 2x --p95-ms; none without --p95-ms; 0: never)",
    )
    p.add_argument(
        "--min-f1",
        type=float,
        default=None,
        help="never serve a frontier configuration whose recorded F1 is below this: under load requests wait or "
        "are shed instead (default: every configuration may be served)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="requests per model call (default 8)")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long the oldest request waits for a batch to fill"
    )
    p.add_argument("--max-context-chars", type=int, default=100_000, help="longer contexts are refused with 413")
    p.add_argument("--max-batch-items", type=int, default=64, help="most questions in one POST /answer/batch")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond this are refused with 503")
    p.add_argument("--timeout-s", type=float, default=30.0, help="a request not answered in time gets 504")
    p.add_argument("--engine", default=None, help="serving engine (qala.quantize.engines); default by model kind")
    p.add_argument(
        "--calibration-data",
        default=None,
        help="training questions (SQuAD-format JSON or a datasets hub name) that calibrate an engine quantizing "
        "on its own (openvino-int8); default: the training file of the model's recipe.yaml",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--concurrent-batches",
        type=int,
        default=1,
        help="batches in the model at once, each on --threads / N threads: more answers/s at saturation, "
        "slower lone requests (default 1)",
    )
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of one uvicorn process")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica (with --ray)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local instance)")
    return add_verbose(p)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: _serve(args), errors=(MissingExtra,))


def _serve(args: argparse.Namespace) -> int:
    from qala.evaluate import check_engine
    from qala.serve.service import ServeConfig

    # Every option is checked before the model loads.
    config = ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        p95_ms=args.p95_ms,
        shed_ms=args.shed_ms,
        min_f1=args.min_f1,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_context_chars=args.max_context_chars,
        max_batch_items=args.max_batch_items,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        engine=args.engine,
        calibration_data=args.calibration_data,
        threads=args.threads,
        concurrent_batches=args.concurrent_batches,
        ray=args.ray,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        ray_address=args.ray_address,
    )
    check_engine(config.engine, "--engine")
    from qala.answer import calibration_source
    from qala.utils import resolve_model_path

    if not Path(config.model).is_dir() and not Path(resolve_model_path(config.model)).is_dir():
        raise FileNotFoundError(f"--model {config.model}: no such model directory")
    # An engine that quantizes on its own (openvino-int8) without calibration data is refused in one line here.
    source = calibration_source(resolve_model_path(config.model), config.engine, config.calibration_data)
    if source is not None and source["from"] == "calibration_data":
        config = replace(config, calibration_data=source["data"])  # a file by absolute path (Ray replicas' cwd)
    # Under load "no frontier configuration fits" is the normal state (the fastest is used and each answer's
    # fits_target says so): one log line per request would flood the log.
    logging.getLogger("qala.answer").addFilter(
        lambda record: "no frontier configuration fits" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message="no frontier configuration fits")
    if config.ray:
        _require("ray", "fastapi")
        from qala.serve.ray_serve import run_ray

        return run_ray(config)
    _require("fastapi", "uvicorn", "prometheus_client")
    import uvicorn

    from qala.serve.app import build_app
    from qala.serve.service import LocalBatcher, Service

    service = Service.load(config)
    app = build_app(service, LocalBatcher(service))
    logger.info(
        "serving %s on http://%s:%d (p95 target: %s, shed past: %s ms)",
        config.model,
        config.host,
        config.port,
        config.p95_ms,
        config.shed_threshold_ms,
    )
    try:
        # No access log: one line per request costs CPU the model needs under load (/metrics counts requests).
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    finally:
        service.close()
    return 0


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{', '.join(missing)} not installed: {INSTALL_HINT}")
