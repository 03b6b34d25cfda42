"""What a benchmark run reports: batch summaries, derived columns, markdown tables and plots of both tables
(padded: speedups against BERT-base, % of GEMM peak; real questions: per question, end to end). The tables
quoted in README.md and docs/ are generated here from the result files, never typed:

    python -m qala.bench.report questions [FILE] [--all]     # the headline table of a real_questions.json
    python -m qala.bench.report int8 OUT NAME=report.json ... [--sensitivity FILE] [note:NAME=TEXT ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qala.bench.plan import REFERENCE_ID, config_slug
from qala.utils import latency_stats


def summarize(seconds: Sequence[float], batch_size: int) -> dict[str, Any]:
    """One batch size of a padded row: qala.utils.latency_stats, with throughput named samples_per_s."""
    if not seconds:
        raise ValueError("no timed calls to summarize")
    stats = latency_stats(seconds, batch_size)
    throughput = stats.pop("per_second")
    return {"batch_size": batch_size, **stats, "samples_per_s": throughput}


def add_derived(rows: list[dict[str, Any]], peaks: Mapping[str, Any] | None) -> None:
    """Derived columns, in place. Padded rows (`batches`): throughput speedups against the BERT-base row of the same
    run, GMAC/s and the fraction of their dtype's GEMM peak per batch size. Unpadded rows: their GMAC/s on real
    tokens against the INT8 GEMM peak (the machine's highest)."""
    reference = next((r for r in rows if r["id"] == REFERENCE_ID and r.get("status") == "ok"), None)
    ref = {str(b): m["samples_per_s"] for b, m in reference["batches"].items()} if reference else None
    for row in (r for r in rows if r.get("status") == "ok"):
        if "batches" not in row:
            if row.get("achieved_gmacs_per_s") is not None:
                peak = peak_of(peaks, "int8")
                row["int8_peak_fraction"] = round(row["achieved_gmacs_per_s"] / peak, 4) if peak else None
            continue
        throughput = {str(b): m["samples_per_s"] for b, m in row["batches"].items()}
        row["speedup_vs_bert_base"] = (
            None if ref is None else {b: round(t / ref[b], 3) for b, t in throughput.items() if ref.get(b)}
        )
        if macs := row.get("macs_per_sample"):
            row["achieved_gmacs_per_s"] = {b: round(macs * t / 1e9, 3) for b, t in throughput.items()}
            peak = peak_of(peaks, row["dtype"])
            row["peak_fraction"] = (
                {b: round(g / peak, 4) for b, g in row["achieved_gmacs_per_s"].items()} if peak else None
            )


def peak_of(peaks: Mapping[str, Any] | None, dtype: str) -> float | None:
    """The measured GEMM peak (GMAC/s) a row of this dtype is compared with."""
    return (peaks or {}).get(f"{'int8' if dtype == 'int8' else 'fp32'}_gmacs_per_s")


def fmt(value: Any, digits: int = 1, suffix: str = "", kind: str = "f") -> str:
    """A table cell: unknown values are dashes, never zeros. kind "%": a fraction shown as a percentage."""
    if value is None:
        return "-"
    return f"{value:,.{digits}{kind}}{suffix}"


def _markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in lines]


# A table is a list of columns: (header, cell(row) -> text).
Column = tuple[str, Callable[[Mapping[str, Any]], str]]


def is_padded(document: Mapping[str, Any]) -> bool:
    """Whether a result file is the padded table (its method counts windows, the questions table's questions)."""
    return "questions" not in document.get("method", {})


