"""Run state shared by every stage: one run per output folder (the lock), content hashes, what-changed lines."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from qala.bench import cli as bench_cli
from qala.recipe import changed_keys
from qala.search import main as search_main
from qala.stage import stage_lock, stored_record
from qala.train import main as train_main
from qala.tune import main as tune_main
from qala.utils import OutputInUseError, content_hash, output_lock
from tests.conftest import REPO, build_tiny_qa_checkpoint

# Every stage writes into the same folder here, so each must find it locked.
RECIPE = """
run: {{output_dir: {out}}}
data:
  train: package://qala/samples/squad_sample_train.json
  eval: package://qala/samples/squad_sample_dev.json
quantization: {{output_dir: {out}}}
search: {{output_dir: {out}}}
benchmark: {{output_dir: {out}}}
"""

HOLD_LOCK = """
import sys, time
from qala.utils import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_output_lock_refuses_a_second_holder_until_the_first_lets_go(tmp_path):
    with output_lock(tmp_path / "out") as lock:
        assert lock.is_file()
        with pytest.raises(OutputInUseError, match=r"out is in use by another qala run \(pid \d+, started "):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released on leaving the block
        pass
    # ... and on an exception inside it.
    with pytest.raises(KeyError), output_lock(tmp_path / "out"):
        raise KeyError("boom")
    with output_lock(tmp_path / "out"):
        pass


@pytest.mark.parametrize(
    "main", [train_main, tune_main, search_main, bench_cli.main], ids=["train", "tune", "search", "bench"]
)
def test_every_stage_refuses_a_folder_another_process_holds_and_kill_9_frees_it(tmp_path, main, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=out))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        expected = rf"error: {re.escape(str(out))} is in use by another qala run \(pid {holder.pid}, started [-\d: ]+\)"
        assert re.fullmatch(expected, err[0]), err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, not even recipe.yaml
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder, the kernel drops its lock
        holder.wait()
    with output_lock(out):
        pass


@pytest.mark.parametrize(
    "main", [train_main, tune_main, search_main, bench_cli.main], ids=["train", "tune", "search", "bench"]
)
def test_a_start_that_fails_on_its_inputs_leaves_the_last_recipe_alone(tmp_path, tiny_checkpoint, main, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text("# the last run's recipe\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": 5}')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        RECIPE.format(out=out).replace("package://qala/samples/squad_sample_dev.json", str(bad))
        + f"model: {{name_or_path: {tiny_checkpoint}}}\n"
    )
    model = f"quantization.model={tiny_checkpoint}", f"search.model={tiny_checkpoint}", "search.backend=fp32"
    assert main([str(recipe), *model, f"benchmark.model={tiny_checkpoint}"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == "# the last run's recipe\n"


def test_content_hash_follows_the_bytes_not_the_path(tmp_path):
    model = build_tiny_qa_checkpoint(tmp_path / "a")
    digest = content_hash(model)
    copy = shutil.copytree(model, tmp_path / "elsewhere")
    assert content_hash(copy) == digest
    # What other stages write into a model folder does not change what it computes.
    (copy / "frontier.json").write_text("{}")
    (copy / "latency_host.json").write_text("{}")
    (copy / "training_info.json").write_text("{}")
    (copy / "recipe.yaml").write_text("run: {}")
    (copy / ".model.safetensors.123.tmp").write_text("half a file")
    assert content_hash(copy) == digest
    # Weights retrained in place, or a file renamed, do.
    build_tiny_qa_checkpoint(tmp_path / "b", seed=1)
    shutil.copy(tmp_path / "b" / "model.safetensors", copy / "model.safetensors")
    assert content_hash(copy) != digest
    (model / "vocab.txt").rename(model / "vocab2.txt")
    assert content_hash(model) != digest
    # A single file hashes its bytes; a name that is no local path (a hub id) its name.
    assert content_hash(copy / "config.json") == content_hash(shutil.copy(copy / "config.json", tmp_path / "c.json"))
    assert content_hash("org/model") != content_hash("org/other")


def test_changed_keys_names_each_changed_leaf():
    old = {"train": {"lengthdrop": {"training_args": {"learning_rate": 3e-05, "max_steps": 10}}}, "seed": 1}
    new = {"train": {"lengthdrop": {"training_args": {"learning_rate": 1e-04, "max_steps": 10}}}, "extra": [1]}
    assert changed_keys(old, new) == [
        "train.lengthdrop.training_args.learning_rate: 3e-05 -> 0.0001",
        "seed: 1 -> (unset)",
        "extra: (unset) -> [1]",
    ]
    assert changed_keys(old, old) == []
    assert changed_keys({"model": "abc"}, {"model": "def"}, "inputs") == ["inputs.model: abc -> def"]


def test_only_the_main_process_takes_the_stage_lock(tmp_path, monkeypatch):
    with output_lock(tmp_path / "out"):
        monkeypatch.setenv("RANK", "1")  # another rank of a torchrun run: it writes nothing there, takes no lock
        with stage_lock(tmp_path / "out"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OutputInUseError), stage_lock(tmp_path / "out"):
            pass


def test_a_stored_record_is_reused_only_for_the_same_inputs(tmp_path):
    path = tmp_path / "record.json"
    assert stored_record(path, {"model": "a"}) == (None, None)
    path.write_text(json.dumps({"inputs": {"model": "a", "seed": 1}, "scores": {}}))
    assert stored_record(path, {"model": "a", "seed": 1})[0]["scores"] == {}
    assert stored_record(path, {"model": "b", "seed": 1}) == (None, "model: a -> b")
    # By fingerprint (train's stages, search's checkpoints), inputs under another name (train's eval.json "key"),
    # and what changed said by the caller where the fingerprint covers more than the recorded inputs.
    path.write_text(json.dumps({"fingerprint": "f1", "key": {"model": "a"}}))
    assert stored_record(path, {"model": "b"}, field="key") == (None, "model: a -> b")
    assert stored_record(path, {"model": "b"}, fingerprint="f1")[0]["fingerprint"] == "f1"
    assert stored_record(path, {}, fingerprint="f2", changes=lambda record: ["lr: 1 -> 2", "seed: 1 -> 2"]) == (
        None,
        "lr: 1 -> 2; seed: 1 -> 2",
    )
    assert stored_record(path, {"model": "b"}, fingerprint="f2") == (None, "no record of its inputs")
