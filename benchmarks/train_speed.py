"""Training throughput on this CPU: windows/s of a fine-tune step and a LengthDrop step, fp32 and bf16,
with the attention qala trained with before (eager, dropout 0.1 on the probabilities) and now (SDPA, no
attention dropout: recipe key train.<stage>.attention_dropout_prob: 0).

    python benchmarks/train_speed.py [--model DIR] [--batch 16] [--repeats 3] [--out FILE.json]

Each step is QalaTrainer.compute_loss + backward + AdamW step on the same `--batch` real train.json windows
(drawn with a fixed seed, padded to the longest of them), timed with qala's one timer after a warm-up step.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, TrainingArguments

from qala.data import load_split, windows
from qala.model import MODEL_INPUTS, LengthAdaptiveForQuestionAnswering
from qala.quantize.load import load_tokenizer
from qala.recipe import DataConfig, StageConfig
from qala.train import QalaTrainer, _use_fused_attention
from qala.utils import atomic_write_json, environment_info, latency_stats, time_calls

COLUMNS = (*MODEL_INPUTS, "start_positions", "end_positions")


def batch_of(model_dir: str, train: str, size: int, seed: int) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(model_dir)
    data = DataConfig(train=train, eval=train, max_train_samples=size * 8)
    features = windows(load_split(data, "train"), tokenizer, data, train=True)
    rows = random.Random(seed).sample(range(len(features)), size)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    return collate([{k: features[i][k] for k in COLUMNS} for i in rows])


def step_seconds(
    model_dir: str, batch: dict, *, lengthdrop: bool, bf16: bool, fused: bool, repeats: int
) -> list[float]:
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(model_dir).train()
    stage = StageConfig(attention_dropout_prob=0.0 if fused else None)
    _use_fused_attention(model, stage.attention_dropout_prob)
    args = TrainingArguments(output_dir="/tmp/qala_train_speed", use_cpu=True, report_to=[], bf16=bf16)
    trainer = QalaTrainer(model=model, args=args, stage=stage, lengthdrop=lengthdrop)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return time_calls(step, warmup=1, repeats=repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/minilm-lat-squad-offline")
    parser.add_argument("--train", default="../shared/data/squad-v1.1/train.json")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = parser.parse_args(argv)
    batch = batch_of(args.model, args.train, args.batch, args.seed)
    rows = []
    for lengthdrop, fused, bf16 in itertools.product((False, True), repeat=3):
        seconds = step_seconds(args.model, batch, lengthdrop=lengthdrop, bf16=bf16, fused=fused, repeats=args.repeats)
        stats = latency_stats(seconds, batch_size=args.batch)
        row = {"step": "lengthdrop" if lengthdrop else "finetune", "dtype": "bf16 autocast" if bf16 else "fp32"}
        row["attention"] = "sdpa, no attention dropout" if fused else "eager, attention dropout 0.1"
        row.update(seconds_per_step=round(stats["median_ms"] / 1000, 3), windows_per_s=stats["per_second"])
        rows.append({**row, "repeats": stats["repeats"]})
        print(rows[-1], flush=True)
    mask = batch["attention_mask"]
    shape = {
        "windows": args.batch,
        "padded_to": int(mask.size(1)),
        "mean_real_tokens": float(mask.sum(1).float().mean()),
    }
    command = "python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command, "model": str(Path(args.model)), "batch": shape}
    record["lengthdrop"] = "full + smallest + 2 random sub-models (num_sandwich 2, bound 0.2, ratio units)"
    atomic_write_json(args.out, {**record, "rows": rows, "environment": environment_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
