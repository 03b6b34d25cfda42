"""COVID-QA (deepset's SQuAD-format file) through `python -m qala.evaluate --skip-invalid`: a real-world file
with integer ids, no titles, ~20k-character contexts and answer offsets that do not match their text.

    python benchmarks/covid_qa.py /path/to/200423_covidQA.json [--model DIR] [--out benchmarks/results/covid_qa.json]

Runs the evaluation as a user would (a child process) and writes one JSON: questions in the file and kept,
windows, EM/F1, wall time, the child's peak RSS, the command, CPU model and versions. The file is read
where it is; it is never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from qala.utils import atomic_write_json, environment_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "minilm-lat-squad-offline"


def count_questions(path: Path) -> int:
    """Every question object in the file, valid or not: the denominator of 'kept'."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return sum(len(paragraph["qas"]) for article in data for paragraph in article["paragraphs"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="COVID-QA's SQuAD-format JSON file")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a qala model directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=None, help="the first N kept questions (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "covid_qa.json")
    args = parser.parse_args()

    command = [sys.executable, "-m", "qala.evaluate", str(args.model), str(args.data), "--skip-invalid"]
    command += ["--batch-size", str(args.batch_size)] + (
        ["--max-samples", str(args.max_samples)] if args.max_samples else []
    )
    started = time.perf_counter()
    child = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        print(f"error: {' '.join(command)} exited with {child.returncode}", file=sys.stderr)
        return child.returncode
    metrics = json.loads(child.stdout.strip().splitlines()[-1])
    # The largest resident set of any waited-for child (KiB on Linux): the evaluation is the only one.
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"data": str(args.data), "model": str(args.model), "command": " ".join(command[1:])}
    result.update(questions_in_file=count_questions(args.data), questions_kept=metrics["n"], windows=metrics["windows"])
    result.update(exact_match=round(metrics["exact_match"], 2), f1=round(metrics["f1"], 2))
    # evaluate_seconds: predictions and scoring, as qala.evaluate reports them; wall_seconds: the whole command.
    result.update(evaluate_seconds=metrics["seconds"], wall_seconds=round(wall, 1), peak_rss_mib=round(peak_rss_mib))
    result.update(batch_size=args.batch_size, environment=environment_info())
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
