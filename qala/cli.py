"""The one entry-point helper every `python -m qala.<step>` uses: arguments, logging, user errors.

    parser = recipe_parser("python -m qala.train", __doc__, "YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("--resume", action="store_true")
    return run_main(parser, argv, lambda args, recipe: ...)   # the body returns the exit status

In the spirit of torchtune's `config.parse`: the recipe file and its `key.sub=value` / `~key.sub`
overrides are parsed and validated before the body runs; a bad input (RecipeError, SquadFormatError,
any OSError or ValueError) ends the run with its message (one line per problem, no traceback) and exit
status 2.

Quiet by default: importing the stack prints lines a user can do nothing about (torchao's "Failed to
load ..._C_mxfp8.so": CUDA kernels, harmless on CPU; torch's pytree deprecation of Enum constants,
which torchao triggers), and Intel Neural Compressor logs hundreds of INFO and warning lines per
tuning. `import qala` holds the import-time records back (`hold_import_noise`, called by
qala/__init__.py, before any of those libraries is imported); `setup_logging(verbose=False)` drops
them with INC's INFO/warning lines and third-party Python warnings (errors always show); `-v`
replays them and shows everything. Progress bars and qala's own INFO lines (one summary per stage) stay.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

# Loggers whose import-time records are held back: torchao (`Failed to load ...so`), torch's pytree
# (`... is an Enum subclass ... register_constant() ... deprecated`, raised by torchao's registrations)
# and Intel Neural Compressor.
IMPORT_NOISE = ("torchao", "torch.utils._pytree", "neural_compressor")
# Libraries whose INFO lines, warnings and Python warnings only -v shows: INC warns once per quantized unit
# ("Converted the model in qdq mode, please compile it": qala compiles later, on purpose) and about the
# accelerator it detected. INC's own logger resets its level when it is first used, so these are logger
# filters, not setLevel.
CHATTY = IMPORT_NOISE
# torch.compile's warnings (graph breaks in the length-adaptive forward, recompilations) come from many
# child loggers: their parent's level quiets them all; -v leaves torch's own level (WARNING).
COMPILE_LOGGERS = ("torch._dynamo", "torch._inductor")
# Library lines that only -v shows because qala says the same better: transformers' "Token indices sequence
# length is longer than ... will result in indexing errors" for a long question (qala.answer refuses it in
# one line naming the window; qala's featurization never runs an over-long sequence through a model).
QUIETED = {"transformers.tokenization_utils_base": "will result in indexing errors"}
THIRD_PARTY_WARNINGS = r"(torch|torchao|neural_compressor|transformers|accelerate|datasets|onnx|onnxruntime)(\.|$)"

# Every error that means "fix your input", not "qala has a bug": RecipeError and SquadFormatError are
# ValueErrors, a missing file or directory an OSError.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Dropped(logging.Filter):
    """Drops a logger's records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _ChildrenQuieted(logging.Filter):
    """On a handler: drops the records below ERROR of the loggers under `names` (torchao.kernel.intmm's "Detected
    no triton" warning when qala.bench imports it): a logger's own filter (_Held) does not see its children's."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = tuple(f"{name}." for name in names)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith(self.prefixes)


class _Held(logging.Filter):
    """Keeps records below `level` from a logger, holding them so that -v can replay them."""

    def __init__(self, level: int, keep: bool) -> None:
        super().__init__()
        self.level, self.keep, self.records = level, keep, []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        if self.keep and len(self.records) < 1000:
            self.records.append(record)
        return False


def hold_import_noise() -> None:
    """Hold back the stack's import-time warnings (see the module docstring). Idempotent."""
    for name in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Held) for f in logger.filters):
            logger.addFilter(_Held(logging.ERROR, keep=True))


def setup_logging(verbose: bool = False) -> None:
    """qala's INFO lines (one summary per stage) on stderr; with `verbose`, the libraries' warnings and INFO
    lines too (INC logs at its own LOGLEVEL, INFO by default)."""
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    held: list[logging.LogRecord] = []
    for name in CHATTY:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _Held)]:
            held += f.records
            logger.removeFilter(f)
        if not verbose:
            logger.addFilter(_Held(logging.ERROR, keep=False))
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, _ChildrenQuieted)]:
            handler.removeFilter(f)
        if not verbose:
            handler.addFilter(_ChildrenQuieted(CHATTY))
    for name in COMPILE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    for name, text in QUIETED.items():
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _Dropped)]:
            logger.removeFilter(f)
        if not verbose:
            logger.addFilter(_Dropped(text))
    if verbose:
        for record in held:  # what the libraries said while being imported, before -v was known
            logging.getLogger(record.name).handle(record)
    else:
        warnings.filterwarnings("ignore", module=THIRD_PARTY_WARNINGS)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def add_verbose(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show the libraries' warnings and INFO lines (torchao, INC)"
    )
    return parser


def recipe_parser(prog: str, doc: str | None, recipe_help: str) -> argparse.ArgumentParser:
    """RECIPE.yaml, `key.sub=value` / `~key.sub` overrides and -v; add a step's own options to it."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("recipe", help=recipe_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value to set, ~key.sub to reset to the default")
    return add_verbose(parser)


def report_error(error: BaseException) -> int:
    """Print a user error (one line per problem) to stderr; returns exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def guarded(body: Callable[[], int], errors: tuple[type[BaseException], ...] = ()) -> int:
    """body(), with a user error (USER_ERRORS, or one of a step's own `errors`) turned into its message and exit 2."""
    try:
        return body()
    except (*USER_ERRORS, *errors) as e:
        return report_error(e)


def run_main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    body: Callable[[argparse.Namespace, Any], int],
    *,
    errors: tuple[type[BaseException], ...] = (),
    intermixed: bool = False,
) -> int:
    """Parse `argv`, set up logging, load and validate the recipe, then `body(args, recipe)` -> exit status."""
    from qala.recipe import load_recipe

    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    setup_logging(args.verbose)
    return guarded(lambda: body(args, load_recipe(args.recipe, args.overrides)), errors)
