#!/usr/bin/env bash
# bash benchmarks/ipex_env.sh [VENV_DIR]        (default: .venv-ipex at the repository root)
#
# The environment the IPEX backend runs in. Intel Extension for PyTorch is retired: its last release, 2.8,
# imports only with torch 2.8 while qala pins torch 2.13, so IPEX gets its own venv: torch 2.8.0 (the CPU
# wheel index first; where unreachable, PyPI's CUDA build, ~7 GB, which runs on CPU), IPEX 2.8.0, qala's
# runtime dependencies, then qala itself with --no-deps (its torch pin would replace torch 2.8). Idempotent.
# CI does not run it; tests/test_ipex.py uses the environment when it exists and skips otherwise.
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

torch_now="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
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

# Pins found by running it (November 2026), torch held at 2.8.0 by a constraint: transformers < 5.24 (IPEX 2.8's
# import reads transformers.modeling_attn_mask_utils, which 5.24 removed); neural-compressor-pt 3.10 (INC's
# static INT8 still has the IPEX path qala.quantize.ipex calibrates with); torchao 0.13.0 (0.18 fails on torch 2.8).
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
"$PY" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|intel-extension|neural-compressor|torchao|transformers|datasets|qala) " || true
"$PY" -c 'import torch, intel_extension_for_pytorch as ipex, qala.quantize.ipex as q; q.import_ipex(); print(f"  torch {torch.__version__}, IPEX {ipex.__version__}: OK")'
