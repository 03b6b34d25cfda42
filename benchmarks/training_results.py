"""Collect a training run's stage results into one JSON file and print them as a markdown table.

python benchmarks/training_results.py runs/squad_offline benchmarks/results/train_squad_offline.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from qala.train import EVAL_NAME, read_eval, read_training_info
from qala.utils import atomic_write_json


def collect(run_dir: Path) -> dict:
    stages = {}
    for stage_dir in sorted(p for p in run_dir.iterdir() if (p / EVAL_NAME).is_file()):
        info = read_training_info(stage_dir)
        evaluation = read_eval(stage_dir)
        stages[stage_dir.name] = {
            "train_wall_seconds": info.get("wall_seconds", info.get("wall_seconds_this_run")),
            # Runs made before stage clocks were kept in checkpoints timed only the last process.
            "train_wall_covers": "whole stage"
            if "wall_seconds" in info or not info.get("resumed_from")
            else f"only the process resumed from {info['resumed_from']}",
            "global_step": info["global_step"],
            "num_train_features": info["num_train_features"],
            "train_metrics": info["train_metrics"],
            "eval_data": evaluation["data"],
            "eval": {
                name: {k: row[k] for k in ("exact_match", "f1", "n", "length_config", "seconds")}
                for name, row in evaluation["results"].items()
            },
        }
    recipe = (run_dir / "recipe.yaml").read_text()
    return {"run": str(run_dir), "recipe": recipe, "stages": stages, "environment": info["environment"]}


def markdown(result: dict) -> str:
    stages = result["stages"]
    names = list(next(iter(stages.values()))["eval"])
    lines = [
        "| stage | train wall time | " + " | ".join(f"{n} EM / F1" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for stage, row in stages.items():
        cells = [f"{row['eval'][n]['exact_match']:.2f} / {row['eval'][n]['f1']:.2f}" for n in names]
        lines.append(f"| {stage} | {row['train_wall_seconds'] / 60:.1f} min | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    result = collect(Path(sys.argv[1]))
    atomic_write_json(Path(sys.argv[2]), result)
    print(markdown(result))
