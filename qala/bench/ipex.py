"""python -m qala.bench.ipex: IPEX static INT8 calibrated and scored per padded length configuration, the files a
benchmark recipe names as benchmark.ipex_calibration and benchmark.ipex_scores. Run it in the IPEX environment
(bash benchmarks/ipex_env.sh); the quantizer itself is qala.quantize.ipex."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from qala.bench.cli import environment
from qala.data import load_split, windows
from qala.evaluate import evaluate_features
from qala.lengths import constant_ratio_length_config
from qala.quantize.ipex import DEFAULT_STATIC_CONFIG, IpexStaticQA, file_sha256, import_ipex, length_key, versions
from qala.recipe import CalibrationConfig, DataConfig, QuantizationConfig, Recipe, RunConfig
from qala.tune import calibration_batches
from qala.utils import atomic_write_json


def _parser() -> argparse.ArgumentParser:
    shared = Path("..") / "shared"
    parser = argparse.ArgumentParser(prog="python -m qala.bench.ipex", description=main.__doc__)
    parser.add_argument("--model", default=str(shared / "models" / "minilm-lat-squad-offline"))
    parser.add_argument("--train", default=str(shared / "data" / "squad-v1.1" / "train.json"))
    parser.add_argument("--dev", default=str(shared / "data" / "squad-v1.1" / "dev.json"))
    parser.add_argument("--configs", default="full,0.9,0.8", help="comma-separated: 'full' and/or keep ratios")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--calibration-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="first N dev questions (smoke runs)")
    parser.add_argument("--out", default="benchmarks/results/ipex_squad_reference.json")
    parser.add_argument("--summaries", default="runs/ipex_reference/ipex_calibration.json")
    return parser


def score(model: Any, length_config: list[int] | None, batch_size: int, examples: Any, features: Any) -> dict:
    """EM/F1 of `model(**inputs, length_config=...)` on padded features (qala.evaluate's scoring)."""
    m, _ = evaluate_features(
        model, examples, features, length_config=length_config, batch_size=batch_size, progress=False
    )
    return {k: round(m[k], 2) for k in ("exact_match", "f1")} | {"n": m["n"], "seconds": round(m["seconds"], 1)}


def main(argv: list[str] | None = None) -> int:
    """IPEX static INT8 of a qala model at each length configuration, scored on a SQuAD dev file; run it in the
    IPEX environment. Each keep ratio r runs as the padded-384 configuration constant_ratio_length_config(r,
    layers, 384) (the paper's mode), calibrated on the training windows qala.tune takes (dev is never seen before
    scoring). Writes OUT (the fp32 and INT8 F1 a benchmark recipe names as benchmark.ipex_scores) and the qconf
    summaries (benchmark.ipex_calibration). No latency: the benchmark harness times IPEX rows."""
    from transformers import AutoTokenizer

    from qala.model import LengthAdaptiveForQuestionAnswering

    args = _parser().parse_args(argv)

    import_ipex()  # fails first, naming the versions needed
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(args.model).eval()
    tokenizer, seq = AutoTokenizer.from_pretrained(args.model), model.qala_config.max_seq_length
    data = DataConfig(train=args.train, eval=args.dev, max_seq_length=seq, max_eval_samples=args.max_eval_samples)
    calibration = CalibrationConfig(samples=args.calibration_samples, batch_size=args.calibration_batch_size)
    recipe = Recipe(run=RunConfig(seed=args.seed), data=data, quantization=QuantizationConfig(calibration=calibration))
    examples = load_split(data, "eval")
    scored = {"examples": examples, "features": windows(examples, tokenizer, data, train=False)}
    qa = IpexStaticQA(
        model, calibration_batches(recipe, tokenizer, model.num_layers), static_config=DEFAULT_STATIC_CONFIG
    )
    rows = []
    for item in [x.strip() for x in args.configs.split(",") if x.strip()]:
        lengths = None if item == "full" else constant_ratio_length_config(float(item), model.num_layers, seq)
        row: dict[str, Any] = {"config": "full" if lengths is None else f"keep {float(item)}", "length_config": lengths}
        row.update(padded_to=seq, fp32=score(model, lengths, args.batch_size, **scored))
        start = time.perf_counter()
        qa.summary(lengths)
        row["calibration_seconds"] = round(time.perf_counter() - start, 1)
        row["calibrated_with"] = qa.calibrated_with[length_key(lengths)]
        row["int8"] = score(qa, lengths, args.batch_size, **scored)
        row["relative_f1_loss"] = round(1 - row["int8"]["f1"] / row["fp32"]["f1"], 4)
        rows.append(row)
        print(row, flush=True)
    record = {"file": args.train, "windows": args.calibration_samples, "batch_size": args.calibration_batch_size}
    record.update(
        seed=args.seed, selection="qala.tune's: questions shuffled with the seed, first windows padded to 384"
    )
    summaries = qa.save_summaries(args.summaries, model=str(args.model), calibration=record)
    method = {
        "quantization": "static INT8 through Intel Neural Compressor's IPEX path (INC StaticQuantConfig -> "
        "ipex.quantization.prepare/convert), rebuilt per served shape from the calibrated qconf summary, "
        "torch.jit.trace + freeze; non-quantized ops fp32 (bf16 excluded)",
        "static_config": DEFAULT_STATIC_CONFIG,
        "calibration": record,
        "per_length_config": "each length configuration is calibrated on its own (one TorchScript graph each)",
        "evaluation": f"windows padded to {seq}, doc stride 128, batch {args.batch_size}, qala post-processing",
        "seconds": "wall time of scoring / calibration, including graph builds, on whatever else the machine ran: "
        "not a speed measurement (the benchmark harness times IPEX rows)",
    }
    env = environment()
    env["versions"].update(versions())
    report = {"engine": "ipex", "model": str(args.model), "dev": str(args.dev), "questions": len(examples)}
    report.update(method=method, environment=env, rows=rows, summaries_file=str(summaries))
    report["command"] = "python -m qala.bench.ipex " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_json(args.out, {**report, "summaries_sha256": file_sha256(summaries)})
    print(f"wrote {args.out} and {summaries}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
