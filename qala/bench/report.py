"""What a benchmark run reports: batch summaries, derived columns, markdown tables and plots.

Two tables: the padded one (windows padded to max_seq_length, the paper's view: speedups against
BERT-base, % of GEMM peak) and the real-questions one (end to end per question, unpadded windows;
qala.bench.questions). Plots use matplotlib's Figure API (no pyplot state), as qala.search does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """Speedups against the BERT-base row of the same run and the roofline columns, in place."""
    reference = next((r for r in rows if r["id"] == REFERENCE_ID and r.get("status") == "ok"), None)
    for row in rows:
        if row.get("status") != "ok":
            continue
        throughput = {str(b): m["samples_per_s"] for b, m in row["batches"].items()}
        if reference is not None:
            ref = {str(b): m["samples_per_s"] for b, m in reference["batches"].items()}
            row["speedup_vs_bert_base"] = {b: round(t / ref[b], 3) for b, t in throughput.items() if ref.get(b)}
        else:
            row["speedup_vs_bert_base"] = None
        macs = row.get("macs_per_sample")
        if macs:
            row["achieved_gmacs_per_s"] = {b: round(macs * t / 1e9, 3) for b, t in throughput.items()}
            peak = peak_of(peaks, row["dtype"])
            row["peak_fraction"] = (
                {b: round(g / peak, 4) for b, g in row["achieved_gmacs_per_s"].items()} if peak else None
            )


def peak_of(peaks: Mapping[str, Any] | None, dtype: str) -> float | None:
    """The measured GEMM peak (GMAC/s) a row of this dtype is compared with."""
    return (peaks or {}).get(f"{'int8' if dtype == 'int8' else 'fp32'}_gmacs_per_s")


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """A table cell: unknown values are dashes, never zeros."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in lines]


def _failures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    failed = [r for r in rows if r.get("status") != "ok"]
    return [f"- {r['id']}: {r.get('status')}: {str(r.get('error', ''))[:200]}" for r in failed]


def format_table(document: Mapping[str, Any]) -> str:
    """Markdown table in the paper's shape: one line per measured row."""
    sizes = [str(b) for b in document["method"]["batch_sizes"]]
    first, last = sizes[0], sizes[-1]
    header = (
        ["model", "dtype", "length config", "size MB", "F1", f"b{first} p50 ms"]
        + [f"samples/s b{b}" for b in sizes]
        + ["GMACs/sample", f"% of peak b{last}", f"speedup b{first}", f"speedup b{last}"]
    )
    lines = []
    for row in document["rows"]:
        if row.get("status") != "ok":
            continue
        f1 = fmt(row.get("f1"), 2)
        if row.get("f1") is not None and row.get("f1_published"):
            f1 += " (published)"
        lengths = "full" if row.get("length_config") is None else ",".join(map(str, row["length_config"]))
        size = fmt((row.get("size_bytes") or 0) / 1e6 if row.get("size_bytes") else None, 1)
        if row.get("size_kind") == "parameter_bytes":
            size += " (params)"
        batches = row["batches"]
        speed = row.get("speedup_vs_bert_base") or {}
        peak = (row.get("peak_fraction") or {}).get(last)
        lines.append(
            [
                row["name"],
                row["dtype"],
                lengths,
                size,
                f1,
                fmt(batches.get(first, {}).get("p50_ms"), 1),
                *[fmt(batches.get(b, {}).get("samples_per_s"), 2) for b in sizes],
                fmt(row["macs_per_sample"] / 1e9 if row.get("macs_per_sample") else None, 2),
                fmt(peak * 100 if peak is not None else None, 1, "%"),
                fmt(speed.get(first), 2, "x"),
                fmt(speed.get(last), 2, "x"),
            ]
        )
    m = document["method"]
    notes = [
        "",
        f"Threads per row: {m['threads']}; batch {first} latency from {m['latency_repeats']} timed calls, other "
        f"batches the median of up to {m['repeats']} after {m['warmup']} warm-up calls. "
        "Speedups are throughput ratios against BERT-base fp32 measured in the same run.",
    ]
    return "\n".join(_markdown(header, lines) + notes + _failures(document["rows"])) + "\n"


