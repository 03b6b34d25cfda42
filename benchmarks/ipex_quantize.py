"""IPEX static INT8 of a qala model, scored on a SQuAD dev file; run it in the IPEX environment.

    bash benchmarks/ipex_env.sh
    .venv-ipex/bin/python benchmarks/ipex_quantize.py [--model DIR] [--configs full,0.9,0.8] [--out FILE]
    # or in parts (one process per configuration), then merged into OUT and one calibration file:
    .venv-ipex/bin/python benchmarks/ipex_quantize.py --configs 0.9 --no-fp32 --out P1.json --summaries C1.json
    .venv-ipex/bin/python benchmarks/ipex_quantize.py --merge P1.json P2.json ... [--out FILE] [--summaries FILE]

Quantizes through Intel Neural Compressor's IPEX path (qala.quantize.ipex.IpexStaticQA), once per length
configuration: full length, and each keep ratio r as the padded-384 absolute configuration
constant_ratio_length_config(r, layers, 384) (the paper's mode). Calibration takes the training windows
qala.tune does (qala.tune.calibration_batches); dev is never seen before scoring. Scores fp32 and INT8 on
the whole dev file (qala.evaluate.evaluate_features). Writes OUT (default
benchmarks/results/ipex_squad_reference.json) and the qconf summaries (default
runs/ipex_reference/ipex_calibration.json, not committed) that the benchmark's IPEX rows load, so that they
time the model scored here. No latency is measured here: timings belong to the benchmark harness.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "minilm-lat-squad-offline"))
    parser.add_argument("--train", default=str(SHARED / "data" / "squad-v1.1" / "train.json"))
    parser.add_argument("--dev", default=str(SHARED / "data" / "squad-v1.1" / "dev.json"))
    parser.add_argument("--configs", default="full,0.9,0.8", help="comma-separated: 'full' and/or keep ratios")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--calibration-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="first N dev questions (smoke runs)")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 scores")
    parser.add_argument("--no-int8", action="store_true", help="skip calibration and the INT8 scores")
    parser.add_argument("--merge", nargs="+", metavar="PART", help="merge part reports (and their calibrations)")
    parser.add_argument(
        "--fp32-reference",
        help="with --merge: JSON {config: {exact_match, f1}, 'source': TEXT}, fp32 scores measured elsewhere",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ipex_squad_reference.json"))
    parser.add_argument("--summaries", default=str(REPO / "runs" / "ipex_reference" / "ipex_calibration.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        return merge(args.merge, args.out, args.summaries, args.fp32_reference)
    return quantize(args)


def quantize(args: argparse.Namespace) -> int:
    """Calibrate and score every configuration of --configs; write OUT and the calibration file."""
    from transformers import AutoTokenizer

    from qala.data import load_split, windows
    from qala.model import LengthAdaptiveForQuestionAnswering
    from qala.quantize.ipex import DEFAULT_STATIC_CONFIG, IpexStaticQA, import_ipex
    from qala.recipe import CalibrationConfig, DataConfig, QuantizationConfig, Recipe, RunConfig
    from qala.tune import calibration_batches
    from qala.utils import atomic_write_json

    import_ipex()  # fails first, naming the versions needed
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    seq = model.qala_config.max_seq_length
    # The settings qala.tune calibrates with (full length, padded windows of the training file) and scores on.
    data = DataConfig(train=args.train, eval=args.dev, max_seq_length=seq, max_eval_samples=args.max_eval_samples)
    calibration = CalibrationConfig(samples=args.calibration_samples, batch_size=args.calibration_batch_size)
    recipe = Recipe(run=RunConfig(seed=args.seed), data=data, quantization=QuantizationConfig(calibration=calibration))
    examples = load_split(data, "eval")
    features = windows(examples, tokenizer, data, train=False)  # padded to max_seq_length
    qa = IpexStaticQA(
        model, calibration_batches(recipe, tokenizer, model.num_layers), static_config=DEFAULT_STATIC_CONFIG
    )
    scored = {"examples": examples, "features": features, "batch_size": args.batch_size}
    rows = [score_config(args, model, qa, scored, name, lengths) for name, lengths in configurations(args, model)]
    summaries = qa.save_summaries(args.summaries, model=str(args.model), calibration=calibration_record(args))
    atomic_write_json(args.out, build_report(args, rows, summaries, len(examples), seq))
    print(f"wrote {args.out} and {summaries}")
    return 0


def configurations(args: argparse.Namespace, model: Any) -> list[tuple[str, list[int] | None]]:
    """(name, length configuration) of each --configs item: full length, or keep ratio r as the paper's
    absolute configuration of windows padded to max_seq_length."""
    from qala.model import constant_ratio_length_config

    seq, items = model.qala_config.max_seq_length, [x.strip() for x in args.configs.split(",") if x.strip()]
    ratio = {x: constant_ratio_length_config(float(x), model.num_layers, seq) for x in items if x != "full"}
    return [("full", None) if x == "full" else (f"keep {float(x)}", ratio[x]) for x in items]


def score(model, examples, features, length_config, batch_size: int) -> dict[str, Any]:
    """EM/F1 of `model(**inputs, length_config=...)` on padded features (qala.evaluate's scoring)."""
    from qala.evaluate import evaluate_features

    metrics, _ = evaluate_features(
        model, examples, features, length_config=length_config, batch_size=batch_size, progress=False
    )
    rounded = {"exact_match": round(metrics["exact_match"], 2), "f1": round(metrics["f1"], 2)}
    return {**rounded, "n": metrics["n"], "seconds": round(metrics["seconds"], 1)}


def score_config(args, model, qa, scored: dict[str, Any], name: str, lengths: list[int] | None) -> dict[str, Any]:
    """One configuration's row: fp32 scores, then calibration and INT8 scores (unless --no-fp32 / --no-int8)."""
    row: dict[str, Any] = {"config": name, "length_config": lengths, "padded_to": model.qala_config.max_seq_length}
    if not args.no_fp32:
        row["fp32"] = score(model, length_config=lengths, **scored)
        print(f"{name}: fp32 {row['fp32']}", flush=True)
    if not args.no_int8:
        start = time.perf_counter()
        qa.summary(lengths)
        row["calibration_seconds"] = round(time.perf_counter() - start, 1)
        row["calibrated_with"] = qa.calibrated_with[None if lengths is None else tuple(lengths)]
        row["int8"] = score(qa, length_config=lengths, **scored)
        print(f"{name}: ipex int8 {row['int8']}", flush=True)
    add_loss(row)
    return row


def build_report(args, rows: list[dict[str, Any]], summaries: Path, questions: int, seq: int) -> dict[str, Any]:
    from qala.bench.cli import environment
    from qala.quantize.ipex import DEFAULT_STATIC_CONFIG, file_sha256, versions

    env = environment()  # with the CPU flags and torch's thread count
    env["versions"].update(versions())
    method = {
        "quantization": "static INT8 through Intel Neural Compressor's IPEX path (INC StaticQuantConfig -> "
        "ipex.quantization.prepare/convert), rebuilt per served shape from the calibrated qconf summary, "
        "torch.jit.trace + freeze; non-quantized ops fp32 (bf16 excluded)",
        "static_config": DEFAULT_STATIC_CONFIG,
        "calibration": calibration_record(args),
        "per_length_config": "each length configuration is calibrated on its own (one TorchScript graph each)",
        "evaluation": f"windows padded to {seq}, doc stride 128, batch {args.batch_size}, qala post-processing",
        "seconds": "wall time of scoring / calibration, including graph builds, on whatever else the machine ran: "
        "not a speed measurement (the benchmark harness times IPEX rows)",
    }
    report = {"engine": "ipex", "model": str(args.model), "dev": str(args.dev), "questions": questions}
    report.update(method=method, rows=rows, summaries_file=str(summaries), summaries_sha256=file_sha256(summaries))
    return {**report, "environment": env}


def add_loss(row: dict[str, Any]) -> None:
    if "fp32" in row and "int8" in row:
        row["relative_f1_loss"] = round(1 - row["int8"]["f1"] / row["fp32"]["f1"], 4)


def merge(parts: list[str], out: str, summaries_out: str, fp32_reference: str | None = None) -> int:
    """One report (rows joined per configuration: full, then keep ratios descending) and one calibration
    file. `fp32_reference` fills rows without an fp32 score of this run, marked with its source."""
    from qala.quantize.ipex import file_sha256
    from qala.utils import atomic_write_json

    reports = [json.loads(Path(p).read_text()) for p in parts]
    rows: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report["rows"]:
            merged = rows.setdefault(row["config"], {})
            merged.update({k: v for k, v in row.items() if k not in merged or k in ("fp32", "int8")})
    ordered = sorted(rows.values(), key=lambda r: -2.0 if r["config"] == "full" else -float(r["config"].split()[-1]))
    reference = json.loads(fp32_reference) if fp32_reference else {}
    for row in ordered:
        if "fp32" not in row and row["config"] in reference:
            row["fp32"] = {**reference[row["config"]], "source": reference["source"]}
        add_loss(row)
    merge_calibrations([r["summaries_file"] for r in reports], summaries_out)
    report = {k: v for k, v in reports[0].items() if k not in ("rows", "summaries_file", "summaries_sha256")}
    report.update(rows=ordered, summaries_file=str(summaries_out), summaries_sha256=file_sha256(summaries_out))
    report["parts"] = [
        {"config": [r["config"] for r in rep["rows"]], "torch_threads": rep["environment"].get("torch_threads")}
        for rep in reports
    ]
    atomic_write_json(out, report)
    print(f"wrote {out} and {summaries_out}")
    return 0


def merge_calibrations(files: list[str], out: str) -> None:
    """The parts' calibration files as one: one calibration per length configuration, the first part's."""
    from qala.quantize.ipex import QCONF_FORMAT
    from qala.utils import atomic_write_text

    calibrations = [json.loads(Path(f).read_text()) for f in files]
    configs, seen = [], set()
    for config in (c for cal in calibrations for c in cal["configs"]):
        key = json.dumps(config["length_config"])
        if key not in seen:
            seen.add(key)
            configs.append(config)
    combined = {k: v for k, v in calibrations[0].items() if k != "configs"}
    if combined.get("format") != QCONF_FORMAT:
        raise ValueError(f"{files[0]}: not a qala IPEX calibration file")
    atomic_write_text(out, json.dumps({**combined, "configs": configs}) + "\n")


def calibration_record(args: argparse.Namespace) -> dict[str, Any]:
    record = {"file": str(args.train), "windows": args.calibration_samples, "batch_size": args.calibration_batch_size}
    selection = "qala.tune's: questions shuffled with the seed, first windows padded to 384, full length"
    return {**record, "seed": args.seed, "selection": selection}


if __name__ == "__main__":
    sys.exit(main())