def padded_columns(document: Mapping[str, Any]) -> list[Column]:
    """The padded table in the paper's shape: F1, sizes, per batch size samples/s, the roofline, speedups."""
    sizes = [str(b) for b in document["method"]["batch_sizes"]]
    first, last = sizes[0], sizes[-1]

    def f1(row: Mapping[str, Any]) -> str:
        return fmt(row.get("f1"), 2) + (" (published)" if row.get("f1") is not None and row.get("f1_published") else "")

    def size(row: Mapping[str, Any]) -> str:
        mb = fmt(row["size_bytes"] / 1e6 if row.get("size_bytes") else None, 1)
        return mb + (" (params)" if row.get("size_kind") == "parameter_bytes" else "")

    def batch(b: str, key: str, header: str, digits: int) -> Column:
        return header, lambda r: fmt(r["batches"].get(b, {}).get(key), digits)

    def speedup(b: str) -> Column:
        return f"speedup b{b}", lambda r: fmt((r.get("speedup_vs_bert_base") or {}).get(b), 2, "x")

    return [
        ("model", lambda r: r["name"]),
        ("dtype", lambda r: r["dtype"]),
        ("length config", lambda r: ",".join(map(str, r["length_config"])) if r.get("length_config") else "full"),
        ("size MB", size),
        ("F1", f1),
        batch(first, "p50_ms", f"b{first} p50 ms", 1),
        *[batch(b, "samples_per_s", f"samples/s b{b}", 2) for b in sizes],
        ("GMACs/sample", lambda r: fmt(r["macs_per_sample"] / 1e9 if r.get("macs_per_sample") else None, 2)),
        (f"% of peak b{last}", lambda r: fmt((r.get("peak_fraction") or {}).get(last), 1, kind="%")),
        speedup(first),
        speedup(last),
    ]


QUESTIONS_COLUMNS: list[Column] = [
    ("engine", lambda r: r["engine"] + (f" ({r['backend']})" if r.get("backend") else "")),
    ("model", lambda r: r["name"]),
    ("dtype", lambda r: r["dtype"]),
    ("length config", lambda r: config_slug(r.get("length_config"), r.get("length_mode") or "absolute")),
    ("batch", lambda r: str(r["batch_size"])),
    ("F1", lambda r: fmt(r.get("f1"), 2)),
    ("ms/question p50", lambda r: fmt(r.get("ms_p50"), 2)),
    ("p90", lambda r: fmt(r.get("ms_p90"), 2)),
    ("questions/s", lambda r: fmt(r.get("questions_per_s"), 1)),
    ("GMAC/s (real tokens)", lambda r: fmt(r.get("achieved_gmacs_per_s"), 1)),
    ("% of INT8 peak", lambda r: fmt(r.get("int8_peak_fraction"), 1, kind="%")),
]


def format_table(document: Mapping[str, Any]) -> str:
    """Markdown of a result file, either table: one line per measured row, its columns, how it was measured, then
    the rows that failed."""
    columns = padded_columns(document) if is_padded(document) else QUESTIONS_COLUMNS
    lines = [[cell(row) for _, cell in columns] for row in document["rows"] if row.get("status") == "ok"]
    m = document.get("method", {})
    if is_padded(document):
        sizes = m["batch_sizes"]
        notes = [
            "",
            f"Threads per row: {m['threads']}; batch {sizes[0]} latency from {m['latency_repeats']} timed calls, "
            f"other batches the median of up to {m['repeats']} after {m['warmup']} warm-up calls. "
            "Speedups are throughput ratios against BERT-base fp32 measured in the same run.",
        ]
    else:
        notes = ["", m["summary"]] if m.get("summary") else []
        notes += [m["rounds_statistic"]] if m.get("rounds_statistic") else []
    failed = [r for r in document["rows"] if r.get("status") != "ok"]
    notes += [f"- {r['id']}: {r.get('status')}: {str(r.get('error', ''))[:200]}" for r in failed]
    return "\n".join(_markdown([header for header, _ in columns], lines) + notes) + "\n"


