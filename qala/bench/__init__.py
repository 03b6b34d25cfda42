"""Benchmarks of qala against its baselines and peers, on this machine, in one command.

    python -m qala.bench RECIPE.yaml [key.sub=value ...] [--resume] [--table padded|questions|all]

One harness for both tables. A row is (engine, model, dtype, length configuration, batch sizes, `padded`):
a padded row times model calls on windows padded to max_seq_length at every batch size (bench.json, the paper's
view); an unpadded row answers real questions end to end at one batch size (real_questions.json).

plan.py       the one planner: every row of a recipe, published F1, the frontier pick
cli.py        the harness (resume, time budget, GEMM peak, core sweep, one worker per row) and the command line
worker.py     one row in its own process: `python -m qala.bench.worker SPEC OUT`; one measure(), by `padded`
peers.py      how a row runs, by engine name: qala's engines, random-weight baselines, transformers, ONNX
              Runtime, OpenVINO, IPEX
roofline.py   the GEMM peak, fp32 and INT8, the best of the engines the rows use
report.py     derived columns and one markdown renderer driven by column lists (also the tables README.md and
              docs/ quote), plots
ipex.py       IPEX's calibrate-and-score command (the optional engine's inputs)

Submodules are imported lazily: a worker running under another environment's Python (IPEX's torch
2.8) loads only what its row needs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `qala-bench` console script and `python -m qala.bench`."""
    from qala.bench.cli import main as cli_main

    return cli_main(argv)