def format_questions_table(document: Mapping[str, Any]) -> str:
    """Markdown table of the real-questions run: one line per (row, batch size)."""
    header = [
        "engine",
        "model",
        "dtype",
        "length config",
        "batch",
        "F1",
        "ms/question p50",
        "p90",
        "questions/s",
        "GMAC/s (real tokens)",
        "% of INT8 peak",
    ]
    lines = []
    for row in document["rows"]:
        if row.get("status") != "ok":
            continue
        fraction = row.get("int8_peak_fraction")
        lines.append(
            [
                row["engine"] + (f" ({row['backend']})" if row.get("backend") else ""),
                row["name"],
                row["dtype"],
                config_slug(row.get("length_config"), row.get("length_mode") or "absolute"),
                str(row["batch_size"]),
                fmt(row.get("f1"), 2),
                fmt(row.get("ms_p50"), 2),
                fmt(row.get("ms_p90"), 2),
                fmt(row.get("questions_per_s"), 1),
                fmt(row.get("achieved_gmacs_per_s"), 1),
                fmt(fraction * 100 if fraction is not None else None, 1, "%"),
            ]
        )
    m = document.get("method", {})
    notes = ["", m.get("summary", "")] if m.get("summary") else []
    return "\n".join(_markdown(header, lines) + notes + _failures(document["rows"])) + "\n"


def add_questions_derived(rows: list[dict[str, Any]], peaks: Mapping[str, Any] | None) -> None:
    """GMAC/s on real tokens against the measured INT8 GEMM peak (the machine's highest), in place."""
    peak = peak_of(peaks, "int8")
    for row in rows:
        if row.get("status") == "ok" and row.get("achieved_gmacs_per_s") is not None:
            row["int8_peak_fraction"] = round(row["achieved_gmacs_per_s"] / peak, 4) if peak else None


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)


def plot_f1_vs_speedup(document: Mapping[str, Any], path: str | Path) -> bool:
    """F1 versus speedup (largest batch) of every row that has both; False when there is nothing to plot."""
    last = str(document["method"]["batch_sizes"][-1])
    points = [
        (r["speedup_vs_bert_base"][last], r["f1"], r)
        for r in document["rows"]
        if r.get("status") == "ok" and r.get("f1") is not None and (r.get("speedup_vs_bert_base") or {}).get(last)
    ]
    if not points:
        return False
    fig, ax = _figure()
    for dtype, marker in (("fp32", "o"), ("int8", "s")):
        chosen = [(x, y) for x, y, r in points if r["dtype"] == dtype]
        if chosen:
            ax.scatter([x for x, _ in chosen], [y for _, y in chosen], marker=marker, label=dtype)
    for x, y, r in points:
        ax.annotate(r["name"] + (" *" if r.get("f1_published") else ""), (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"throughput speedup vs BERT-base fp32, batch {last}")
    ax.set_ylabel("SQuAD F1 (* published)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_throughput_vs_cores(document: Mapping[str, Any], path: str | Path) -> bool:
    sweep = [s for s in (document.get("core_sweep") or {}).get("runs", []) if s.get("status") == "ok"]
    if not sweep:
        return False
    fig, ax = _figure()
    for row_id in dict.fromkeys(s["row"] for s in sweep):
        for n in sorted({s["ninstances"] for s in sweep if s["row"] == row_id}):
            runs = sorted(
                (s for s in sweep if s["row"] == row_id and s["ninstances"] == n), key=lambda s: s["total_cores"]
            )
            ax.plot(
                [s["total_cores"] for s in runs],
                [s["total_samples_per_s"] for s in runs],
                "o-" if n == 1 else "s--",
                label=f"{row_id} ({n} instance{'s' if n > 1 else ''})",
            )
    ax.set_xlabel("cores")
    ax.set_ylabel(f"samples/s, batch {document['core_sweep']['batch_size']}")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_questions(document: Mapping[str, Any], path: str | Path) -> bool:
    """F1 versus questions/s of the real-questions rows that have an F1, one marker per batch size."""
    rows = [r for r in document["rows"] if r.get("status") == "ok" and r.get("f1") is not None]
    if not rows:
        return False
    fig, ax = _figure()
    for batch, marker in zip(sorted({r["batch_size"] for r in rows}), "osD^v", strict=False):
        chosen = [r for r in rows if r["batch_size"] == batch]
        ax.scatter(
            [r["questions_per_s"] for r in chosen], [r["f1"] for r in chosen], marker=marker, label=f"batch {batch}"
        )
        for r in chosen:
            label = f"{r['engine']} {r['dtype']} {config_slug(r.get('length_config'), r.get('length_mode') or '')}"
            ax.annotate(label, (r["questions_per_s"], r["f1"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("questions/s, end to end (tokenization, all windows, post-processing)")
    ax.set_ylabel(f"F1 on the same {document['method'].get('questions', '')} questions")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True