def figure(size: tuple[float, float] = (7, 4.5), rows: int = 1) -> tuple[Any, Any]:
    """(figure, axes: one, or `rows` sharing x) of matplotlib's Figure API: no pyplot state, safe in any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, sharex=True)


def save_figure(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)


def _scatter(path: str | Path, groups: Sequence[tuple[str, str, list]], xlabel: str, ylabel: str, size: int) -> bool:
    """Log-x scatter of (label, marker, [(x, y, annotation), ...]) groups; False when there is nothing to plot."""
    groups = [g for g in groups if g[2]]
    if not groups:
        return False
    fig, ax = figure()
    for label, marker, points in groups:
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], marker=marker, label=label)
        for x, y, text in points:
            ax.annotate(text, (x, y), fontsize=size)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_f1(document: Mapping[str, Any], path: str | Path) -> bool:
    """F1 versus speed of every row with an F1: padded rows at their speedup against BERT-base at the largest batch
    (one marker per dtype), unpadded rows at questions/s end to end (one marker per batch size)."""
    rows = [r for r in document["rows"] if r.get("status") == "ok" and r.get("f1") is not None]
    if is_padded(document):
        last = str(document["method"]["batch_sizes"][-1])
        rows = [r for r in rows if (r.get("speedup_vs_bert_base") or {}).get(last)]

        def point(r: Mapping[str, Any]) -> tuple[float, float, str]:
            return r["speedup_vs_bert_base"][last], r["f1"], r["name"] + (" *" if r.get("f1_published") else "")

        groups = [(d, mark, [point(r) for r in rows if r["dtype"] == d]) for d, mark in (("fp32", "o"), ("int8", "s"))]
        xlabel = f"throughput speedup vs BERT-base fp32, batch {last}"
        return _scatter(path, groups, xlabel, "SQuAD F1 (* published)", 7)

    def where(r: Mapping[str, Any]) -> tuple[float, float, str]:
        slug = config_slug(r.get("length_config"), r.get("length_mode") or "")
        return r["questions_per_s"], r["f1"], f"{r['engine']} {r['dtype']} {slug}"

    batches = zip(sorted({r["batch_size"] for r in rows}), "osD^v", strict=False)
    groups = [(f"batch {b}", mark, [where(r) for r in rows if r["batch_size"] == b]) for b, mark in batches]
    xlabel = "questions/s, end to end (tokenization, all windows, post-processing)"
    return _scatter(path, groups, xlabel, f"F1 on the same {document['method'].get('questions', '')} questions", 6)


def plot_throughput_vs_cores(document: Mapping[str, Any], path: str | Path) -> bool:
    sweep = [s for s in (document.get("core_sweep") or {}).get("runs", []) if s.get("status") == "ok"]
    if not sweep:
        return False
    fig, ax = figure()
    for row_id, n in dict.fromkeys((s["row"], s["ninstances"]) for s in sorted(sweep, key=lambda s: s["ninstances"])):
        runs = sorted((s for s in sweep if (s["row"], s["ninstances"]) == (row_id, n)), key=lambda s: s["total_cores"])
        label = f"{row_id} ({n} instance{'s' if n > 1 else ''})"
        ax.plot(
            [s["total_cores"] for s in runs],
            [s["total_samples_per_s"] for s in runs],
            "o-" if n == 1 else "s--",
            label=label,
        )
    ax.set_xlabel("cores")
    ax.set_ylabel(f"samples/s, batch {document['core_sweep']['batch_size']}")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


# --------------------------------------------------------------------------- tables quoted in README.md and docs/

HEADLINE_FILE = Path("benchmarks/results/bench/real_questions.json")
ENGINE_NAMES = {"transformers": "transformers", "onnxruntime": "ONNX Runtime", "ipex": "IPEX 2.8"}
INT8_GOAL = 0.01  # relative F1 loss allowed against fp32 (issue 11)


def _date_of(document: Mapping[str, Any], path: Path) -> str:
    if document.get("date"):  # else the date git last committed the file, said as such
        return str(document["date"])
    log = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], capture_output=True, text=True)
    return f"{log.stdout.strip() or 'unknown'} (committed; the file records no date)"


def _what_runs(row: Mapping[str, Any]) -> str:
    if row["engine"] == "qala":  # a row without a serving backend runs load_model (eager fp32, compiled INT8)
        engine = f"qala `{row['backend']}`" if row.get("backend") else "qala (load_model)"
    else:
        engine = ENGINE_NAMES.get(row["engine"], row["engine"])
    if row.get("attn_implementation"):
        engine += f" ({row['attn_implementation']})"
    if row["name"] == "BERT-base":
        return f"{engine} BERT-base, random weights"
    return f"{engine} `quantize_dynamic`" if row["engine"] == "onnxruntime" and row["dtype"] == "int8" else engine


def _configuration(row: Mapping[str, Any]) -> str:
    lengths = row.get("length_config")
    if lengths is None:
        return "full"
    text = ",".join(f"{x:g}" for x in lengths)
    return f"keep `[{text}]`" if row.get("length_mode") == "ratio" else f"lc `[{text}]`, padded 384"


# The headline's columns read a batch-1 row and its batch-32 twin ({} when there is none).
HEADLINE_COLUMNS: list[tuple[str, Callable[[Mapping[str, Any], Mapping[str, Any]], str]]] = [
    ("what runs", lambda b1, b32: _what_runs(b1)),
    ("dtype", lambda b1, b32: b1["dtype"]),
    ("configuration", lambda b1, b32: _configuration(b1)),
    ("F1 b1 / b32", lambda b1, b32: " / ".join(fmt(r.get("f1"), 2) for r in (b1, b32))),  # "-": random weights
    ("b1 ms/q p50 / p90", lambda b1, b32: f"{b1['ms_p50']:.1f} / {b1['ms_p90']:.1f}"),
    ("b1 q/s", lambda b1, b32: f"{b1['questions_per_s']:.1f}"),
    ("b32 q/s", lambda b1, b32: f"{b32['questions_per_s']:.1f}" if b32 else "-"),
]


def format_headline_table(document: Mapping[str, Any], path: Path, padded: bool = False) -> str:
    """README's headline table of a real_questions.json: one line per row at batch 1 beside its batch-32 twin,
    after a line saying which questions, model, CPU, versions and date. Unpadded rows only (what a user gets);
    `padded` adds the paper's absolute configurations, every window padded to 384."""
    models = sorted({r["path"] for r in document["rows"] if r.get("path")})
    method, versions = document["method"], document["versions"]
    title = (
        f"{method['questions']} questions of `{method['data']}`; model(s) {', '.join(f'`{m}`' for m in models)}; "
        f"{document['cpu']}, {method['threads']} threads; torch {versions['torch']}, "
        f"onnxruntime {versions.get('onnxruntime', '-')}; date {_date_of(document, path)}; from `{path}`.\n"
    )
    by_id = {r["id"]: r for r in document["rows"] if r.get("status") == "ok"}
    pairs = [
        (b1, by_id.get(key.removesuffix("/b1") + "/b32") or {})
        for key, b1 in by_id.items()
        if key.endswith("/b1") and (padded or b1.get("length_mode") != "absolute")
    ]
    lines = [[cell(b1, b32) for _, cell in HEADLINE_COLUMNS] for b1, b32 in pairs]
    return "\n".join([title, *_markdown([header for header, _ in HEADLINE_COLUMNS], lines)]) + "\n"


