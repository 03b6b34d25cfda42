"""The benchmark run: plan, measure row by row in worker processes (saving after each), report.

    python -m qala.bench RECIPE.yaml [key.sub=value ...] [--resume] [--table padded|questions|all] [-v]

`padded` (default): every row on windows padded to data.max_seq_length, the paper's view, with the
roofline and a core sweep (OUTPUT_DIR/bench.json, bench.md, f1_vs_speedup.png, throughput_vs_cores.png).
`questions`: real questions end to end on unpadded windows (OUTPUT_DIR/real_questions.json, .md, .png;
see qala.bench.questions). A killed run keeps every row it finished; `--resume` skips rows already
measured for the same inputs (settings, row spec, and by content the models measured). One run per
OUTPUT_DIR at a time.
"""

from __future__ import annotations

import argparse
import contextlib
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

BENCH_NAME = "bench.json"
TABLE_NAME = "bench.md"
INPUTS_NAME = "inputs.safetensors"
GEMM_PEAK_ID = "__gemm_peak__"


# --------------------------------------------------------------------------- worker processes


def worker_command(spec_file: str | Path, out: str | Path, python: str | None = None) -> list[str]:
    """`PYTHON -m qala.bench.worker SPEC OUT`; PYTHON is the row's own interpreter when it names one."""
    return [python or sys.executable, "-m", "qala.bench.worker", str(spec_file), str(out)]


def _tail(text: str, lines: int = 15) -> str:
    """The last lines of a worker's stderr, the exception line first (tables show an error's start)."""
    kept = [line for line in text.splitlines() if line.strip() and "Failed to load" not in line]
    if not kept:
        return ""
    return "\n".join([kept[-1], *kept[-lines:-1]])


