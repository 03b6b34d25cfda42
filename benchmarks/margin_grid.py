"""F1 and measured MACs of keep-margin configurations on a slice of a SQuAD file: the grid the margin rule's
settings were chosen on (benchmarks/results/margin_grid_select3.json).

    python benchmarks/margin_grid.py MODEL_DIR CONFIGS.json --set search --max-samples 400 [--weights W] [--out F]
    python benchmarks/margin_grid.py MODEL_DIR CONFIGS.json --set heldout --skip-samples 400

CONFIGS.json: a list of {"ratios": [...] | null, "margins": [...] | null} (qala.model keep_ratios / keep_margins).
Each configuration is scored on the questions [skip, skip + max) of --data, unpadded, and appended to the result
file under its set name with F1, EM and macs_ratio: the MACs of the tokens each window kept over full length
(qala.evaluate.evaluate_features). Rows already there for (set, ratios, margins) are kept, not measured again.
Choose on one set (the search's first 400 questions), report the other: the dev file is only 1,086 questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights

from qala.data import load_squad, windows
from qala.evaluate import evaluate_features
from qala.quantize.load import load_model, load_tokenizer
from qala.recipe import DataConfig
from qala.utils import atomic_write_json, environment_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("configs", type=Path)
    parser.add_argument("--set", required=True, help="name of this slice of questions in the result file")
    parser.add_argument("--data", default="../shared/data/squad-v1.1/dev.json")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--skip-samples", type=int, default=0)
    parser.add_argument("--weights", help="a checkpoint's model.safetensors to score in MODEL_DIR's configuration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/margin_grid.json"))
    args = parser.parse_args(argv)
    configs = json.loads(args.configs.read_text())
    document = json.loads(args.out.read_text()) if args.out.is_file() else {}
    document.update(model=args.model_dir, weights=args.weights, data=args.data, environment=environment_info())
    rows = document.setdefault("sets", {}).setdefault(args.set, {"skip": args.skip_samples, "rows": []})["rows"]
    done = {(json.dumps(r["ratios"]), json.dumps(r["margins"])) for r in rows}

    model = load_model(args.model_dir)
    if args.weights:
        load_weights(model, args.weights)
    tokenizer = load_tokenizer(args.model_dir)
    examples = load_squad(args.data)
    end = len(examples) if args.max_samples is None else min(len(examples), args.skip_samples + args.max_samples)
    examples = examples.select(range(args.skip_samples, end))
    features = windows(examples, tokenizer, DataConfig(train=args.data, eval=args.data), train=False, padded=False)
    for config in configs:
        ratios, margins = config.get("ratios"), config.get("margins")
        if (json.dumps(ratios), json.dumps(margins)) in done:
            continue
        with torch.inference_mode():
            metrics, _ = evaluate_features(
                model, examples, features, keep_ratios=ratios, keep_margins=margins, progress=False
            )
        rows.append(
            {
                "ratios": ratios,
                "margins": margins,
                "n": metrics["n"],
                "f1": round(metrics["f1"], 2),
                "em": round(metrics["exact_match"], 2),
                "macs_ratio": metrics["macs_ratio"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        atomic_write_json(args.out, document)  # after every row: a stop loses at most the one being scored
    return 0


if __name__ == "__main__":
    sys.exit(main())
