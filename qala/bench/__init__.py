"""Benchmarks of qala against its baselines and peers, on this machine, in one command.

    python -m qala.bench RECIPE.yaml [key.sub=value ...] [--resume] [--table padded|questions|all]

plan.py       the padded table's rows, published F1 of the baselines, the frontier pick
questions.py  the real-questions table: end to end per question, unpadded windows, F1 on the same questions
worker.py     one row in its own process: `python -m qala.bench.worker SPEC OUT`
peers.py      the models compared with: random-weight baselines, transformers, ONNX Runtime
roofline.py   the GEMM peak, fp32 and INT8, the best of the engines the rows use
report.py     summaries, derived columns, markdown tables, plots
cli.py        the run loop (resume, time budget, core sweep) and the command line

Submodules are imported lazily: a worker running under another environment's Python (IPEX's torch
2.8) loads only what its row needs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `qala-bench` console script and `python -m qala.bench`."""
    from qala.bench.cli import main as cli_main

    return cli_main(argv)
