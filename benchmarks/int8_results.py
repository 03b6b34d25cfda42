"""Put the tune reports of several INT8 approaches side by side: one JSON file and one markdown table.

python benchmarks/int8_results.py benchmarks/results/int8_reference.json \
    static=runs/reference_int8/static/report.json \
    allint8=runs/reference_int8/allint8/report.json \
    --sensitivity runs/reference_int8/sensitivity.json \
    "note:static=..."

Each input is the report.json that `python -m qala.tune` wrote for one approach on the same fp32 model;
the resolved recipe beside it (recipe.yaml) is embedded, so seeds and every setting travel with the
numbers. `--sensitivity` adds a per-unit sensitivity file (qala.quantize.unit_sensitivity scores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from qala.tune import read_report
from qala.utils import atomic_write_json

GOAL = 0.01  # relative F1 loss allowed against fp32 (issue 11)


def collect(
    reports: dict[str, Path], notes: dict[str, str] | None = None, sensitivity: Path | None = None
) -> dict[str, Any]:
    loaded = {name: json.loads(path.read_text()) for name, path in reports.items()}
    tables = {name: read_report(path) for name, path in reports.items()}
    first = next(iter(loaded.values()))
    rows = {}
    for config, fp32 in next(iter(tables.values())).items():
        row: dict[str, Any] = {
            "length_config": fp32["length_config"],
            "keep_ratios": fp32.get("keep_ratios"),
            "fp32": fp32["fp32"],
            "int8": {},
        }
        for name, table in tables.items():
            r = table.get(config)
            if r is None:
                continue
            if r["fp32"] != fp32["fp32"]:
                reference = reports[next(iter(reports))]
                raise ValueError(f"{reports[name]}: fp32 scores differ from {reference}: not the same fp32 model")
            latency = r.get("latency", {})
            row["int8"][name] = {
                **r["int8"],
                "relative_f1_loss": r["relative_f1_loss"],
                "within_goal": r["relative_f1_loss"] <= GOAL,
                "latency_ms": {b: {k: v["median_ms"] for k, v in t.items()} for b, t in latency.items()},
            }
        rows[config] = row
    recipes = {}
    for name, path in reports.items():
        recipe = path.parent / "recipe.yaml"
        recipes[name] = yaml.safe_load(recipe.read_text()) if recipe.is_file() else None
    return {
        "sources": {name: str(path) for name, path in reports.items()},
        "goal_relative_f1_loss": GOAL,
        "chosen": {name: r.get("chosen") for name, r in loaded.items()},
        "trials": {name: r.get("trials") for name, r in loaded.items()},
        "tuning_goal_met": {name: r.get("goal_met") for name, r in loaded.items()},
        "threads": {name: r["final"].get("threads") for name, r in loaded.items()},
        "artifact_bytes": {name: r.get("artifact_bytes") for name, r in loaded.items()},
        "notes": notes or {},
        "rows": rows,
        "sensitivity": json.loads(sensitivity.read_text()) if sensitivity else None,
        "recipes": recipes,
        "environment": first["environment"],
    }


def markdown(result: dict[str, Any]) -> str:
    names = list(result["sources"])
    timed = any(r["latency_ms"] for row in result["rows"].values() for r in row["int8"].values())
    head = "| config | fp32 F1 / EM | " + " | ".join(f"{n} F1 / EM (loss)" for n in names)
    columns = 2 + len(names)
    if timed:
        head += " | b1 ms fp32 | " + " | ".join(f"b1 ms {n}" for n in names)
        head += " | b32 ms fp32 | " + " | ".join(f"b32 ms {n}" for n in names)
        columns += 2 + 2 * len(names)
    lines = [head + " |", "|---" * columns + "|"]
    for config, row in result["rows"].items():
        cells = [config, f"{row['fp32']['f1']:.2f} / {row['fp32']['exact_match']:.2f}"]
        for n in names:
            r = row["int8"].get(n)
            cells.append(f"{r['f1']:.2f} / {r['exact_match']:.2f} ({-100 * r['relative_f1_loss']:+.2f}%)" if r else "")
        for batch in ("batch1", "batch32") if timed else ():
            fp32_ms = [r["latency_ms"][batch]["fp32_eager"] for r in row["int8"].values() if batch in r["latency_ms"]]
            cells.append(f"{fp32_ms[0]:.0f}" if fp32_ms else "")
            for n in names:
                r = row["int8"].get(n)
                cells.append(f"{r['latency_ms'][batch]['int8']:.0f}" if r and batch in r["latency_ms"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in result["artifact_bytes"].items() if b)
    lines.append(f"\nartifact size on disk: {sizes}")
    lines += [f"\n{name}: {text}" for name, text in result.get("notes", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("reports", nargs="+", help="NAME=report.json, or note:NAME=text")
    parser.add_argument("--sensitivity", type=Path, help="a per-unit sensitivity JSON to embed")
    args = parser.parse_args(argv)
    named = [p.split("=", 1) for p in args.reports]
    result = collect(
        {name: Path(path) for name, path in named if not name.startswith("note:")},
        {name[len("note:") :]: text for name, text in named if name.startswith("note:")},
        args.sensitivity,
    )
    atomic_write_json(Path(args.out), result)
    print(markdown(result))


if __name__ == "__main__":
    main()
