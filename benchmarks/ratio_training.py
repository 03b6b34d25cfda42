"""The keep-ratio curve of trained models on real, unpadded windows: benchmarks/results/ratio_training.json + .png.

    python benchmarks/ratio_training.py VARIANT STEP EPOCH MODEL_DIR [--recipe R.yaml] [--shipped]
        [--weights CHECKPOINT/model.safetensors] [--device cuda] [--out FILE]
    python benchmarks/ratio_training.py --plot-only

Each call scores one model (a variant's checkpoint or final model) on the whole evaluation file at
constant keep ratios 1.0, 0.95, 0.9, 0.85, 0.8, 0.7 (layer i keeps r^(i+1) of each window's real tokens)
and appends one row per ratio: {"variant", "step", "epoch", "keep_ratio", "f1", "em", "macs_ratio"}, where
macs_ratio is that configuration's MACs (qala.model.macs_per_sample) summed over the real dev windows over
the same sum at full length. `--shape 1,1,0.9,0.5,0.3,0.2` also scores that per-layer configuration (a row
with keep_ratio null and its keep_ratios). `--margins none,5,4,3.5,3,3` scores that keep_margins configuration
(qala.model: a layer keeps each window's tokens within the margin of its best span score), optionally under a
keep-ratio cap written after a slash (`none,5,5,5,5,5/1,1,0.7,0.4,0.25,0.15`); its macs_ratio counts the tokens
each window actually kept. Rows already present for (variant, step) are kept, not measured again. `--weights`
scores a training checkpoint (the Trainer's model.safetensors) in MODEL_DIR's configuration; `--device` runs
the model there (a GPU session scores every epoch's checkpoint in seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from safetensors.torch import load_model as load_weights

from qala.bench.worker import real_token_macs
from qala.data import load_squad, windows
from qala.evaluate import evaluate_features
from qala.lengths import constant_keep_ratios
from qala.quantize.load import load_model, load_tokenizer
from qala.recipe import DataConfig
from qala.train import read_eval
from qala.utils import atomic_write_json, environment_info

KEEP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
OUT = Path("benchmarks/results/ratio_training.json")


def macs_ratio(config, lengths: list[int], ratios: list[float]) -> float:
    """MACs of `lengths` at `ratios` over the same at full length (qala.bench's real-token MACs)."""
    kept = real_token_macs(config, {"length_config": ratios, "length_mode": "ratio"}, lengths)
    return round(kept / real_token_macs(config, {}, lengths), 4)


def parse_margins(text: str) -> tuple[tuple[float | None, ...], tuple[float, ...] | None]:
    """'none,5,4/1,1,0.7' -> ((None, 5.0, 4.0), (1.0, 1.0, 0.7)); without a slash the cap is None."""
    margins, _, cap = text.partition("/")
    parsed = tuple(None if v.strip().lower() == "none" else float(v) for v in margins.split(","))
    return parsed, tuple(float(v) for v in cap.split(",")) if cap else None


def score(
    args: argparse.Namespace, keeps: tuple[float, ...], shapes: tuple[tuple[float, ...], ...], margins: tuple = ()
) -> list[dict]:
    """One row per constant keep ratio of `keeps` and per configuration of `shapes` (per-layer keep ratios) of
    args.model_dir (--weights, --selection, --device); --eval-json: take the constant rows' EM/F1 from qala.train's
    eval.json of this model (its stage scored the same keep ratios on the same file at the end of training)
    instead of evaluating again."""
    model = load_model(args.model_dir)
    if args.weights:
        load_weights(model, args.weights)
    model.to(args.device)
    if args.selection:
        model.qala_config.selection = args.selection
    tokenizer = load_tokenizer(args.model_dir)
    data = DataConfig(train=args.data, eval=args.data)
    examples = load_squad(args.data)
    features = windows(examples, tokenizer, data, train=False, padded=False)
    lengths = [sum(mask) for mask in features["attention_mask"]]
    scored = read_eval(args.eval_json)["results"] if args.eval_json else {}
    rows = []
    configurations = [(keep, constant_keep_ratios(keep, model.num_layers)) for keep in keeps]
    for keep, ratios in configurations + [(None, list(shape)) for shape in shapes]:
        metrics = scored.get("full" if keep == 1.0 else f"keep_{keep:g}") if keep is not None else None
        if metrics is None:
            served = None if keep == 1.0 else ratios
            metrics, _ = evaluate_features(model, examples, features, keep_ratios=served, progress=False)
        row = {"keep_ratio": keep, **({"keep_ratios": ratios} if keep is None else {})}  # None: per-layer shape
        row.update(f1=round(metrics["f1"], 2), em=round(metrics["exact_match"], 2), n=metrics["n"])
        rows.append({**row, "macs_ratio": macs_ratio(model.config, lengths, ratios)})
        print(rows[-1], flush=True)
    for keep_margins, cap in margins:
        metrics, _ = evaluate_features(
            model, examples, features, keep_ratios=cap, keep_margins=list(keep_margins), progress=False
        )
        row = {"keep_ratio": None, "keep_ratios": cap and list(cap), "keep_margins": list(keep_margins)}
        row.update(f1=round(metrics["f1"], 2), em=round(metrics["exact_match"], 2), n=metrics["n"])
        rows.append({**row, "macs_ratio": metrics["macs_ratio"]})  # measured: each window keeps its own count
        print(rows[-1], flush=True)
    return rows


def plot(document: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from qala.bench.report import figure, save_figure

    fig, ax = figure((6, 4))
    ax.set_prop_cycle(color=[plt.cm.tab20(i / 19) for i in range(20)])  # more variants than the default 10 colours
    # One curve per variant, its last checkpoint, plus the shipped checkpoint: a GPU run scores every epoch.
    last: dict[str, int] = {}
    for row in document["rows"]:
        last[row["variant"]] = max(last.get(row["variant"], 0), row["step"])
    shown = {*last.items(), (document.get("shipped"), document.get("shipped_step"))}
    curves: dict[str, list] = {}
    for row in (r for r in document["rows"] if r["keep_ratio"] is not None and (r["variant"], r["step"]) in shown):
        curves.setdefault(f"{row['variant']} step {row['step']}", []).append((row["macs_ratio"], row["f1"]))
    for name, points in curves.items():
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=name)
    ax.set_xlabel("MACs on real dev windows / full length")
    ax.set_ylabel("F1, whole dev.json, unpadded")
    ax.set_title("Keep-ratio curves (each variant's CPU or GPU: ratio_training.json)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?")
    parser.add_argument("step", nargs="?", type=int)
    parser.add_argument("epoch", nargs="?", type=float)
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--data", default="../shared/data/squad-v1.1/dev.json")
    parser.add_argument("--recipe", help="the recipe that trained this variant (recorded)")
    parser.add_argument("--shipped", action="store_true", help="this variant is the shipped one")
    parser.add_argument("--windows-per-s", type=float, help="the variant's training throughput (recorded)")
    parser.add_argument("--eval-json", help="qala.train's eval.json for this model: reuse its scores")
    parser.add_argument("--selection", help="token ranking rule to score with (qala.model SELECTION_RULES)")
    parser.add_argument("--shape", action="append", default=[], help="also score per-layer keep ratios (repeatable)")
    parser.add_argument(
        "--margins",
        action="append",
        default=[],
        help="also score keep_margins (per layer, 'none' for none), optionally /CAP keep ratios (repeatable)",
    )
    parser.add_argument("--weights", help="a checkpoint's model.safetensors to score in MODEL_DIR's configuration")
    parser.add_argument("--device", default="cpu", help="where the model runs (e.g. cuda)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the results file (default {OUT})")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    environment = environment_info()
    document = json.loads(args.out.read_text()) if args.out.is_file() else {"cpu": environment["cpu"], "rows": []}
    if not args.plot_only:
        if None in (args.variant, args.step, args.epoch, args.model_dir):
            parser.error("VARIANT STEP EPOCH MODEL_DIR are required unless --plot-only")
        mine = [r for r in document["rows"] if (r["variant"], r["step"]) == (args.variant, args.step)]
        keeps = tuple(k for k in KEEP_RATIOS if k not in {r["keep_ratio"] for r in mine})
        seen = {tuple(r["keep_ratios"]) for r in mine if r["keep_ratio"] is None and not r.get("keep_margins")}
        shapes = tuple(s for s in (tuple(float(v) for v in text.split(",")) for text in args.shape) if s not in seen)
        seen_margins = {
            (tuple(r["keep_margins"]), tuple(r["keep_ratios"]) if r["keep_ratios"] else None)
            for r in mine
            if r.get("keep_margins")
        }
        margins = tuple(m for m in map(parse_margins, args.margins) if m not in seen_margins)
        entry = document.setdefault("variants", {}).setdefault(args.variant, {})
        if keeps or shapes or margins:
            key = {"variant": args.variant, "step": args.step, "epoch": args.epoch}
            document["rows"] += [{**key, **r} for r in score(args, keeps, shapes, margins)]
            # Variants are scored in different sessions, on whatever CPU the session had.
            entry.update(cpu=environment["cpu"], date=dt.date.today().isoformat())
            entry.update({"device": environment.get("cuda") or args.device} if args.device != "cpu" else {})
        entry.update({k: v for k, v in {"recipe": args.recipe, "windows_per_s": args.windows_per_s}.items() if v})
        # The rule the rows were scored with: --selection, else the one the model directory records.
        config = Path(args.model_dir) / "qala_config.json"
        recorded = json.loads(config.read_text()).get("selection") if config.is_file() else None
        entry.update(
            model_dir=args.model_dir, selection=args.selection or recorded or entry.get("selection") or "attention"
        )
        if args.shipped:
            document.update(shipped=args.variant, recipe=args.recipe, windows_per_s=args.windows_per_s)
        document.update(data=args.data, environment=environment)
        atomic_write_json(args.out, document)
    plot(document, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