def run_worker(spec: Mapping[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run one row in a fresh process (under spec["python"] when given); a failure becomes the row's
    status and error, never an exception."""
    from qala.utils import atomic_write_json

    python = spec.get("python")
    if python and not Path(python).is_file():
        return {"status": "failed", "error": f"python not found: {python} (the environment this row runs in)"}
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = work_dir / "spec.json", work_dir / "result.json"
    atomic_write_json(spec_file, spec)
    out_file.unlink(missing_ok=True)
    proc = subprocess.run(worker_command(spec_file, out_file, python), capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        return {"status": "failed", "error": _tail(proc.stderr) or f"exit status {proc.returncode}"}
    return {"status": "ok", **json.loads(out_file.read_text())}


def _libraries_found(names: Sequence[str]) -> bool:
    """Whether run_cpu would find one of these shared libraries (it searches the same folders)."""
    folders = [
        Path(sys.prefix) / "lib",
        Path.home() / ".local/lib",
        Path("/usr/local/lib"),
        Path("/usr/local/lib64"),
        Path("/usr/lib"),
        Path("/usr/lib64"),
        Path("/usr/lib/x86_64-linux-gnu"),
    ]
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
    """`python -m torch.backends.xeon.run_cpu ... --no-python python -m qala.bench.worker SPEC DIR`; the
    worker runs under `python` when given (a row's own environment, e.g. .venv-ipex), the launcher here.

    Features whose tools are missing here (numactl, Intel OpenMP, tcmalloc/jemalloc) are switched off
    explicitly, so that the launcher neither fails nor silently changes what is measured."""
    numactl = shutil.which("numactl") is not None if numactl is None else numactl
    iomp = _libraries_found(["libiomp5.so"]) if iomp is None else iomp
    allocator = _libraries_found(["libtcmalloc.so", "libjemalloc.so"]) if allocator is None else allocator
    cmd = [
        sys.executable,
        "-m",
        "torch.backends.xeon.run_cpu",
        "--ninstances",
        str(ninstances),
        "--ncores-per-instance",
        str(ncores_per_instance),
    ]
    if not numactl:
        cmd.append("--disable-numactl")
    if not iomp:
        cmd.append("--disable-iomp")
    if not allocator:
        cmd.append("--use-default-allocator")
    # run_cpu's own -m refuses any program not ending in .py, so the interpreter is the program instead.
    return cmd + ["--no-python", *worker_command(spec_file, out_dir, python)]


def cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    return []


def environment() -> dict[str, Any]:
    """qala.utils.environment_info, with onnxruntime's version and the CPU flags."""
    from qala.utils import environment_info

    env = environment_info()
    with contextlib.suppress(Exception):
        import onnxruntime

        env["versions"]["onnxruntime"] = onnxruntime.__version__
    return {**env, "cpu_flags": cpu_flags()}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --------------------------------------------------------------------------- the shared run loop


class Harness:
    """A run that measures row specs one worker at a time, saving its document after each row.

    Subclasses plan the rows and write the reports; this keeps resume (rows of the same fingerprint and
    spec are kept), the time budget and the GEMM peak in one place for both tables.
    """

    document_name = BENCH_NAME

    def __init__(self, recipe: Any, *, resume: bool = False) -> None:
        from qala.recipe import changed_keys, fingerprint
        from qala.utils import content_hash

        self.recipe, self.bench = recipe, recipe.benchmark
        self.out = Path(self.bench.output_dir)
        self.started = time.monotonic()
        # Rows depend on the settings and, by content, on the models: one retrained at the same path is new.
        models = {key: getattr(self.bench, key) for key in ("model", "int8_model") if getattr(self.bench, key)}
        self.inputs = {"settings": self.make_fingerprint(), **{k: content_hash(v) for k, v in models.items()}}
        self.fingerprint = fingerprint(self.inputs)
        path = self.out / self.document_name
        previous = json.loads(path.read_text()) if resume and path.is_file() else None
        self.previous: dict[str, Any] = {}
        if previous and previous.get("fingerprint") == self.fingerprint:
            self.previous = {r["id"]: r for r in previous.get("rows", []) if r.get("status") == "ok"}
            if (previous.get("gemm_peak") or {}).get("status") == "ok":
                self.previous[GEMM_PEAK_ID] = previous["gemm_peak"]
        elif previous:
            why = "; ".join(changed_keys(previous["inputs"], self.inputs)) if previous.get("inputs") else "no record"
            logger.warning("--resume: %s was measured for other inputs (%s); measuring everything again", path, why)
        self.document: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "rows": [],
            "gemm_peak": None,
        }
        self.recipe_written = False

    def make_fingerprint(self) -> str:
        return plan.bench_fingerprint(self.recipe)

    def over_budget(self) -> bool:
        limit = self.bench.time_budget_minutes
        return limit is not None and (time.monotonic() - self.started) / 60 > limit

    def save(self) -> None:
        raise NotImplementedError

    def write_recipe(self) -> None:
        """OUTPUT_DIR/recipe.yaml, when the first measurement starts (the inputs have loaded and the rows are
        planned): a start that fails at once leaves the last run's record."""
        from qala.utils import atomic_write_text

        if not self.recipe_written:
            atomic_write_text(self.out / "recipe.yaml", self.recipe.to_yaml())
            self.recipe_written = True

    def measure_gemm_peak(self, threads: int) -> None:
        self.write_recipe()
        spec = {"id": "gemm_peak", "kind": "gemm_peak", "threads": threads, "gemm_size": self.bench.gemm_size}
        if GEMM_PEAK_ID in self.previous:
            self.document["gemm_peak"] = self.previous[GEMM_PEAK_ID]
        else:
            logger.info("GEMM peak (fp32 and INT8, every engine) at %d threads ...", threads)
            self.document["gemm_peak"] = run_worker(spec, self.out / "work" / "gemm_peak")
        self.save()

    def measure_rows(self, specs: Sequence[dict[str, Any]], work: Path, extra: Mapping[str, Any]) -> None:
        """Measure each spec (with `extra` fields added for the worker only) unless --resume has it."""
        self.write_recipe()
        for i, spec in enumerate(specs, 1):
            digest = plan.spec_hash(spec)
            done = self.previous.get(spec["id"])
            if done and done.get("spec_hash") == digest:
                logger.info("[%d/%d] %s: measured before (--resume), kept", i, len(specs), spec["id"])
                self.document["rows"].append(done)
                continue
            if self.over_budget():
                self.document["budget_exhausted"] = True
                self.document["rows"].append({**spec, "status": "skipped", "error": "time budget exhausted"})
                continue
            logger.info("[%d/%d] %s ...", i, len(specs), spec["id"])
            work_dir = work / _slug(spec["id"])
            result = run_worker({**spec, **extra, "work_dir": str(work_dir)}, work_dir)
            row = {**spec, "spec_hash": digest, **result}
            self.document["rows"].append(row)
            self.save()
            logger.info("[%d/%d] %s: %s", i, len(specs), spec["id"], self.progress_line(row))

    def progress_line(self, row: Mapping[str, Any]) -> str:
        return f"{row.get('status')}: {str(row.get('error', ''))[-300:]}"


# --------------------------------------------------------------------------- the padded table


def write_inputs(recipe: Any, bench: Any, path: Path) -> int:
    """Tokenize the first `bench.windows` evaluation windows (padded) into a safetensors file; returns N."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from qala.data import load_split, windows
    from qala.model import batch_inputs
    from qala.quantize.load import load_tokenizer

    source = bench.model or bench.int8_model or recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = load_tokenizer(source)
    data = dataclasses.replace(recipe.data, max_eval_samples=recipe.data.max_eval_samples or bench.windows)
    features = windows(load_split(data, "eval"), tokenizer, data, train=False)
    tensors = batch_inputs(features[: bench.windows])
    if "token_type_ids" not in tensors:
        tensors["token_type_ids"] = torch.zeros_like(tensors["input_ids"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors["input_ids"].size(0)


class Bench(Harness):
    """The padded table: plan, measure row by row, sweep cores, write bench.json, bench.md and the plots."""

    def __init__(self, recipe: Any, *, resume: bool = False) -> None:
        super().__init__(recipe, resume=resume)
        self.document.update(environment=environment(), method={}, core_sweep=None, peers={}, budget_exhausted=False)

    def save(self) -> None:
        from qala.utils import atomic_write_json, atomic_write_text

        report.add_derived(self.document["rows"], self.document.get("gemm_peak"))
        self.document["wall_seconds"] = round(time.monotonic() - self.started, 1)
        atomic_write_json(self.out / BENCH_NAME, self.document)
        atomic_write_text(self.out / TABLE_NAME, report.format_table(self.document))

    def run(self) -> dict[str, Any]:
        b = self.bench
        self.out.mkdir(parents=True, exist_ok=True)
        inputs = self.out / INPUTS_NAME
        n = write_inputs(self.recipe, b, inputs)
        rows, notes = plan.plan_rows(self.recipe, b)
        threads = b.threads or os.cpu_count() or 1
        self.document["method"] = {
            "windows": n,
            "data": self.recipe.data.eval,
            "seq_length": self.recipe.data.max_seq_length,
            "batch_sizes": list(b.batch_sizes),
            "threads": threads,
            "instances": 1,
            "warmup": b.warmup,
            "repeats": b.repeats,
            "latency_repeats": b.latency_repeats,
            "min_repeats": b.min_repeats,
            "max_seconds_per_measurement": b.max_seconds_per_measurement,
            "statistic": "qala.utils.time_calls / latency_stats: median of timed calls per batch size; batch-1 "
            "latency p50/p90/p99 over latency_repeats calls cycling through the windows; throughput = batch / "
            "median; one worker process per row",
            "peak_memory": "VmHWM of the row's worker process (imports, model load, compilation and runs)",
        }
        self.document["peers"] = notes
        if b.gemm_peak:
            self.measure_gemm_peak(threads)
        self.measure_rows(rows, self.out / "work", {"inputs": str(inputs)})
        if b.core_sweep:
            self.document["core_sweep"] = self._core_sweep(rows, inputs)
        self.save()
        report.plot_f1_vs_speedup(self.document, self.out / "f1_vs_speedup.png")
        report.plot_throughput_vs_cores(self.document, self.out / "throughput_vs_cores.png")
        return self.document

    def progress_line(self, row: Mapping[str, Any]) -> str:
        if row.get("status") != "ok":
            return super().progress_line(row)
        parts = [f"b{b} {m['median_ms']:.1f} ms ({m['samples_per_s']:.2f}/s)" for b, m in row["batches"].items()]
        return ", ".join(parts) + f", peak RSS {row['peak_rss_mb']:.0f} MB"

    def _core_sweep(self, rows: list[dict[str, Any]], inputs: Path) -> dict[str, Any]:
        """Throughput at sweep_batch_size versus cores (1 instance) and versus instances (all cores split)."""
        b = self.bench
        total = os.cpu_count() or 1
        measured = {r["id"]: r for r in self.document["rows"] if r.get("status") == "ok"}
        int8 = [r for r in measured.values() if r["dtype"] == "int8" and r["kind"] == "int8_dir"]
        targets = [r for r in rows if r["id"] == plan.REFERENCE_ID]
        if int8:
            best = max(int8, key=lambda r: r["batches"][str(b.batch_sizes[-1])]["samples_per_s"])
            targets += [r for r in rows if r["id"] == best["id"]]
        points = [(1, c) for c in (b.cores or range(1, total + 1)) if c <= total]
        points += [(n, total // n) for n in b.instances if n > 1 and total // n >= 1]
        sweep: dict[str, Any] = {
            "batch_size": b.sweep_batch_size,
            "repeats": b.sweep_repeats,
            "host_cores": total,
            "aggregation": "instances start together and each times its own calls; "
            "total samples/s = sum over instances",
            "runs": [],
        }
        for spec in targets:
            for ninstances, cores in points:
                if self.over_budget():
                    self.document["budget_exhausted"] = True
                    sweep["runs"].append(
                        {
                            "row": spec["id"],
                            "ninstances": ninstances,
                            "status": "skipped",
                            "error": "time budget exhausted",
                        }
                    )
                    continue
                sweep["runs"].append(self._sweep_point(spec, inputs, ninstances, cores))
                self.document["core_sweep"] = sweep
                self.save()
        return sweep

    def _sweep_point(self, spec: Mapping[str, Any], inputs: Path, ninstances: int, cores: int) -> dict[str, Any]:
        from qala.utils import atomic_write_json

        b = self.bench
        work = self.out / "work" / "sweep" / f"{_slug(spec['id'])}-{ninstances}x{cores}"
        results = work / "results"
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        point = {
            **spec,
            "inputs": str(inputs),
            "work_dir": str(work / "model"),
            "threads": None,
            "batch_sizes": [b.sweep_batch_size],
            "repeats": b.sweep_repeats,
            "min_repeats": b.sweep_repeats,
            "warmup": 1,
            "throughput_only": True,
        }
        atomic_write_json(work / "spec.json", point)
        cmd = run_cpu_command(
            work / "spec.json", results, ninstances=ninstances, ncores_per_instance=cores, python=spec.get("python")
        )
        logger.info("sweep %s: %d instance(s) x %d core(s) ...", spec["id"], ninstances, cores)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        record: dict[str, Any] = {
            "row": spec["id"],
            "ninstances": ninstances,
            "cores_per_instance": cores,
            "total_cores": ninstances * cores,
            "command": " ".join(cmd),
        }
        found = [json.loads(p.read_text()) for p in sorted(results.glob("worker-*.json"))]
        if proc.returncode != 0 or len(found) != ninstances:
            error = _tail(proc.stderr + proc.stdout) or f"{len(found)} of {ninstances} instances reported"
            return {**record, "status": "failed", "error": error}
        key = str(b.sweep_batch_size)
        return {
            **record,
            "status": "ok",
            "total_samples_per_s": round(sum(r["batches"][key]["samples_per_s"] for r in found), 3),
            "instances": [
                {
                    "threads": r["threads"],
                    "samples_per_s": r["batches"][key]["samples_per_s"],
                    "median_ms": r["batches"][key]["median_ms"],
                    "peak_rss_mb": r["peak_rss_mb"],
                }
                for r in found
            ],
        }


# --------------------------------------------------------------------------- the command line


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
        default=None,
        help="questions table, compiled INT8 rows: pad each batch to a multiple of this many positions, so "
        "torch.compile builds one graph per bucket (default: qala.bench.questions.COMPILED_PAD_MULTIPLE)",
    )
    parser.add_argument(
        "--qala-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="questions table: run the qala rows through this serving engine of qala.quantize.engines "
        "(e.g. compile-dynamic, onnxruntime-int8); repeat for one row per engine. Default: load_model, INT8 "
        "compiled per shape",
    )
    # Intermixed: `RECIPE --resume key=value` works as well as `--resume RECIPE key=value`.
    return run_main(parser, argv, _main, intermixed=True)


def _main(args: argparse.Namespace, recipe: Any) -> int:
    from qala.evaluate import check_engine, check_positive
    from qala.utils import output_lock

    # Before the lock and the first row: a bad option fails at once, not after the GEMM peak and 12 rows.
    check_positive(pad_multiple=args.pad_multiple)
    for name in args.qala_backend:
        check_engine(name, "--qala-backend")
    with output_lock(recipe.benchmark.output_dir):  # held for the whole run, both tables
        return _run_tables(args, recipe)


def _run_tables(args: argparse.Namespace, recipe: Any) -> int:
    from qala.bench.questions import QUESTIONS_NAME, QUESTIONS_TABLE, QuestionsBench

    documents, written = [], []
    if args.table in ("padded", "all"):
        documents.append(Bench(recipe, resume=args.resume).run())
        print(report.format_table(documents[-1]), end="")
        written += [BENCH_NAME, TABLE_NAME]
    if args.table in ("questions", "all"):
        bench = QuestionsBench(
            recipe, resume=args.resume, pad_multiple=args.pad_multiple, qala_backends=args.qala_backend
        )
        documents.append(bench.run())
        print(report.format_questions_table(documents[-1]), end="")
        written += [QUESTIONS_NAME, QUESTIONS_TABLE]
    out = Path(recipe.benchmark.output_dir)
    print(f"wrote {', '.join(str(out / n) for n in written)} and the plots")
    failed = [r["id"] for d in documents for r in d["rows"] if r.get("status") == "failed"]
    if failed:
        print(f"rows that failed: {failed} (reasons in the JSON)", file=sys.stderr)
        return 1
    return 0
