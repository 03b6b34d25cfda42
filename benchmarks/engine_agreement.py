"""Does an engine answer like the PyTorch model? Span agreement per keep configuration, batch 1.

    python benchmarks/engine_agreement.py MODEL_DIR --backend openvino-int8 \
        --keep-ratios 1,1,0.9,0.5,0.3,0.2 --keep-ratios 0.95,0.8,0.6,0.4,0.3,0.2 [--windows 60] [--out FILE.json]

For the first N dev windows (unpadded, one at a time) it compares the engine's best span (argmax of start and
end logits) with eager fp32's at the same configuration, and counts windows whose engine answer is [CLS]
(position 0) where fp32's is not (qala.quantize.openvino.int8_verdict, the counts openvino-int8's own guard
refuses a configuration by; docs/engines.md, "Known bug"). Any backend of qala.quantize.engines.BACKENDS works.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qala.data import calibration_windows, load_split, windows
from qala.lengths import parse_keep_ratios
from qala.model import MODEL_INPUTS
from qala.quantize.engines import make_engine
from qala.quantize.load import load_model, load_tokenizer
from qala.quantize.openvino import int8_verdict
from qala.recipe import DataConfig
from qala.utils import atomic_write_json, environment_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--keep-ratios", action="append", default=[], help="repeatable; full length always runs")
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--data", default="../shared/data/squad-v1.1/dev.json")
    parser.add_argument("--calibration", default="../shared/data/squad-v1.1/train.json")
    parser.add_argument("--workdir", default="runs/engine_agreement")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model_dir), load_tokenizer(args.model_dir)
    configs = [None] + [parse_keep_ratios(text, num_layers=model.num_layers) for text in args.keep_ratios]
    data = DataConfig(train=args.data, eval=args.data, max_eval_samples=args.windows)  # N questions: >= N windows
    features = windows(load_split(data, "eval"), tokenizer, data, train=False, padded=False)
    rows = [{k: torch.tensor([features[i][k]]) for k in MODEL_INPUTS} for i in range(min(args.windows, len(features)))]
    # Exported engines keep their ONNX files and IR in a work folder; the PyTorch ones take none.
    options: dict = {"workdir": args.workdir} if args.backend.startswith(("onnxruntime", "openvino")) else {}
    if args.backend == "openvino-int8":
        window = {"max_seq_length": 384, "doc_stride": 128}
        options["calibration"] = calibration_windows(args.calibration, tokenizer, count=300, **window)
    engine = make_engine(model, args.backend, **options)

    def spans(run, config) -> list[tuple[int, int]]:
        outputs = [run(**row, keep_ratios=config) for row in rows]
        return [(int(out.start_logits.argmax()), int(out.end_logits.argmax())) for out in outputs]

    results = []
    for config in configs:
        with torch.no_grad():
            verdict = int8_verdict(spans(model, config), spans(engine, config))
        results.append({"keep_ratios": config, **{k: verdict[k] for k in ("agree", "cls_where_fp32_not", "windows")}})
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        record = {"model": args.model_dir, "backend": args.backend, "selection": model.qala_config.selection}
        atomic_write_json(args.out, {**record, "results": results, "environment": environment_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
