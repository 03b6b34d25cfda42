"""qala: length-adaptive MiniLM for extractive question answering on CPUs (QuaLA-MiniLM).

The public surface: `qala.QAModel` (the serving class, qala.answer.QalaModel, which stays importable
under that name) is imported on first use, so `import qala` loads no torch and no transformers.

The pipeline, in order: a module may import only the steps before it (tests/test_imports.py checks
every import, function-level ones included). `quantize` comes before `evaluate` because
qala.quantize.load.load_model, the one loader every stage uses, must know INT8 artifacts; `train`
imports `evaluate` for its post-stage evaluation; `tune` imports `train` for QAT.
qala.cli (the entry-point helper) is not a step: it may import `utils` and `recipe` only.
"""

from typing import Any

from qala.cli import hold_import_noise as _hold_import_noise

PIPELINE = (
    "utils",
    "recipe",
    "stage",
    "data",
    "lengths",
    "model",
    "quantize",
    "evaluate",
    "train",
    "tune",
    "search",
    "answer",
    "serve",
    "bench",
)

# Public names, imported when first read (PEP 562): `import qala` stays light.
_LAZY = ("QAModel", "QalaModel")
__all__ = ["PIPELINE", "QAModel"]

# Before torch/torchao are imported by any step: their import-time warnings wait for qala.cli (-v).
_hold_import_noise()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'qala' has no attribute {name!r}")
    from qala.answer import QalaModel  # the package's one import of a step (tests/test_imports.py)

    globals().update(QAModel=QalaModel, QalaModel=QalaModel)  # later reads skip __getattr__
    return QalaModel


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
