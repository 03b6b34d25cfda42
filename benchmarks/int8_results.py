"""Put the tune reports of several INT8 approaches side by side: one JSON file and one markdown table.

python benchmarks/int8_results.py benchmarks/results/int8_squad_offline.json \
    static=benchmarks/results/int8_static_squad_offline.json \
    dynamic=benchmarks/results/int8_dynamic_squad_offline.json \
    qat=benchmarks/results/int8_qat_squad_offline.json \
    "note:qat=latency measured while other processes shared the cores"

Each input is the report.json that `python -m qala.tune` wrote for one approach on the same fp32 model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qala.utils import atomic_write_json


def collect(reports: dict[str, Path], notes: dict[str, str] | None = None) -> dict[str, Any]:
    loaded = {name: json.loads(path.read_text()) for name, path in reports.items()}
    first = next(iter(loaded.values()))
    configs = list(first["final"]["rows"])
    rows = {}
    for config in configs:
        fp32 = first["final"]["rows"][config]
        row: dict[str, Any] = {"length_config": fp32["length_config"], "fp32": fp32["fp32"], "int8": {}}
        for name, report in loaded.items():
            r = report["final"]["rows"].get(config)
            if r is None:
                continue
            if r["fp32"] != fp32["fp32"]:
                reference = reports[next(iter(reports))]
                raise ValueError(f"{reports[name]}: fp32 scores differ from {reference}: not the same fp32 model")
            latency = r["latency"]
            row["int8"][name] = {
                **r["int8"],
                "relative_f1_loss": r["relative_f1_loss"],
                "latency_ms": {b: {k: v["median_ms"] for k, v in t.items()} for b, t in latency.items()},
            }
        rows[config] = row
    return {
        "sources": {name: str(path) for name, path in reports.items()},
        "threads": {name: r["final"].get("threads") for name, r in loaded.items()},
        "artifact_bytes": {name: r.get("artifact_bytes") for name, r in loaded.items()},
        "notes": notes or {},
        "rows": rows,
        "environment": first.get("environment"),
    }


def markdown(result: dict[str, Any]) -> str:
    names = list(result["sources"])
    head = "| config | fp32 F1 / EM | " + " | ".join(f"{n} F1 / EM (loss)" for n in names)
    head += " | b1 ms fp32 | " + " | ".join(f"b1 ms {n}" for n in names)
    head += " | b32 ms fp32 | " + " | ".join(f"b32 ms {n}" for n in names) + " |"
    lines = [head, "|---" * (2 + 3 * len(names) + 2) + "|"]
    for config, row in result["rows"].items():
        cells = [config, f"{row['fp32']['f1']:.2f} / {row['fp32']['exact_match']:.2f}"]
        for n in names:
            r = row["int8"].get(n)
            cells.append(f"{r['f1']:.2f} / {r['exact_match']:.2f} ({100 * r['relative_f1_loss']:+.1f}%)" if r else "")
        for batch in ("batch1", "batch32"):
            fp32_ms = [
                r["latency_ms"][batch]["fp32_eager"] for r in row["int8"].values() if batch in r["latency_ms"]
            ]
            cells.append(f"{fp32_ms[0]:.0f}" if fp32_ms else "")
            for n in names:
                r = row["int8"].get(n)
                cells.append(f"{r['latency_ms'][batch]['int8']:.0f}" if r and batch in r["latency_ms"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\n{name}: {text}" for name, text in result.get("notes", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    out, *pairs = sys.argv[1:]
    named = [p.split("=", 1) for p in pairs]
    result = collect(
        {name: Path(path) for name, path in named if not name.startswith("note:")},
        {name[len("note:") :]: text for name, text in named if name.startswith("note:")},
    )
    atomic_write_json(Path(out), result)
    print(markdown(result))