def int8_comparison(
    reports: Mapping[str, Path], notes: Mapping[str, str] | None = None, sensitivity: Path | None = None
) -> dict[str, Any]:
    """The tune reports of several INT8 approaches on the same fp32 model, side by side: per configuration the
    fp32 scores and each approach's INT8 scores, loss against the goal and latency; each report's resolved
    recipe (recipe.yaml beside it) embedded, so seeds and every setting travel with the numbers."""
    import yaml

    from qala.tune import read_report

    loaded = {name: json.loads(path.read_text()) for name, path in reports.items()}
    tables = {name: read_report(path) for name, path in reports.items()}
    rows = {}
    for config, fp32 in next(iter(tables.values())).items():
        row = {"length_config": fp32["length_config"], "keep_ratios": fp32.get("keep_ratios"), "fp32": fp32["fp32"]}
        row["int8"] = {}
        for name, r in ((name, table[config]) for name, table in tables.items() if config in table):
            if r["fp32"] != fp32["fp32"]:
                reference = reports[next(iter(reports))]
                raise ValueError(f"{reports[name]}: fp32 scores differ from {reference}: not the same fp32 model")
            latency = {b: {k: v["median_ms"] for k, v in t.items()} for b, t in r.get("latency", {}).items()}
            loss = r["relative_f1_loss"]
            row["int8"][name] = {**r["int8"], "relative_f1_loss": loss, "within_goal": loss <= INT8_GOAL}
            row["int8"][name]["latency_ms"] = latency
        rows[config] = row
    recipes = {name: path.parent / "recipe.yaml" for name, path in reports.items()}
    return {
        "sources": {name: str(path) for name, path in reports.items()},
        "goal_relative_f1_loss": INT8_GOAL,
        "chosen": {name: r.get("chosen") for name, r in loaded.items()},
        "trials": {name: r.get("trials") for name, r in loaded.items()},
        "tuning_goal_met": {name: r.get("goal_met") for name, r in loaded.items()},
        "threads": {name: r["final"].get("threads") for name, r in loaded.items()},
        "artifact_bytes": {name: r.get("artifact_bytes") for name, r in loaded.items()},
        "notes": dict(notes or {}),
        "rows": rows,
        "sensitivity": json.loads(sensitivity.read_text()) if sensitivity else None,
        "recipes": {name: yaml.safe_load(p.read_text()) if p.is_file() else None for name, p in recipes.items()},
        "environment": next(iter(loaded.values()))["environment"],
    }


