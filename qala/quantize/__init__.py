"""INT8 quantization of the length-adaptive model: one entry point per approach, one file per backend.

- `quantize_(model, StaticQuantConfig() | DynamicQuantConfig(), calibration, fp32_units=...)`:
  post-training INT8 through Intel Neural Compressor's PT2E path (pt2e.py).
- `prepare_qat_(model, example_batch)` ... train ... `convert_qat_(model)`: INT8 QAT with torchao (qat.py).
- `CompiledQA(model)`: torch.compile over the whole forward, one cached graph per served shape (compile.py).
- `save_quantized` / `load_quantized`: a pickle-free INT8 artifact (int8 weights + scales, safetensors +
  JSON, SHA-256 manifest) that reloads to identical logits (artifact.py).
- `quantize_embeddings_(model)` / `quantize_(..., int8_embeddings=True)`: the word-embedding table int8
  per row (embedding.py).
- `unit_sensitivity(model, config, calibration, score_fn)`: one score per unit, quantized alone or
  left fp32 alone (sensitivity.py).
- `qala.quantize.ipex`: the retired Intel Extension for PyTorch backend (torch 2.8 only), imported on demand
  (by qala.tune for quantization.backend: ipex, by qala.bench's IPEX rows).

All of them work per unit (see units.py): each attention / feed-forward half / span head is exported
with dynamic batch and sequence dims and swapped into the model, so the token selection stays in
Python and one set of quantization parameters serves every length configuration.
"""

from qala.quantize.artifact import ArtifactError, fp32_state_dict, load_quantized, save_quantized
from qala.quantize.compile import CompiledQA
from qala.quantize.embedding import Int8Embedding, quantize_embeddings_
from qala.quantize.pt2e import quantize_
from qala.quantize.qat import QAT_CONFIG, convert_qat_, prepare_qat_
from qala.quantize.sensitivity import unit_sensitivity
from qala.quantize.units import QuantizedUnit, quantizable_units, quantized_units

__all__ = [
    "QAT_CONFIG",
    "ArtifactError",
    "CompiledQA",
    "Int8Embedding",
    "QuantizedUnit",
    "convert_qat_",
    "fp32_state_dict",
    "load_quantized",
    "prepare_qat_",
    "quantizable_units",
    "quantize_",
    "quantize_embeddings_",
    "quantized_units",
    "save_quantized",
    "unit_sensitivity",
]
