"""The benchmark run: plan, measure row by row in worker processes (saving after each), report.

    python -m qala.bench RECIPE.yaml [key.sub=value ...] [--resume] [--table padded|questions|all] [-v]

`padded` (default): every row on windows padded to data.max_seq_length, the paper's view, with the
roofline and a core sweep (OUTPUT_DIR/bench.json, bench.md, f1_vs_speedup.png, throughput_vs_cores.png).
`questions`: real questions end to end on unpadded windows (OUTPUT_DIR/real_questions.json, .md, .png).
Both run through one Harness (a row's `padded` flag says which measurement its worker makes): a killed run
keeps every row it finished; `--resume` skips rows and the GEMM peak already measured for the same inputs
(settings, row spec, and by content the models). With benchmark.rounds > 1 the questions table measures its rows
round-robin that many times and reports each row's median round (measure_rounds). One run per OUTPUT_DIR at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qala.bench import plan, report

logger = logging.getLogger(__name__)

# Per table: (result file, markdown table, F1 plot).
FILES = {
    "padded": ("bench.json", "bench.md", "f1_vs_speedup.png"),
    "questions": ("real_questions.json", "real_questions.md", "real_questions.png"),
}
INPUTS_NAME = "inputs.safetensors"


def _tail(text: str, lines: int = 15) -> str:
    """The last lines of a worker's stderr, the exception line first (tables show an error's start)."""
    kept = [line for line in text.splitlines() if line.strip() and "Failed to load" not in line]
    return "\n".join([kept[-1], *kept[-lines:-1]]) if kept else ""


def run_worker(spec: Mapping[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run one row in a fresh process (under spec["python"] when given); a failure becomes the row's status and
    error, never an exception."""
    from qala.utils import atomic_write_json

    python = spec.get("python")
    if python and not Path(python).is_file():
        return {"status": "failed", "error": f"python not found: {python} (the environment this row runs in)"}
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = work_dir / "spec.json", work_dir / "result.json"
    atomic_write_json(spec_file, spec)
    out_file.unlink(missing_ok=True)
    command = [python or sys.executable, "-m", "qala.bench.worker", str(spec_file), str(out_file)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        return {"status": "failed", "error": _tail(proc.stderr) or f"exit status {proc.returncode}"}
    return {"status": "ok", **json.loads(out_file.read_text())}


def _libraries_found(names: Sequence[str]) -> bool:
    """Whether run_cpu would find one of these shared libraries (it searches the same folders)."""
    folders = [Path(sys.prefix) / "lib", Path.home() / ".local/lib", Path("/usr/local/lib"), Path("/usr/local/lib64")]
    folders += [Path("/usr/lib"), Path("/usr/lib64"), Path("/usr/lib/x86_64-linux-gnu")]
    return any((folder / name).exists() for folder in folders for name in names)


def run_cpu_command(
    spec_file: str | Path,
    out_dir: str | Path,
    *,
    ninstances: int,
    ncores_per_instance: int,
    numactl: bool | None = None,
    iomp: bool | None = None,
    allocator: bool | None = None,
    python: str | None = None,
) -> list[str]:
    """`python -m torch.backends.xeon.run_cpu ... --no-python python -m qala.bench.worker SPEC DIR`: the launcher
    here, the worker under the row's own `python`. Features whose tools are missing (numactl, Intel OpenMP,
    tcmalloc/jemalloc) are switched off explicitly, so the launcher neither fails nor changes what is measured."""
    numactl = shutil.which("numactl") is not None if numactl is None else numactl
    iomp = _libraries_found(["libiomp5.so"]) if iomp is None else iomp
    allocator = _libraries_found(["libtcmalloc.so", "libjemalloc.so"]) if allocator is None else allocator
    cmd = [sys.executable, "-m", "torch.backends.xeon.run_cpu", "--ninstances", str(ninstances)]
    cmd += ["--ncores-per-instance", str(ncores_per_instance)]
    switches = {"--disable-numactl": numactl, "--disable-iomp": iomp, "--use-default-allocator": allocator}
    cmd += [flag for flag, found in switches.items() if not found]
    # run_cpu's own -m refuses any program not ending in .py, so the interpreter is the program instead.
    return cmd + ["--no-python", python or sys.executable, "-m", "qala.bench.worker", str(spec_file), str(out_dir)]


def environment() -> dict[str, Any]:
    """qala.utils.environment_info, with onnxruntime's version and the CPU flags."""
    from qala.utils import cpu_flags, environment_info

    env = environment_info()
    with contextlib.suppress(Exception):
        import onnxruntime

        env["versions"]["onnxruntime"] = onnxruntime.__version__
    return {**env, "cpu_flags": cpu_flags()}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


class Harness:
    """One table's run: specs (the GEMM peak, then the rows) measured one worker at a time, the document saved after
    each; resume (a spec of the same id and hash in the last run of the same fingerprint is kept, qala.stage's
    stored_record), the time budget and the GEMM peak work alike for both tables."""

    def __init__(self, recipe: Any, table: str = "padded", *, resume: bool = False) -> None:
        from qala.recipe import fingerprint
        from qala.utils import content_hash

        self.recipe, self.bench, self.table = recipe, recipe.benchmark, table
        self.out = Path(self.bench.output_dir)
        self.started = time.monotonic()
        # Rows depend on the settings and, by content, on the models: one retrained at the same path is new.
        models = [key for key in ("model", "int8_model") if getattr(self.bench, key)]
        hashes = {key: content_hash(getattr(self.bench, key)) for key in models}
        self.inputs = {"settings": plan.bench_fingerprint(recipe, table), **hashes}
        self.fingerprint = fingerprint(self.inputs)
        self.previous, self.previous_rounds = self._previous() if resume else ({}, {})
        self.document: dict[str, Any] = {"fingerprint": self.fingerprint, "inputs": self.inputs}
        self.document.update(rows=[], gemm_peak=None, budget_exhausted=False)
        self.recipe_written = False

    def _previous(self) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """The results (rows and GEMM peak) of the last run of this table when it measured the same inputs, by id;
        and the rounds it measured per row id (measure_rounds), a one-round run's row counting as its round 1."""
        from qala.stage import stored_record

        path = self.out / FILES[self.table][0]
        previous, changed = stored_record(path, self.inputs, fingerprint=self.fingerprint)
        if changed:
            logger.warning("--resume: %s was measured for other inputs (%s); measuring everything again", path, changed)
        previous = previous or {}
        results = [*previous.get("rows", []), previous.get("gemm_peak") or {}]
        kept = {r["id"]: r for r in results if r.get("status") == "ok" and "id" in r}
        rounds = dict(previous.get("round_results") or {})
        for row in previous.get("rows", []):
            if row["id"] in kept and "rounds" not in row:
                rounds.setdefault(row["id"], [row])
        return kept, rounds

    def over_budget(self) -> bool:
        limit = self.bench.time_budget_minutes
        return limit is not None and (time.monotonic() - self.started) / 60 > limit

    def skipped(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` marked skipped: nothing new starts once the time budget is spent."""
        self.document["budget_exhausted"] = True
        return {**record, "status": "skipped", "error": "time budget exhausted"}

    def save(self) -> None:
        from qala.utils import atomic_write_json, atomic_write_text

        report.add_derived(self.document["rows"], self.document.get("gemm_peak"))
        self.document["wall_seconds"] = round(time.monotonic() - self.started, 1)
        atomic_write_json(self.out / FILES[self.table][0], self.document)
        atomic_write_text(self.out / FILES[self.table][1], report.format_table(self.document))

    def result(
        self,
        spec: dict[str, Any],
        work_dir: Path,
        extra: Mapping[str, Any] = {},  # noqa: B006
        *,
        round_number: int | None = None,
    ) -> dict[str, Any]:
        """`spec` measured by a worker (with `extra` fields for the worker only), or kept from the last run
        (--resume, same spec; with `round_number`, that round of the row), or skipped past the time budget. The
        first measurement writes OUTPUT_DIR/recipe.yaml (a start that fails at once, on its inputs or plan, leaves
        the last run's record)."""
        from qala.stage import write_recipe

        digest = plan.spec_hash(spec)
        done = self.previous.get(spec["id"])
        if round_number is not None:
            earlier = self.previous_rounds.get(spec["id"], [])
            done = earlier[round_number - 1] if len(earlier) >= round_number else None
        if done and done.get("spec_hash") == digest:
            logger.info("%s: measured before (--resume), kept", spec["id"])
            return done
        if self.over_budget():
            return self.skipped(spec)
        if not self.recipe_written:
            write_recipe(self.out, self.recipe)
            self.recipe_written = True
        logger.info("%s ...", spec["id"])
        row = {**spec, "spec_hash": digest, **run_worker({**spec, **extra, "work_dir": str(work_dir)}, work_dir)}
        logger.info("%s: %s", spec["id"], _progress(row))
        return row


def _progress(row: Mapping[str, Any]) -> str:
    """One log line per measured row."""
    if row.get("status") != "ok":
        return f"{row.get('status')}: {str(row.get('error', ''))[-300:]}"
    if "batches" in row:  # padded table
        parts = [f"b{b} {m['median_ms']:.1f} ms ({m['samples_per_s']:.2f}/s)" for b, m in row["batches"].items()]
        return ", ".join(parts) + f", peak RSS {row['peak_rss_mb']:.0f} MB"
    if "questions_per_s" in row:
        return (
            f"F1 {report.fmt(row.get('f1'), 2)}, p50 {row['ms_p50']} ms/question, {row['questions_per_s']} questions/s"
        )
    return f"GEMM peak fp32 {row.get('fp32_gmacs_per_s')}, INT8 {row.get('int8_gmacs_per_s')} GMAC/s"


def write_inputs(recipe: Any, bench: Any, path: Path) -> int:
    """Tokenize the first `bench.windows` evaluation windows (padded) into a safetensors file; returns N."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from qala.data import load_split, windows
    from qala.model import batch_inputs
    from qala.quantize.load import load_tokenizer

    tokenizer = load_tokenizer(bench.model or bench.int8_model or recipe.model.tokenizer or recipe.model.name_or_path)
    data = dataclasses.replace(recipe.data, max_eval_samples=recipe.data.max_eval_samples or bench.windows)
    tensors = batch_inputs(windows(load_split(data, "eval"), tokenizer, data, train=False)[: bench.windows])
    tensors.setdefault("token_type_ids", torch.zeros_like(tensors["input_ids"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors["input_ids"].size(0)


def _method(recipe: Any, padded: bool, threads: int, windows: int | None) -> dict[str, Any]:
    """How a table's rows were measured, as its result file records it."""
    b, d = recipe.benchmark, recipe.data
    method = {"data": d.eval, "batch_sizes": list(b.batch_sizes), "threads": threads}
    if padded:
        method.update(windows=windows, seq_length=d.max_seq_length, instances=1)
        method.update({key: getattr(b, key) for key in plan.TIMING})
        method["statistic"] = (
            "qala.utils.time_calls / latency_stats: median of timed calls per batch size; batch-1 latency p50/p90/p99 "
            "over latency_repeats calls cycling through the windows; throughput = batch / median; one worker process "
            "per row"
        )
        return {
            **method,
            "peak_memory": "VmHWM of the row's worker process (imports, model load, compilation and runs)",
        }
    summary = (
        f"End to end per request of `batch` questions (tokenization, every window, post-processing), "
        f"windows unpadded and batched to the longest window of the request (qala rows: sorted by length, "
        f"one call per 32-token group); {threads} threads, one worker process per row; ms/question = request "
        f"time / its questions; questions/s = questions / summed request time; F1 from the answers of the timed "
        f"pass; GMAC/s on real tokens against the measured INT8 GEMM peak. Warm-up: {b.warmup} untimed "
        "requests, plus every request shape once for compiled rows."
    )
    timer = "qala.utils.time_calls (one timed call per request) and qala.utils.latency_stats"
    questions = d.max_eval_samples if d.max_eval_samples is not None else "all"
    method.update(warmup=b.warmup, summary=summary, timer=timer, rounds=b.rounds)
    if b.rounds > 1:
        method["rounds_statistic"] = (
            f"every row measured {b.rounds} times, round-robin (round 1: every row, then round 2: every row, ...), "
            "a fresh worker per measurement, so drift during the run hits every row alike; each row reports the "
            "round of median questions/s (the lower median for an even count), every timing field from that round, "
            "with each round's questions/s in questions_per_s_rounds (a row cut by the time budget: the rounds it "
            "measured, `rounds`)"
        )
    return {"questions": questions, **method}


def run_table(
    recipe: Any, table: str = "padded", *, resume: bool = False, pad_multiple: int | None = None, qala_backends=()
) -> dict[str, Any]:
    """One table: plan, GEMM peak, one worker per row, the core sweep (padded), the result file, table and plots."""
    from qala.bench.peers import RANDOM_WEIGHTS_SEED

    h, b, padded = Harness(recipe, table, resume=resume), recipe.benchmark, table == "padded"
    env, threads = environment(), b.threads or os.cpu_count() or 1
    h.out.mkdir(parents=True, exist_ok=True)
    inputs = h.out / INPUTS_NAME
    n = write_inputs(recipe, b, inputs) if padded else None
    rows, notes = plan.plan_rows(recipe, table, pad_multiple=pad_multiple, qala_backends=qala_backends)
    # "cpu" and the (UTC) start first: machines differ between sessions, and every figure is for this one.
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    h.document = {"cpu": env["cpu"], "date": date, **h.document, "versions": env["versions"], "environment": env}
    h.document.update({"method": _method(recipe, padded, threads, n), "peers" if padded else "notes": notes})
    h.document["seeds"] = {"random_weights": RANDOM_WEIGHTS_SEED, "run": recipe.run.seed}
    h.document["seeds"].update({} if padded else {"questions": "the first N questions of the file, in order"})
    h.document.update({"core_sweep": None} if padded else {})
    if b.gemm_peak:
        spec = {"id": "gemm_peak", "kind": "gemm_peak", "threads": threads, "gemm_size": b.gemm_size}
        h.document["gemm_peak"] = h.result(spec, h.out / "work" / "gemm_peak")
        h.save()
    work, extra = h.out / "work" / ("" if padded else "questions"), {"inputs": str(inputs)} if padded else {}
    if not padded and b.rounds > 1:
        measure_rounds(h, rows, work, b.rounds)
    else:
        for i, spec in enumerate(rows, 1):
            logger.info("[%d/%d]", i, len(rows))
            h.document["rows"].append(h.result(spec, work / _slug(spec["id"]), extra))
            h.save()
    if padded and b.core_sweep:
        h.document["core_sweep"] = core_sweep(h, rows, inputs)
    h.save()
    report.plot_f1(h.document, h.out / FILES[table][2])
    if padded:
        report.plot_throughput_vs_cores(h.document, h.out / "throughput_vs_cores.png")
    return h.document


def measure_rounds(h: Harness, rows: list[dict[str, Any]], work: Path, rounds: int) -> None:
    """The questions table's rows measured `rounds` times round-robin (round 1: every row, round 2: every row,
    ...), a fresh worker each time: the machine's drift over the run then hits every row alike instead of landing
    in the ratio of two rows measured minutes apart. The document (saved after each measurement) holds one row per
    spec (median_round) and every measured round under round_results, so --resume goes on at the rounds missing.
    A row that fails stops there (status failed, that round's error); one cut by the time budget keeps the rounds
    it measured."""
    measured: dict[str, list[dict[str, Any]]] = h.document.setdefault("round_results", {})
    for number in range(1, rounds + 1):
        for i, spec in enumerate(rows):
            done = measured.setdefault(spec["id"], [])
            if len(done) < number - 1:  # failed or skipped in an earlier round: the row is final
                continue
            logger.info("round %d/%d, [%d/%d]", number, rounds, i + 1, len(rows))
            record = h.result(spec, work / _slug(spec["id"]), round_number=number)
            if record.get("status") == "ok":  # the round alone: the spec is the row's, once
                done.append({key: value for key, value in record.items() if key not in spec})
            if record.get("status") == "failed":
                row = {**record, "failed_round": number}
            else:
                row = median_round(spec, done) if done else record
            if number == 1:
                h.document["rows"].append(row)
            else:
                h.document["rows"][i] = row
            h.save()


def median_round(spec: Mapping[str, Any], measured: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from its measured rounds: every timing field (and the rest of the worker's record) from the round
    of median questions/s, each round's questions/s beside it in round order. An even count takes the lower
    median: a figure one worker measured, never the mean of two, and the slower of the middle two. F1 is the
    median round's; every round's F1 is kept only where they differ (an engine that is not deterministic)."""
    by_speed = sorted(measured, key=lambda m: m["questions_per_s"])  # stable: ties keep round order
    row = {**spec, **by_speed[(len(measured) - 1) // 2], "rounds": len(measured)}
    row["questions_per_s_rounds"] = [m["questions_per_s"] for m in measured]
    f1 = [m.get("f1") for m in measured]
    if len(set(f1)) > 1:
        row["f1_rounds"] = f1
    return row


def core_sweep(h: Harness, rows: list[dict[str, Any]], inputs: Path) -> dict[str, Any]:
    """Throughput at sweep_batch_size versus cores (1 instance) and versus instances (all cores split), of
    BERT-base and the fastest INT8 row."""
    b, total = h.bench, os.cpu_count() or 1
    int8 = [r for r in h.document["rows"] if r.get("status") == "ok" and r["kind"] == "int8_dir"]
    targets = [r for r in rows if r["id"] == plan.REFERENCE_ID]
    if int8:
        best = max(int8, key=lambda r: r["batches"][str(b.batch_sizes[-1])]["samples_per_s"])
        targets += [r for r in rows if r["id"] == best["id"]]
    points = [(1, c) for c in (b.cores or range(1, total + 1)) if c <= total]
    points += [(n, total // n) for n in b.instances if n > 1 and total // n >= 1]
    sweep: dict[str, Any] = {"batch_size": b.sweep_batch_size, "repeats": b.sweep_repeats, "host_cores": total}
    sweep["aggregation"] = "instances start together and each times its own calls; total samples/s = sum over instances"
    sweep["runs"] = []
    for spec, (ninstances, cores) in [(s, p) for s in targets for p in points]:
        if h.over_budget():
            sweep["runs"].append(h.skipped({"row": spec["id"], "ninstances": ninstances}))
            continue
        sweep["runs"].append(_sweep_point(h, spec, inputs, ninstances, cores))
        h.document["core_sweep"] = sweep
        h.save()
    return sweep


def _sweep_point(h: Harness, spec: Mapping[str, Any], inputs: Path, ninstances: int, cores: int) -> dict[str, Any]:
    """One row at `ninstances` x `cores` through run_cpu, each instance timing its own calls."""
    from qala.utils import atomic_write_json

    b = h.bench
    work = h.out / "work" / "sweep" / f"{_slug(spec['id'])}-{ninstances}x{cores}"
    results = work / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    point = {**spec, "inputs": str(inputs), "work_dir": str(work / "model"), "threads": None, "warmup": 1}
    point.update(batch_sizes=[b.sweep_batch_size], repeats=b.sweep_repeats, min_repeats=b.sweep_repeats)
    atomic_write_json(work / "spec.json", {**point, "throughput_only": True})
    cmd = run_cpu_command(
        work / "spec.json", results, ninstances=ninstances, ncores_per_instance=cores, python=spec.get("python")
    )
    logger.info("sweep %s: %d instance(s) x %d core(s) ...", spec["id"], ninstances, cores)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    record = {"row": spec["id"], "ninstances": ninstances, "cores_per_instance": cores}
    record.update(total_cores=ninstances * cores, command=" ".join(cmd))
    found = [json.loads(p.read_text()) for p in sorted(results.glob("worker-*.json"))]
    if proc.returncode != 0 or len(found) != ninstances:
        error = _tail(proc.stderr + proc.stdout) or f"{len(found)} of {ninstances} instances reported"
        return {**record, "status": "failed", "error": error}
    key = str(b.sweep_batch_size)
    fields = ("samples_per_s", "median_ms")
    instances = [{"threads": r["threads"], **{f: r["batches"][key][f] for f in fields}} for r in found]
    instances = [{**i, "peak_rss_mb": r["peak_rss_mb"]} for i, r in zip(instances, found, strict=True)]
    total = round(sum(i["samples_per_s"] for i in instances), 3)
    return {**record, "status": "ok", "total_samples_per_s": total, "instances": instances}


def main(argv: list[str] | None = None) -> int:
    from qala.cli import recipe_parser, run_main

    parser = recipe_parser(
        "python -m qala.bench", __doc__, "YAML recipe with a benchmark section, e.g. benchmarks/squad_bench.yaml"
    )
    parser.add_argument("--resume", action="store_true", help="keep rows already measured for the same recipe")
    parser.add_argument(
        "--table",
        choices=("padded", "questions", "all"),
        default="padded",
        help="padded: windows padded to max_seq_length (bench.json); questions: real questions end to end, "
        "unpadded (real_questions.json); all: both",
    )
    parser.add_argument(
        "--pad-multiple",
        type=int,
        help="questions table, compiled INT8 rows: pad each batch to a multiple of this many positions, so "
        "torch.compile builds one graph per bucket (default: qala.bench.plan.COMPILED_PAD_MULTIPLE)",
    )
    parser.add_argument(
        "--qala-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="questions table: run the qala rows through this serving engine of qala.quantize.engines "
        "(e.g. compile-dynamic, onnxruntime-int8); repeat for one row per engine. Engines ending in -int8 or -inc "
        "run INT8 rows only (-int8 re-quantizes benchmark.model, -inc serves benchmark.int8_model as INC tuned it). "
        "Default: load_model, INT8 compiled per shape",
    )
    # Intermixed: `RECIPE --resume key=value` works as well as `--resume RECIPE key=value`.
    return run_main(parser, argv, _main, intermixed=True)


def _main(args: argparse.Namespace, recipe: Any) -> int:
    from qala.evaluate import check_engine, check_positive
    from qala.stage import stage_lock

    # Before the lock and the first row: a bad option fails at once, not after the GEMM peak and 12 rows.
    check_positive(pad_multiple=args.pad_multiple)
    # The padded table runs load_model rows on windows already padded to max_seq_length: these flags would
    # change nothing there, and a flag that silently does nothing reads as applied.
    for flag, value in (("--qala-backend", args.qala_backend), ("--pad-multiple", args.pad_multiple)):
        if value and args.table == "padded":
            raise ValueError(f"{flag} applies to --table questions or all, not to --table padded")
    for name in args.qala_backend:
        check_engine(name, "--qala-backend")
        # An "-inc" engine runs INC's INT8 artifact only: without benchmark.int8_model it would plan no row at all.
        if plan.serves_inc_int8(name) and not recipe.benchmark.int8_model:
            raise ValueError(f"--qala-backend {name} serves an INC INT8 artifact: set benchmark.int8_model")
    documents, written = [], []
    with stage_lock(recipe.benchmark.output_dir):  # held for the whole run, both tables
        for table in [t for t in FILES if args.table in (t, "all")]:
            options = (
                {"pad_multiple": args.pad_multiple, "qala_backends": args.qala_backend} if table != "padded" else {}
            )
            documents.append(run_table(recipe, table, resume=args.resume, **options))
            print(report.format_table(documents[-1]), end="")
            written += FILES[table][:2]
    out = Path(recipe.benchmark.output_dir)
    print(f"wrote {', '.join(str(out / n) for n in written)} and the plots")
    failed = [r["id"] for d in documents for r in d["rows"] if r.get("status") == "failed"]
    if failed:
        print(f"rows that failed: {failed} (reasons in the JSON)", file=sys.stderr)
        return 1
    return 0
