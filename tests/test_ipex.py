"""The IPEX backend (qala.quantize.ipex) on a tiny model, run in the IPEX environment.

IPEX 2.8 needs torch 2.8, so it cannot run in qala's main environment: these tests drive
`.venv-ipex/bin/python` (built by `bash benchmarks/ipex_env.sh`; another interpreter through
QALA_IPEX_PYTHON) in a subprocess and compare its INT8 logits with fp32 logits computed here. Where that
environment is absent (CI), they skip and say so. No timing is asserted.
"""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qala.model import LengthAdaptiveForQuestionAnswering
from tests.conftest import REPO

IPEX_PYTHON = Path(os.environ.get("QALA_IPEX_PYTHON", REPO / ".venv-ipex" / "bin" / "python"))
LENGTH_CONFIG = [40, 24]  # of 64 padded positions, 2 layers
SEQ, BATCH = 64, 4
# INT8 vs fp32 on the tiny random model (hidden 32): the largest logit error on real positions must stay
# within 5% of the largest fp32 logit. Seen: 0.9-1.1% (max error about 0.003 on logits up to 0.29).
RELATIVE_TOLERANCE = 0.05
# The driver's exit status when IPEX is installed but unusable (a skip, with its message).
EXIT_IPEX_UNAVAILABLE = 77

DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from qala.quantize import ipex

    model_dir, work = sys.argv[1], sys.argv[2]
    try:
        ipex.import_ipex()
    except ipex.IpexUnavailableError as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_IPEX_UNAVAILABLE)
    from qala.model import LengthAdaptiveForQuestionAnswering

    data = load_file(f"{work}/inputs.safetensors")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batch = {k: data[k] for k in keys}
    calibration = [{k: data[f"cal{i}.{k}"] for k in keys} for i in range(3)]
    length_config = json.loads(sys.argv[3])
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(model_dir).eval()

    qa = ipex.IpexStaticQA(model, calibration)
    out, facts = {}, {"versions": ipex.versions()}
    for name, lengths in (("full", None), ("cut", length_config)):
        result = qa(length_config=lengths, **batch)
        out[f"{name}.start"], out[f"{name}.end"] = result.start_logits, result.end_logits
        one = qa(length_config=lengths, **{k: v[:1] for k, v in batch.items()})  # another shape, another graph
        out[f"{name}.start_b1"] = one.start_logits
        graph = qa.graph(lengths, **batch)
        facts[name] = {
            "calibrated_with": qa.calibrated_with[None if lengths is None else tuple(lengths)],
            "int8_ops": "quantize_per_tensor" in str(graph.graph_for(*(batch[k] for k in keys))),
        }
    try:  # keep ratios (top-k sizes per row) cannot be traced: refused, never served as full length
        qa(keep_ratios=[0.5, 0.5], **batch)
        facts["keep_ratios_refused"] = False
    except ValueError:
        facts["keep_ratios_refused"] = True
    # The worker path: calibration saved, reloaded in a fresh IpexStaticQA, no calibration data.
    qa.save_summaries(f"{work}/calibration.json")
    call, worker_facts = ipex.timing_callable(model_dir, length_config, batch, summaries=f"{work}/calibration.json")
    out["worker.start"], out["worker.end"] = call(batch)
    facts["worker"] = {k: worker_facts[k] for k in ("engine", "calibrated_with", "summaries_sha256")}
    save_file({k: v.contiguous() for k, v in out.items()}, f"{work}/outputs.safetensors")
    print(json.dumps(facts))
    """
).replace("EXIT_IPEX_UNAVAILABLE", str(EXIT_IPEX_UNAVAILABLE))


def _batch(seed: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """BATCH windows of SEQ positions: [CLS] question [SEP] context [SEP], then padding (real lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for row, real in enumerate((SEQ, 52, 45, 60)):
        mask[row, :real] = 1
        types[row, 12:real] = 1
        ids[row, 0], ids[row, 11], ids[row, real - 1] = 2, 3, 3
        ids[row, real:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def ipex_run(tiny_checkpoint, tmp_path_factory):
    """Run the driver once in the IPEX environment: (fp32 logits from here, its outputs, its facts)."""
    if not IPEX_PYTHON.is_file():
        pytest.skip(f"IPEX environment not built ({IPEX_PYTHON} missing): bash benchmarks/ipex_env.sh builds it")
    work = tmp_path_factory.mktemp("ipex")
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(tiny_checkpoint)).eval()
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    vocab = model.config.vocab_size
    batch = _batch(0, vocab)
    tensors = dict(batch)
    for i in range(3):
        tensors.update({f"cal{i}.{k}": v for k, v in _batch(100 + i, vocab).items()})
    save_file(tensors, str(work / "inputs.safetensors"))
    with torch.no_grad():
        fp32 = {
            name: model(**batch, length_config=lengths) for name, lengths in (("full", None), ("cut", LENGTH_CONFIG))
        }
    proc = subprocess.run(
        [str(IPEX_PYTHON), "-c", DRIVER, str(model_dir), str(work), json.dumps(LENGTH_CONFIG)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    if proc.returncode == EXIT_IPEX_UNAVAILABLE:
        pytest.skip(f"IPEX environment present but unusable: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    return batch, fp32, load_file(str(work / "outputs.safetensors")), facts


@pytest.mark.parametrize("name", ["full", "cut"])
def test_ipex_int8_tracks_fp32(ipex_run, name):
    batch, fp32, out, facts = ipex_run
    assert facts[name]["calibrated_with"].startswith("inc "), facts  # INC's IPEX path ran, not the fallback
    assert facts[name]["int8_ops"], "the frozen graph has no quantize op: it is not INT8"
    real = batch["attention_mask"].bool()
    for side, expected in (("start", fp32[name].start_logits), ("end", fp32[name].end_logits)):
        got = out[f"{name}.{side}"]
        error = (got - expected)[real].abs().max().item()
        scale = expected[real].abs().max().item()
        assert 0 < error <= RELATIVE_TOLERANCE * scale, f"{name} {side}: max error {error:.4f}, fp32 max {scale:.4f}"


@pytest.mark.parametrize("name", ["full", "cut"])
def test_ipex_graphs_of_other_batch_sizes_agree(ipex_run, name):
    _, _, out, _ = ipex_run
    torch.testing.assert_close(out[f"{name}.start_b1"][0], out[f"{name}.start"][0], atol=1e-4, rtol=0)


def test_ipex_worker_reloads_the_calibration_exactly(ipex_run):
    """timing_callable on a saved calibration serves the same INT8 model (what the benchmark times)."""
    _, _, out, facts = ipex_run
    assert facts["worker"]["engine"] == "ipex" and facts["worker"]["calibrated_with"].startswith("inc ")
    assert len(facts["worker"]["summaries_sha256"]) == 64
    assert torch.equal(out["worker.start"], out["cut.start"]) and torch.equal(out["worker.end"], out["cut.end"])


def test_ipex_refuses_keep_ratios(ipex_run):
    assert ipex_run[3]["keep_ratios_refused"]


def test_without_ipex_every_entry_point_names_the_environment_script():
    from qala.quantize import ipex

    installed, _ = ipex.ipex_status()
    if installed is not None and torch.__version__.startswith(ipex.REQUIRED_MINOR):
        pytest.skip("IPEX is usable in this interpreter; the error path is for environments without it")
    with pytest.raises(ipex.IpexUnavailableError, match=r"benchmarks/ipex_env\.sh"):
        ipex.import_ipex()
    with pytest.raises(ipex.IpexUnavailableError, match=r"torch 2\.8\.x and intel-extension-for-pytorch 2\.8\.x"):
        ipex.calibrate(torch.nn.Linear(2, 2), None, [])
