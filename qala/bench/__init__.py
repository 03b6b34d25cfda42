"""Benchmarks of qala against its baselines and peers, on this machine, in one command.

    python -m qala.bench RECIPE.yaml [key.sub=value ...] [--resume] [--table padded|questions|all]

plan.py       one planner for both tables (engine x model x configuration x batch), published F1, the frontier pick
cli.py        one harness for both tables (resume, time budget, GEMM peak, core sweep) and the command line
worker.py     one row in its own process: `python -m qala.bench.worker SPEC OUT`; both tables measured here
peers.py      how a row runs, by engine name: qala's engines, random-weight baselines, transformers, ONNX
              Runtime, OpenVINO, IPEX
roofline.py   the GEMM peak, fp32 and INT8, the best of the engines the rows use
report.py     summaries, derived columns, markdown tables (also those README.md and docs/ quote), plots

Submodules are imported lazily: a worker running under another environment's Python (IPEX's torch
2.8) loads only what its row needs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `qala-bench` console script and `python -m qala.bench`."""
    from qala.bench.cli import main as cli_main

    return cli_main(argv)
