"""Print the README's headline table (real questions) as markdown, from the benchmark's result file.

    python benchmarks/readme_table.py [--all] [FILE]     # FILE: benchmarks/results/bench/real_questions.json

Every figure comes from FILE. Unpadded rows only (what a user gets); --all adds the paper's absolute
configurations, every window padded to 384.
"""

import argparse
import json
import subprocess
from pathlib import Path

RESULT = Path("benchmarks/results/bench/real_questions.json")
ENGINES = {"transformers": "transformers", "onnxruntime": "ONNX Runtime", "ipex": "IPEX 2.8"}


def date_of(document: dict, path: Path) -> str:
    if document.get("date"):  # else the date git last committed the file, said as such
        return str(document["date"])
    log = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], capture_output=True, text=True)
    return f"{log.stdout.strip() or 'unknown'} (committed; the file records no date)"


def label(row: dict) -> str:
    engine = f"qala `{row['backend']}`" if row["engine"] == "qala" else ENGINES.get(row["engine"], row["engine"])
    if row.get("attn_implementation"):
        engine += f" ({row['attn_implementation']})"
    if row["name"] == "BERT-base":
        return f"{engine} BERT-base, random weights"
    return f"{engine} `quantize_dynamic`" if row["engine"] == "onnxruntime" and row["dtype"] == "int8" else engine


def configuration(row: dict) -> str:
    lengths = row.get("length_config")
    if lengths is None:
        return "full"
    text = ",".join(f"{x:g}" for x in lengths)
    return f"keep `[{text}]`" if row.get("length_mode") == "ratio" else f"lc `[{text}]`, padded 384"


def f1(row: dict | None) -> str:  # "-": random weights, speed only
    return "-" if row is None or row.get("f1") is None else f"{row['f1']:.2f}"


def table(document: dict, padded: bool) -> list[str]:
    by_id = {r["id"]: r for r in document["rows"] if r.get("status") == "ok"}
    lines = [
        "| what runs | dtype | configuration | F1 b1 / b32 | b1 ms/q p50 / p90 | b1 q/s | b32 q/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, b1 in by_id.items():
        if not key.endswith("/b1") or (b1.get("length_mode") == "absolute" and not padded):
            continue
        b32 = by_id.get(key.removesuffix("/b1") + "/b32")
        cells = [label(b1), b1["dtype"], configuration(b1), f"{f1(b1)} / {f1(b32)}"]
        b32_qps = "-" if b32 is None else f"{b32['questions_per_s']:.1f}"
        cells += [f"{b1['ms_p50']:.1f} / {b1['ms_p90']:.1f}", f"{b1['questions_per_s']:.1f}", b32_qps]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=RESULT)
    parser.add_argument("--all", action="store_true", help="add the padded rows of absolute configurations")
    args = parser.parse_args(argv)
    document = json.loads(args.file.read_text())
    models = sorted({r["path"] for r in document["rows"] if r.get("path")})
    method, versions = document["method"], document["versions"]
    print(
        f"{method['questions']} questions of `{method['data']}`; model(s) {', '.join(f'`{m}`' for m in models)}; "
        f"{document['cpu']}, {method['threads']} threads; torch {versions['torch']}, "
        f"onnxruntime {versions.get('onnxruntime', '-')}; date {date_of(document, args.file)}; from `{args.file}`.\n"
    )
    print("\n".join(table(document, args.all)))


if __name__ == "__main__":
    main()
