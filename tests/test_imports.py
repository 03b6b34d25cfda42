"""The import graph follows the pipeline: no module imports a later step (qala.PIPELINE, README)."""

import ast
import subprocess
import sys
from pathlib import Path

import qala

PACKAGE = Path(qala.__file__).parent
# Not pipeline steps: the package itself and the entry-point helper, which may import only these steps.
# The package imports `answer` lazily, for its public name qala.QAModel (test_public_api below).
HELPERS = {"__init__": ("cli", "answer"), "cli": ("utils", "recipe")}


def step_of(module: str) -> str | None:
    """qala.quantize.load -> "quantize"; anything outside qala -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "qala" and len(parts) > 1 else None


def qala_imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every qala module imported anywhere in the file (function-level and relative imports included)."""
    package = ".".join(("qala", *path.relative_to(root).with_suffix("").parts[:-1]))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from qala import train` imports the step qala.train.
            found.update(f"{module}.{alias.name}" for alias in node.names if module == "qala")
    return {m for m in found if m == "qala" or m.startswith("qala.")}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_pipeline_names_every_module():
    steps = {name for _, name in modules()}
    assert steps - set(qala.PIPELINE) <= set(HELPERS), f"modules outside qala.PIPELINE: {steps - set(qala.PIPELINE)}"


def test_no_module_imports_a_later_step():
    order = {step: i for i, step in enumerate(qala.PIPELINE)}
    problems = []
    for path, step in modules():
        for module in sorted(qala_imports(path)):
            target = step_of(module)
            if target is None or target == step:
                continue
            if step in HELPERS:
                ok = target in HELPERS[step]
            elif target in HELPERS:
                ok = target == "cli"  # any step may use the entry-point helper
            else:
                ok = order[target] < order[step]
            if not ok:
                problems.append(f"{path.relative_to(PACKAGE.parent)} ({step}) imports {module} ({target})")
    assert not problems, "imports against the pipeline order:\n" + "\n".join(problems)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "quantize" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from qala.train import run\n    from .. import search\n    import qala.answer\n")
    assert qala_imports(probe, root=tmp_path) == {"qala.train", "qala", "qala.search", "qala.answer"}


def test_public_api():
    """`from qala import QAModel` gives the serving class (QalaModel stays its alias); `import qala` alone
    loads neither torch nor transformers."""
    code = (
        "import sys, qala; heavy = sorted({'torch', 'transformers'} & set(sys.modules)); "
        "from qala import QAModel, QalaModel; import qala.answer; "
        "assert QAModel is QalaModel is qala.answer.QalaModel; "
        "assert callable(QAModel.from_pretrained) and callable(QAModel.answer); print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"`import qala` imported {done.stdout.strip()}"
    assert "QAModel" in qala.__all__ and "QAModel" in dir(qala)