def format_int8_table(result: Mapping[str, Any]) -> str:
    """Markdown of int8_comparison: EM / F1 (loss) per approach, batch-1 and batch-32 ms when timed, sizes."""
    names = list(result["sources"])
    timed = any(r["latency_ms"] for row in result["rows"].values() for r in row["int8"].values())
    header = ["config", "fp32 F1 / EM"] + [f"{n} F1 / EM (loss)" for n in names]
    for batch in ("b1", "b32") if timed else ():
        header += [f"{batch} ms fp32"] + [f"{batch} ms {n}" for n in names]
    lines = []
    for config, row in result["rows"].items():
        cells = [config, f"{row['fp32']['f1']:.2f} / {row['fp32']['exact_match']:.2f}"]
        for r in (row["int8"].get(n) for n in names):
            cells.append(f"{r['f1']:.2f} / {r['exact_match']:.2f} ({-100 * r['relative_f1_loss']:+.2f}%)" if r else "")
        for batch in ("batch1", "batch32") if timed else ():
            fp32_ms = [r["latency_ms"][batch]["fp32_eager"] for r in row["int8"].values() if batch in r["latency_ms"]]
            cells.append(f"{fp32_ms[0]:.0f}" if fp32_ms else "")
            for r in (row["int8"].get(n) for n in names):
                cells.append(f"{r['latency_ms'][batch]['int8']:.0f}" if r and batch in r["latency_ms"] else "")
        lines.append(cells)
    table = _markdown(header, lines)
    sizes = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in result["artifact_bytes"].items() if b)
    table.append(f"\nartifact size on disk: {sizes}")
    return "\n".join(table + [f"\n{name}: {text}" for name, text in result.get("notes", {}).items()])


def main(argv: list[str] | None = None) -> int:
    from qala.utils import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m qala.bench.report", description=__doc__.split("\n\n")[0])
    tables = parser.add_subparsers(dest="table", required=True)
    headline = tables.add_parser("questions", help="README's headline table of a real_questions.json")
    headline.add_argument("file", nargs="?", type=Path, default=HEADLINE_FILE)
    headline.add_argument("--all", action="store_true", help="add the padded rows of absolute configurations")
    int8 = tables.add_parser("int8", help="qala.tune reports of INT8 approaches side by side: OUT (JSON) and a table")
    int8.add_argument("out", type=Path, help="the JSON file to write")
    int8.add_argument("reports", nargs="+", help="NAME=report.json, or note:NAME=text")
    int8.add_argument("--sensitivity", type=Path, help="a per-unit sensitivity JSON to embed")
    args = parser.parse_args(argv)
    if args.table == "questions":
        print(format_headline_table(json.loads(args.file.read_text()), args.file, padded=args.all), end="")
        return 0
    named = [item.split("=", 1) for item in args.reports]
    reports = {name: Path(path) for name, path in named if not name.startswith("note:")}
    notes = {name.removeprefix("note:"): text for name, text in named if name.startswith("note:")}
    result = int8_comparison(reports, notes, args.sensitivity)
    atomic_write_json(args.out, result)
    print(format_int8_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
