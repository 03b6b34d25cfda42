#!/usr/bin/env bash
# bash benchmarks/ipex_env.sh [VENV_DIR]        (default: .venv-ipex at the repository root)
#
# Builds the environment the IPEX backend runs in, beside qala's main one. Intel Extension for
# PyTorch is retired: its last release, 2.8, imports only with torch 2.8, while qala pins torch 2.13,
# so IPEX cannot share the main environment. Installs torch 2.8.0, intel-extension-for-pytorch 2.8.0,
# transformers, datasets, accelerate, pyyaml, tqdm, safetensors, numpy, then qala itself with
# --no-deps (its torch==2.13 pin would otherwise replace torch 2.8).
#
# torch: the CPU wheel index (download.pytorch.org) is tried first with a short timeout; where it is
# unreachable, PyPI's torch 2.8.0 is a CUDA build (about 7 GB with its nvidia-* dependencies; it runs
# on CPU). Idempotent: a second run installs nothing new and prints the same versions. CI does not
# run this script; tests/test_ipex.py uses the environment when it exists and skips otherwise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-ipex}"
TORCH_VERSION="2.8.0"
IPEX_VERSION="2.8.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
PY="$VENV/bin/python"

say() { printf '[ipex_env] %s\n' "$*"; }

if [[ ! -x "$PY" ]]; then
    say "creating $VENV with $(python3 --version)"
    python3 -m venv "$VENV"
else
    say "using existing $VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check)

installed_version() {  # the installed version of a distribution, or nothing
    "$PY" - "$1" <<'EOF'
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    pass
EOF
}

torch_now="$(installed_version torch)"
if [[ "${torch_now%%+*}" == "$TORCH_VERSION" ]]; then
    say "torch $torch_now already installed"
else
    say "installing torch==$TORCH_VERSION (trying the CPU index $CPU_INDEX first)"
    if "${PIP[@]}" --timeout 15 --retries 0 --index-url "$CPU_INDEX" "torch==$TORCH_VERSION+cpu"; then
        say "torch from the CPU index"
    else
        say "CPU index unreachable or without the wheel: installing torch==$TORCH_VERSION from PyPI (CUDA build, ~7 GB)"
        "${PIP[@]}" "torch==$TORCH_VERSION"
    fi
fi

# Everything else is resolved by pip with torch held at 2.8.0 (a constraint, so no later package can
# upgrade it), with three pins found by running it (November 2026):
# - transformers < 5.24: IPEX 2.8's `import intel_extension_for_pytorch` reads
#   transformers.modeling_attn_mask_utils, which 5.24 removed (NameError: MoeModelOutputWithPast).
# - neural-compressor-pt 3.10: INC's static INT8 still has its IPEX path (used when IPEX is imported and
#   the model is not an exported graph); it is how qala.quantize.ipex calibrates.
# - torchao 0.13.0 (the release for torch 2.8): INC brings torchao, which transformers imports when present,
#   and torchao 0.18 (the newest) fails to import on torch 2.8 (ScalingType missing from torch.nn.functional).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')" >"$CONSTRAINTS"
say "installing intel-extension-for-pytorch==$IPEX_VERSION and qala's runtime dependencies"
"${PIP[@]}" -c "$CONSTRAINTS" "intel-extension-for-pytorch==$IPEX_VERSION" \
    "neural-compressor-pt==3.10" "torchao==0.13.0" "transformers>=5.0,<5.24" "datasets>=4.0" "accelerate>=1.0" \
    "safetensors>=0.4" "pyyaml>=6.0" "numpy>=1.26" "tqdm>=4.66" psutil
say "installing qala (editable, --no-deps) from $REPO"
"${PIP[@]}" --no-deps -e "$REPO"

say "installed:"
"$PY" - <<'EOF'
import importlib.metadata as m
for dist in ("torch", "intel-extension-for-pytorch", "neural-compressor-pt", "torchao", "transformers", "datasets",
             "accelerate", "safetensors", "pyyaml", "numpy", "tqdm", "qala"):
    try:
        print(f"  {dist}=={m.version(dist)}")
    except m.PackageNotFoundError:
        print(f"  {dist}: MISSING")
EOF
say "import check:"
"$PY" -c 'import torch, intel_extension_for_pytorch as ipex, qala.quantize.ipex as q; q.import_ipex(); print(f"  torch {torch.__version__}, IPEX {ipex.__version__}: OK")'
# pip check is expected to name qala's own pins (torch==2.13.0, matplotlib): qala is installed --no-deps.
"$PY" -m pip check || say "pip check: qala's torch==2.13 / matplotlib requirements are expected here (installed --no-deps)"
