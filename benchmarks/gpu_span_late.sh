#!/usr/bin/env bash
# Late-drop training on a lent GPU (issue 19): two variants of recipes/reference_span_gpu*.yaml side by side, every
# epoch's checkpoint scored on the whole dev file (benchmarks/ratio_training.py --weights), the best one sent back.
#   here:  bash ../shared/tools/gpu-pack ../shared/models/minilm-lat-squad-offline; gzip -9 .gpu/data/squad-v1.1/*.json
#   there: source .gpu/setup.sh && gunzip .gpu/data/squad-v1.1/*.gz && bash benchmarks/gpu_span_late.sh  (carry .gpu)
#          VARIANTS=second continues from the first run's export (runs/span_gpu_b64_e6 packed as .gpu/model)
#   back:  bash ../shared/tools/gpu-unpack FILES_AT runs/span_gpu_best; qala.utils.write_manifest (fp16-rounded);
#          $FILES_AT/ratio_training.json holds every variant's and epoch's rows
# Training stops after TRAIN_S seconds, scoring after EVAL_S. Best: highest F1 at [0.95,0.8,0.6,0.4,0.3,0.2]
# (0.58x MACs) among checkpoints whose full length stays within 1% of the reference's 71.18 (FULL_MIN).
set -uo pipefail
TRAIN_S=${TRAIN_S:-290}
EVAL_S=${EVAL_S:-140}
MODEL=${MODEL:-.gpu/model}
DATA=${DATA:-../shared/data/squad-v1.1/dev.json}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set by the device tool}
EXTRA=${EXTRA:-}
FULL_MIN=${FULL_MIN:-70.47}  # 1% below the reference's 71.18
work=${WORK:-/tmp/span_gpu}
rm -rf "$work" && mkdir -p "$work/eval"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"

# first: reference_span_gpu.yaml (batch 64, lr 1e-4, 8 epochs) beside batch 32 / lr 5e-5 / 5 epochs;
# second: reference_span_gpu_cont.yaml (four sandwich draws) beside two draws for 8 epochs.
first=recipes/reference_span_gpu.yaml second=recipes/reference_span_gpu_cont.yaml
args=train.lengthdrop.training_args
declare -A variant=([late-b64]="$first" [late]="$first $args.per_device_train_batch_size=32 $args.learning_rate=5e-5
  $args.num_train_epochs=5")
[ "${VARIANTS:-first}" = first ] ||
  declare -A variant=([cont-b64-s4]="$second" [cont-b64]="$second train.lengthdrop.num_sandwich=2 $args.num_train_epochs=8")
for v in "${!variant[@]}"; do
  # shellcheck disable=SC2086  # overrides are separate words
  timeout "$TRAIN_S" python3 -m qala.train ${variant[$v]} run.output_dir="$work/$v" \
    model.name_or_path="$MODEL" model.teacher="$MODEL" $EXTRA >"$work/train_$v.log" 2>&1 &
done
wait
for v in "${!variant[@]}"; do echo "== $v"; grep -E "train_runtime|samples_per_second|keep_|full|Error|error" "$work/train_$v.log" | tail -12; done

# One scoring process per checkpoint, all at once: the GPU idles during post-processing on the CPU.
shapes=(--shape 1,1,0.9,0.5,0.3,0.2 --shape 1,0.9,0.7,0.45,0.3,0.2 --shape 1,0.85,0.6,0.4,0.25,0.15
  --shape 0.95,0.8,0.6,0.4,0.3,0.2 --shape 0.95,0.8075,0.56525,0.33915,0.20349,0.122094)
for checkpoint in "$work"/*/lengthdrop/checkpoints/checkpoint-*; do
  [ -f "$checkpoint/trainer_state.json" ] || continue
  v=$(basename "$(dirname "$(dirname "$(dirname "$checkpoint")")")")
  step=${checkpoint##*-}
  epoch=$(python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['epoch'], 2))" "$checkpoint/trainer_state.json")
  OMP_NUM_THREADS=1 timeout "$EVAL_S" python3 benchmarks/ratio_training.py "gpu-$v" "$step" "$epoch" "$MODEL" \
    --weights "$checkpoint/model.safetensors" --selection span --device "$DEVICE" --data "$DATA" \
    --recipe "$(echo ${variant[$v]})" --out "$work/eval/$v-$step.json" "${shapes[@]}" \
    >"$work/eval/$v-$step.log" 2>&1 &
done
wait
tail -n 3 "$work"/eval/*.log

# Every scored row into one copy of the results file; the best checkpoint out as a model directory.
python3 - "$work" "$MODEL" "$OUT" "$FULL_MIN" "${!variant[@]}" <<'PY'
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_model as load_weights
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize.load import load_tokenizer
from qala.utils import write_manifest

work, start, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
document = json.loads(Path("benchmarks/results/ratio_training.json").read_text())
for part in sorted((work / "eval").glob("*.json")):
    scored = json.loads(part.read_text())
    document["rows"] += scored["rows"]
    document["variants"].update(scored["variants"])
(out / "ratio_training.json").write_text(json.dumps(document, indent=1))
mine = {f"gpu-{name}" for name in sys.argv[5:]}  # this run's variants: earlier runs' stages are not here
scores = {}  # (variant, step) -> (F1 at the goal shape, full-length F1)
for r in (r for r in document["rows"] if r["variant"] in mine):
    shaped, full = scores.get((r["variant"], r["step"]), (0, 0))
    shaped = r["f1"] if r.get("keep_ratios") == [0.95, 0.8, 0.6, 0.4, 0.3, 0.2] else shaped
    scores[r["variant"], r["step"]] = (shaped, r["f1"] if r["keep_ratio"] == 1.0 else full)
print(scores, flush=True)
best = max(((s, key) for key, (s, full) in scores.items() if full >= float(sys.argv[4])), default=None)
if best is None:
    sys.exit(f"no checkpoint kept full length at or above {sys.argv[4]} F1")
variant, step = best[1]
print("best", best, flush=True)
stage = work / variant.removeprefix("gpu-") / "lengthdrop"
model = LengthAdaptiveForQuestionAnswering.from_pretrained(start)
load_weights(model, str(stage / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"))
model.qala_config.selection = "span"
model.qala_config.length_config = None
dest = work / "best"
model.save_pretrained(dest)
load_tokenizer(start).save_pretrained(dest)
shutil.copy(work / variant.removeprefix("gpu-") / "recipe.yaml", dest / "recipe.yaml")
finished = stage / "model" / "training_info.json"  # absent when the time limit stopped the stage
info = json.loads(finished.read_text()) if finished.is_file() else {"stopped_by": "TRAIN_S time limit"}
(dest / "training_info.json").write_text(json.dumps({**info, "checkpoint": {"variant": variant, "step": step}}))
write_manifest(dest, format="qala-fp32")
PY
for v in "${!variant[@]}"; do tail -n 60 "$work/train_$v.log" >"$OUT/train_$v.log"; done
[ -d "$work/best" ] && bash .gpu/send-back.sh "$work/best"
ls -la "$OUT"
