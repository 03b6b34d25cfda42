"""Shared fixtures: a tiny random BERT QA checkpoint with its own small WordPiece tokenizer, and a static INT8
artifact of it.

Built in the tests (no download, no installed weights), so every test runs on a fresh clone.

Under pytest-xdist (setup.cfg runs `-n auto`) the workers share the CPUs: each one, and every process its tests
start, computes on cpu_count // workers threads (OMP_NUM_THREADS, unless set already) and compiles Inductor
kernels in-process (a compile pool per worker would only start more interpreters on CPUs that are already busy).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, BertConfig, BertTokenizerFast

if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # read by the processes the tests start
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import torch._inductor.config

    torch._inductor.config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """-n auto: one worker per CPU, at most 8 (each holds torch, transformers and INC: ~1 GB), unless
    PYTEST_XDIST_AUTO_NUM_WORKERS says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "qala" / "samples"
SHARED_SQUAD = REPO.parent / "shared" / "data" / "squad-v1.1"


def _sample_words() -> list[str]:
    words: dict[str, int] = {}
    for name in ("squad_sample_train.json", "squad_sample_dev.json"):
        for article in json.loads((SAMPLES / name).read_text())["data"]:
            for paragraph in article["paragraphs"]:
                texts = [paragraph["context"]] + [qa["question"] for qa in paragraph["qas"]]
                for text in texts:
                    for word in re.findall(r"[a-z]+", text.lower()):
                        words[word] = words.get(word, 0) + 1
    return sorted(words, key=lambda w: (-words[w], w))[:600]


def build_tiny_qa_checkpoint(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer, hidden-32 BERT with a QA head and a ~700-token uncased WordPiece vocabulary."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,;:!?'\"()-%$/")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    vocab += [w for w in _sample_words() if w not in vocab]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # `vocab=`, not `vocab_file=`: transformers 5 ignores vocab_file here and builds a 5-token vocabulary
    # (every word [UNK]); qala.quantize.load.load_tokenizer now refuses such a tokenizer.
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True, model_max_length=512)
    assert len(tokenizer) == len(vocab), "the tiny tokenizer lost its vocabulary"
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_qa_checkpoint(tmp_path_factory.mktemp("tiny") / "bert-tiny-qa")


@pytest.fixture(scope="session")
def tiny_int8_artifact(tmp_path_factory, tiny_checkpoint) -> Path:
    """A static INT8 artifact (uncompiled) of tiny_checkpoint, calibrated on random windows at full length and at
    [40, 20]. Built once per session; the tests only read it (a test that writes beside it copies it first).

    Its span head is INT8 and its encoder fp32 (fp32_units, as the recipes' tuning entries do): the benchmark and
    serving tests that use it check the plumbing of an INT8 artifact, and every process loading an artifact
    re-exports each INT8 unit (seconds each). tests/test_quantize.py checks artifacts with every unit INT8."""
    from neural_compressor.torch.quantization import StaticQuantConfig
    from transformers import AutoTokenizer

    from qala.model import LengthAdaptiveForQuestionAnswering
    from qala.quantize import quantize_, save_quantized

    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint).eval()
    batch = {
        "input_ids": torch.randint(5, 600, (2, 64)),
        "attention_mask": torch.ones(2, 64, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 64, dtype=torch.long),
    }
    quantize_(model, StaticQuantConfig(), [batch, {**batch, "length_config": [40, 20]}], fp32_units=["encoder.*"])
    path = tmp_path_factory.mktemp("tiny-int8") / "int8"
    save_quantized(
        model,
        path,
        approach="static",
        fp32_units=["encoder.*"],
        quant_config=StaticQuantConfig().to_dict(),
        tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoint),
    )
    return path


def kill_9_when(marker: Path, args: list[str] | BaseProcess, what: str, timeout: float = 300) -> None:
    """Run `python args...` from the repository (or watch `args`, a started multiprocessing process) and SIGKILL
    it once it creates `marker` (a kill -9 at a known moment of a run: the run waits there for it); fails if the
    run ends first or `what` never happens within `timeout` seconds."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO) if isinstance(args, list) else args
    exit_code = proc.poll if isinstance(proc, subprocess.Popen) else lambda: proc.exitcode
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert exit_code() is None, f"the run ended (exit code {exit_code()}) before {what}"
            assert time.monotonic() < deadline, f"{what} never started"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait() if isinstance(proc, subprocess.Popen) else proc.join()
