"""Model-directory integrity: every damaged, edited or missing file is one line naming it and exit 2, never a
silently wrong model (issue 13).

The directories are built here as qala.train saves a stage model (save_pretrained, the tokenizer, then
the manifest), from conftest's tiny checkpoint with a real 703-token tokenizer.
"""

import json
import logging
import re
import shutil

import pytest
from neural_compressor.torch.quantization import DynamicQuantConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertTokenizerFast

from qala.answer import main as answer_main
from qala.evaluate import main as evaluate_main
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize import quantize_, save_quantized
from qala.quantize.load import load_model, load_tokenizer
from qala.tune import main as tune_main
from qala.utils import MANIFEST_NAME, IntegrityError, sha256_file, write_manifest
from tests.conftest import REPO, SAMPLES, build_tiny_qa_checkpoint
from tests.test_model import make_batch

DATA = SAMPLES / "squad_sample_dev.json"
EVAL_OPTIONS = ("--max-samples", "2", "--max-seq-length", "128", "--doc-stride", "64")
QUESTION, CONTEXT = "Who founded the city?", "The city was founded by the Romans in 43 AD."


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A transformers QA checkpoint with a working tokenizer and no manifest (as from the hub)."""
    path = build_tiny_qa_checkpoint(tmp_path_factory.mktemp("integrity") / "plain")
    # transformers 5 reads `vocab=`, not `vocab_file=`: rebuild the tokenizer from vocab.txt.
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(plain_dir):
    """A stage model as qala.train writes it: weights, configs, tokenizer, recipe, then manifest.json."""
    path = plain_dir.parent / "trained"
    LengthAdaptiveForQuestionAnswering.from_pretrained(plain_dir).save_pretrained(path)
    load_tokenizer(plain_dir).save_pretrained(path)
    (path / "recipe.yaml").write_text("run: {seed: 7}\n")
    (path / "training_info.json").write_text('{"stage": "finetune"}\n')
    write_manifest(path, format="qala-fp32")
    return path


def variant(source, tmp_path, name="variant"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def evaluate_error(path, capsys) -> str:
    """The one error line of `python -m qala.evaluate PATH DATA` (which must exit 2)."""
    capsys.readouterr()
    assert evaluate_main([str(path), str(DATA), *EVAL_OPTIONS]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def answer_error(path, capsys) -> str:
    capsys.readouterr()
    assert answer_main(["--model", str(path), "--question", QUESTION, "--context", CONTEXT, "--backend", "eager"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_intact_directories_load_and_tokenize_real_words(model_dir, plain_dir, caplog, capsys):
    assert set(json.loads((model_dir / MANIFEST_NAME).read_text())["sha256"]) == {
        "config.json",
        "qala_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "recipe.yaml",
        "training_info.json",
    }
    tokenizer = load_tokenizer(model_dir)
    assert len(tokenizer) == 703 and "[UNK]" not in tokenizer.tokenize("who founded the city")
    # Files later stages write into a model directory on purpose are outside the manifest.
    installed = variant(model_dir, model_dir.parent, "installed")
    (installed / "frontier.json").write_text('{"frontier": []}')
    (installed / "latency_host.json").write_text("{}")
    load_model(installed)
    # A directory without a manifest (a plain transformers checkpoint) loads, with a note.
    with caplog.at_level(logging.INFO, logger="qala.quantize.load"):
        load_model(plain_dir)
    assert f"{plain_dir}: no manifest.json, its files are not verified" in caplog.text
    assert evaluate_main([str(model_dir), str(DATA), *EVAL_OPTIONS]) == 0


def test_missing_tokenizer_files_are_refused(plain_dir, model_dir, tmp_path, capsys):
    """Silent before: transformers built a 5-token vocabulary, every word [UNK]; evaluate exited 0, answer gave ""."""
    bare = variant(plain_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (bare / name).unlink()
    line = f"error: {bare}: no tokenizer files; expected tokenizer.json, vocab.txt"
    assert evaluate_error(bare, capsys).startswith(line)
    assert answer_error(bare, capsys).startswith(line)
    with pytest.raises(IntegrityError, match="no tokenizer files"):
        load_tokenizer(bare)
    # In a directory with a manifest, the manifest names the file that went missing.
    trained = variant(model_dir, tmp_path, "trained")
    (trained / "tokenizer.json").unlink()
    assert evaluate_error(trained, capsys) == f"error: {trained / 'tokenizer.json'}: missing (listed in manifest.json)"


def test_tokenizer_smaller_than_the_model_vocabulary_is_refused(plain_dir, tmp_path, capsys):
    """Silent before: a tokenizer.json holding only the special tokens (what `BertTokenizerFast(vocab_file=...)`
    writes under transformers 5) loaded, and every word became [UNK]."""
    broken = variant(plain_dir, tmp_path)
    (broken / "vocab.txt").unlink()
    BertTokenizerFast(vocab_file=str(plain_dir / "vocab.txt"), do_lower_case=True).save_pretrained(broken)
    expected = (
        f"error: {broken}: the tokenizer (tokenizer.json) has 5 tokens, config.json's vocab_size is 703: "
        "tokenizer files that do not belong to this model, or are damaged"
    )
    assert evaluate_error(broken, capsys) == expected
    assert answer_error(broken, capsys) == expected


def test_fp32_manifest_names_the_changed_file(model_dir, tmp_path, capsys):
    """Silent before: 0xFF bytes in model.safetensors loaded as NaN embeddings and evaluate exited 0."""
    damaged = variant(model_dir, tmp_path, "damaged")
    weights = damaged / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 4)
        f.write(b"\xff" * (1 << 20))
    expected = (
        f"error: {weights}: SHA-256 differs from manifest.json; the file changed after saving (edited or truncated)"
    )
    assert evaluate_error(damaged, capsys) == expected
    assert answer_error(damaged, capsys) == expected
    edited = variant(model_dir, tmp_path, "edited")
    config = json.loads((edited / "qala_config.json").read_text())
    (edited / "qala_config.json").write_text(json.dumps({**config, "keep_ratios": [0.5, 0.25]}))
    with pytest.raises(IntegrityError, match="qala_config.json: SHA-256 differs from manifest.json"):
        load_model(edited)
    # The tokenizer seam alone (qala.bench tokenizes with it) checks the tokenizer files it reads.
    tokenizer_config = edited / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace("true", "false"))
    with pytest.raises(IntegrityError, match="tokenizer_config.json: SHA-256 differs"):
        load_tokenizer(edited)


def test_non_finite_fp32_weights_are_refused_by_name(plain_dir, tmp_path, capsys):
    """Silent before, without a manifest to catch it: NaN weights (a diverged run) answered garbage, exit 0."""
    diverged = variant(plain_dir, tmp_path)
    weights = load_file(diverged / "model.safetensors")
    weights["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    save_file(weights, diverged / "model.safetensors", metadata={"format": "pt"})
    assert evaluate_error(diverged, capsys) == (
        f"error: {diverged / 'model.safetensors'}: bert.encoder.layer.1.output.dense.weight holds 1 NaN/inf values "
        "of 2048; the weights are unusable (a diverged training run, or a damaged file)"
    )
    # The probe's damage, without a manifest: named by the first tensor it reaches.
    overwritten = variant(plain_dir, tmp_path, "overwritten")
    file = overwritten / "model.safetensors"
    with file.open("r+b") as f:
        f.seek(20_000)
        f.write(b"\xff" * (file.stat().st_size - 20_000))
    line = answer_error(overwritten, capsys)
    assert line.startswith(f"error: {file}: bert.") and "NaN/inf values" in line


def test_non_finite_int8_weights_are_refused_by_name(plain_dir, tmp_path):
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(plain_dir).eval()
    input_ids, mask, token_type_ids = make_batch(vocab=700)
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}
    config = DynamicQuantConfig(w_granularity="per_channel")
    quantize_(model, config, [batch])
    artifact = tmp_path / "int8"
    save_quantized(model, artifact, approach="dynamic", quant_config=config.to_dict())
    file = artifact / "int8_weights.safetensors"
    weights = load_file(file)
    weights["bert.encoder.layer.0.output.LayerNorm.weight"][3] = float("inf")
    save_file(weights, file)
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest["sha256"][file.name] = sha256_file(file)  # a consistent file set, as saved from a diverged model
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=f"{file}: bert.encoder.layer.0.output.LayerNorm.weight holds 1 NaN/inf"):
        load_model(artifact)


def test_truncated_weights_name_the_file(plain_dir, model_dir, tmp_path, capsys):
    truncated = variant(plain_dir, tmp_path)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = evaluate_error(truncated, capsys)
    assert line.startswith(f"error: {weights}: cannot be read as safetensors (")
    assert line.endswith("); truncated or damaged?")
    trained = variant(model_dir, tmp_path, "trained")
    weights = trained / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert answer_error(trained, capsys) == (
        f"error: {weights}: SHA-256 differs from manifest.json; the file changed after saving (edited or truncated)"
    )


def test_config_that_does_not_fit_the_weights_names_config_and_tensor(plain_dir, tmp_path, capsys):
    edited = variant(plain_dir, tmp_path)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    expected = (
        f"error: {edited / 'config.json'}: does not fit model.safetensors: bert.embeddings.LayerNorm.bias has shape "
        "[32], config.json makes it [48] (config edited, or weights of another model?)"
    )
    assert evaluate_error(edited, capsys) == expected
    assert answer_error(edited, capsys) == expected


def test_backbone_without_span_head_is_refused(plain_dir, tmp_path):
    """Silent before: transformers initialises a missing QA head at random, and the model answers noise."""
    backbone = tmp_path / "backbone"
    AutoModel.from_pretrained(plain_dir).save_pretrained(backbone)
    with pytest.raises(IntegrityError, match=r"model.safetensors: no span head \(qa_outputs.weight\)"):
        load_model(backbone)


def test_missing_model_directory_is_one_line_from_every_loader(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    for load in (load_model, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=f"^model directory not found: {missing}$"):
            load(missing)
    # A relative path of three parts is no hub id either.
    with pytest.raises(FileNotFoundError, match="^model directory not found: runs/x/model$"):
        load_tokenizer("runs/x/model")
    expected = f"error: model directory not found: {missing}"
    assert evaluate_error(missing, capsys) == expected
    assert answer_error(missing, capsys) == expected
    capsys.readouterr()
    recipe = REPO / "recipes" / "quickstart.yaml"
    overrides = [f"quantization.model={missing}", f"quantization.output_dir={tmp_path / 'out'}"]
    overrides.append(f"model.name_or_path={tmp_path}")  # not the installed MiniLM package: any directory will do
    assert tune_main([str(recipe), *overrides]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected


def test_a_manifest_covers_the_whole_file_set_of_its_kind(plain_dir, model_dir, tmp_path, capsys):
    """Silent before: a tokenizer line removed from an INT8 manifest, then the tokenizer edited, loaded (exit 0)."""
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(plain_dir).eval()
    input_ids, mask, token_type_ids = make_batch(vocab=700)
    config = DynamicQuantConfig(w_granularity="per_channel")
    quantize_(model, config, [{"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}])
    artifact = tmp_path / "int8"
    tokenizer = load_tokenizer(plain_dir)
    save_quantized(model, artifact, approach="dynamic", quant_config=config.to_dict(), tokenizer=tokenizer)
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    del manifest["sha256"]["tokenizer.json"]
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest))
    tokenizer_file = artifact / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text().replace('"lake"', '"lake_"'))
    expected = f"{tokenizer_file}: not listed in manifest.json; added, or its entry removed, after saving"
    for load in (load_model, load_tokenizer):
        with pytest.raises(IntegrityError, match=re.escape(expected)):
            load(artifact)
    # A file of the kind's fixed set that the manifest no longer lists (removed with its file) is named.
    for name, kind in (("observers.safetensors", artifact), ("training_info.json", model_dir)):
        lost = variant(kind, tmp_path, f"lost-{name}")
        manifest = json.loads((lost / MANIFEST_NAME).read_text())
        del manifest["sha256"][name]
        (lost / MANIFEST_NAME).write_text(json.dumps(manifest))
        (lost / name).unlink()
        with pytest.raises(IntegrityError, match=re.escape(f"does not list {name}; a {manifest['format']} directory")):
            load_model(lost)
    # The writer refuses a directory without its set.
    incomplete = variant(plain_dir, tmp_path, "incomplete")
    with pytest.raises(ValueError, match="cannot write a qala-fp32 manifest without qala_config.json"):
        write_manifest(incomplete, format="qala-fp32")
