"""qala: length-adaptive MiniLM for extractive question answering on CPUs (QuaLA-MiniLM).

The pipeline, in order: a module may import only the steps before it (tests/test_imports.py checks
every import, function-level ones included). `quantize` comes before `evaluate` because
qala.quantize.load.load_model, the one loader every stage uses, must know INT8 artifacts; `train`
imports `evaluate` for its post-stage evaluation; `tune` imports `train` for QAT.
qala.cli (the entry-point helper) is not a step: it may import `utils` and `recipe` only.
"""

from qala.cli import hold_import_noise as _hold_import_noise

PIPELINE = ("utils", "recipe", "data", "model", "quantize", "evaluate", "train", "tune", "search", "answer", "bench")

# Before torch/torchao are imported by any step: their import-time warnings wait for qala.cli (-v).
_hold_import_noise()
