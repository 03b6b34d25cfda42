"""Where a keep configuration loses F1: in which tokens it keeps, or in the states of those it keeps?

    python benchmarks/answer_survival.py MODEL_DIR [--keep 0.85] [--questions 300]

On the first N questions of the dev file (train-style windows: those holding the gold answer), at a
constant keep ratio, unpadded: the share of windows whose gold start and end tokens both reach the last
layer (qala.model's `reached_last`), the share whose predicted start is a dropped token (its logit comes
from the state of the layer that dropped it), and start accuracy against the gold start at full length
and dropped. Appends one row to benchmarks/results/answer_survival.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

from qala.data import featurize, load_squad
from qala.model import batch_inputs, constant_keep_ratios
from qala.quantize.load import load_model, load_tokenizer
from qala.utils import atomic_write_json, environment_info

OUT = Path("benchmarks/results/answer_survival.json")


def measure(model_dir: str, data_file: str, keep: float, questions: int, batch_size: int = 16) -> dict:
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    windows = featurize(load_squad(data_file).select(range(questions)), tokenizer, train=True)
    windows = windows.filter(lambda w: w["start_positions"] > 0)  # 0: the answer is not in this window
    ratios = constant_keep_ratios(keep, model.num_layers)
    counts = {"windows": 0, "answer_reaches_last_layer": 0, "predicted_start_dropped": 0}
    counts |= {"start_correct_full": 0, "start_correct_dropped": 0}
    for i in range(0, len(windows), batch_size):
        rows = windows[i : i + batch_size]
        inputs = batch_inputs(rows)
        start, end = torch.tensor(rows["start_positions"]), torch.tensor(rows["end_positions"])
        padding = inputs["attention_mask"] == 0
        with torch.no_grad():
            dropped = model(**inputs, keep_ratios=ratios, output_hidden_states=True)
            full = model(**inputs)
        reached = dropped.reached_last
        predicted = dropped.start_logits.masked_fill(padding, -1e9).argmax(1)
        counts["windows"] += len(start)
        counts["answer_reaches_last_layer"] += int(
            (reached.gather(1, start[:, None]) & reached.gather(1, end[:, None])).sum()
        )
        counts["predicted_start_dropped"] += int((~reached.gather(1, predicted[:, None])).sum())
        counts["start_correct_dropped"] += int((predicted == start).sum())
        counts["start_correct_full"] += int((full.start_logits.masked_fill(padding, -1e9).argmax(1) == start).sum())
    shares = {f"{k}_share": round(v / counts["windows"], 4) for k, v in counts.items() if k != "windows"}
    return {
        "model_dir": model_dir,
        "keep_ratio": keep,
        "keep_ratios": ratios,
        "questions": questions,
        **counts,
        **shares,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--data", default="../shared/data/squad-v1.1/dev.json")
    parser.add_argument("--keep", type=float, default=0.85)
    parser.add_argument("--questions", type=int, default=300)
    args = parser.parse_args(argv)
    row = measure(args.model_dir, args.data, args.keep, args.questions)
    environment = environment_info()
    document = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    document["rows"].append({**row, "date": dt.date.today().isoformat(), "cpu": environment["cpu"]})
    document.update(data=args.data, environment=environment, command=" ".join(["python", *sys.argv]))
    atomic_write_json(OUT, document)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
