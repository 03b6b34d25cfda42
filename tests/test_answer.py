"""Budget-aware answering: configuration choice, the latency cache, answers on a tiny model, the CLI."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import qala.answer as qa
import qala.search as qs
from qala.answer import FrontierPoint, QalaModel, host_name, select_point
from qala.utils import IntegrityError, content_hash
from tests.conftest import REPO

# One window of max_seq_length=64 with the question, whatever the tiny tokenizer splits its words into.
CONTEXT = "The Elbe rises in the mountains and flows through Dresden and Hamburg to the North Sea."
QUESTION = "Through which cities does the Elbe flow?"

# (length_config, F1 from the search, ms per window on "this host")
FRONTIER = [((64, 64), 50.0, 10.0), ((48, 32), 40.0, 6.0), ((40, 20), 30.0, 3.0)]


def test_select_point_picks_the_most_accurate_that_fits():
    points = [FrontierPoint(c, f1, ms) for c, f1, ms in FRONTIER]
    assert select_point(points, None) == (points[0], True)
    assert select_point(points, 10.0) == (points[0], True)  # exactly at the budget fits
    assert select_point(points, 9.9) == (points[1], True)
    assert select_point(points, 3.0) == (points[2], True)
    assert select_point(points, 2.9) == (points[2], False)  # nothing fits: the fastest
    assert select_point(points, 12.0, windows=2) == (points[1], True)  # 2 windows cost twice
    assert select_point(points, 5.0, windows=2) == (points[2], False)
    # Equal F1: the faster one.
    tie = [FrontierPoint((8, 8), 40.0, 5.0), FrontierPoint((8, 4), 40.0, 4.0)]
    assert select_point(tie, 100.0)[0] == tie[1]
    with pytest.raises(ValueError, match="no frontier"):
        select_point([], 1.0)


def write_model_dir(tmp_path, tiny_checkpoint, *, cached_ms=True, threads=None, engines=None, points=FRONTIER):
    """The tiny checkpoint with a frontier of `points` (default FRONTIER); `cached_ms`: a latency cache of constant
    cost models for each engine of `engines` ({name: factor on the points' ms}, default {"eager": 1}), as an earlier
    load or calibration left."""
    model_dir = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))
    frontier = {
        "objective": "latency",
        "max_seq_length": 64,
        "doc_stride": 32,
        "frontier": [{"length_config": list(c), "f1": f1, "cost": ms} for c, f1, ms in reversed(points)],
    }
    (model_dir / "frontier.json").write_text(json.dumps(frontier))
    if cached_ms:
        # Constant cost models (ms per window whatever its length), as fitted by an earlier load.
        rows = {
            name: [
                {
                    "config": json.dumps({"length_config": list(c)}),
                    "cost": [ms * factor, 0.0, 0.0],
                    "ms": {"32": ms * factor, "64": ms * factor},
                }
                for c, _, ms in points
            ]
            for name, factor in (engines or {"eager": 1.0}).items()
        }
        cache = {
            "format": qa.CACHE_FORMAT,
            "host": host_name(),
            "model": content_hash(model_dir),
            "threads": threads or torch.get_num_threads(),
            "lengths": [32, 64],
            "code": qa.engine_code(),
            "engines": {name: {"configs": configs} for name, configs in rows.items()},
        }
        (model_dir / f"latency_{host_name()}.json").write_text(json.dumps(cache))
    return model_dir


def no_timing(*args, **kwargs):
    raise AssertionError("latencies should come from the cache")


def test_answer_uses_the_best_configuration_within_the_budget(tmp_path, tiny_checkpoint, monkeypatch):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    model = QalaModel.from_pretrained(model_dir)

    result = model.answer(QUESTION, CONTEXT, budget_ms=7)
    assert result["length_config"] == [48, 32] and result["expected_ms"] == 6.0 and result["fits_budget"]
    assert isinstance(result["answer"], str) and result["answer"] and result["answer"] in CONTEXT
    assert isinstance(result["score"], float)
    assert model.answer(QUESTION, CONTEXT)["length_config"] == [64, 64]  # no budget: most accurate

    with pytest.warns(UserWarning, match="no frontier configuration fits 1"):
        result = model.answer(QUESTION, CONTEXT, budget_ms=1)
    assert result["length_config"] == [40, 20] and not result["fits_budget"]
    assert result["answer"] in CONTEXT


def test_long_context_windows_count_against_the_budget(tmp_path, tiny_checkpoint, monkeypatch):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    model = QalaModel.from_pretrained(model_dir)
    long_context = " ".join([CONTEXT] * 4)
    result = model.answer(QUESTION, long_context, budget_ms=25)
    windows = result["windows"]
    assert windows > 1
    chosen, fits = select_point(model.points, 25, windows)
    assert result["length_config"] == list(chosen.length_config) and result["fits_budget"] == fits
    assert result["expected_ms"] == pytest.approx(chosen.latency_ms * windows)
    assert result["answer"] in long_context

    results = model.answer_batch([QUESTION, "Where does the Elbe rise?"], [CONTEXT, CONTEXT], budget_ms=100)
    assert len(results) == 2 and all(r["answer"] in CONTEXT for r in results)
    # The budget is per question: each of these has one window.
    assert results[0]["windows"] == 1 and results[0]["length_config"] == [64, 64]
    assert model.answer_batch([], []) == []
    with pytest.raises(ValueError, match="2 questions and 1 contexts"):
        model.answer_batch([QUESTION, QUESTION], [CONTEXT])


def test_latency_is_measured_once_per_host_and_setup(tmp_path, tiny_checkpoint, monkeypatch):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint, cached_ms=False)
    model = QalaModel.from_pretrained(model_dir, latency_repeats=2)
    cache = json.loads((model_dir / f"latency_{host_name()}.json").read_text())
    assert list(cache["engines"]) == ["eager"] and cache["threads"] == torch.get_num_threads()
    assert cache["fastest"] == "eager" and model.engine == "eager"  # the only engine timed
    assert cache["lengths"] == [32, 64]  # calibration lengths clipped to max_seq_length
    rows = cache["engines"]["eager"]["configs"]
    configs = sorted(tuple(json.loads(row["config"])["length_config"]) for row in rows)
    assert configs == sorted(c for c, _, _ in FRONTIER)
    assert all(len(row["cost"]) == 3 and set(row["ms"]) == {"32", "64"} for row in rows)
    assert all(p.latency_ms > 0 and p.cost is not None for p in model.points)

    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    QalaModel.from_pretrained(model_dir)  # read back, not measured
    # A cache for another thread count is stale.
    write_model_dir(tmp_path / "other", tiny_checkpoint, threads=torch.get_num_threads() + 1)
    with pytest.raises(AssertionError, match="from the cache"):
        QalaModel.from_pretrained(tmp_path / "other" / "model")


def test_a_model_without_a_frontier_answers_at_full_length_and_says_how_to_get_one(
    tmp_path, tiny_checkpoint, capsys, caplog
):
    model_dir = Path(shutil.copytree(tiny_checkpoint, tmp_path / "bare"))
    model = QalaModel.from_pretrained(model_dir)
    full = [1.0, 1.0]  # every layer keeps all of each window's real tokens
    assert [list(p.keep_ratios) for p in model.points] == [full]
    assert "python -m qala.search" in caplog.text and "full length" in caplog.text
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context", CONTEXT]) == 0
    assert json.loads(capsys.readouterr().out)["keep_ratios"] == full
    assert qa.main(["--model", str(tmp_path / "absent"), "--question", QUESTION, "--context", CONTEXT]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_prints_the_answer_as_json(tmp_path, tiny_checkpoint, capsys, caplog):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    argv = ["--model", str(model_dir), "--budget-ms", "4", "--question", QUESTION, "--context", CONTEXT]
    assert qa.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["length_config"] == [40, 20] and printed["budget_ms"] == 4.0
    assert printed["answer"] in CONTEXT and {"score", "expected_ms"} <= set(printed)
    # A budget nothing fits: still an answer, with a logged warning (stderr outside pytest).
    assert qa.main([*argv[:2], "--budget-ms", "0.5", *argv[4:]]) == 0
    assert json.loads(capsys.readouterr().out)["length_config"] == [40, 20]
    assert "no frontier configuration fits 0.5 ms" in caplog.text


def test_a_searched_model_answers(tmp_path, tiny_checkpoint, monkeypatch):
    """The frontier written by qala.search is what QalaModel reads."""
    monkeypatch.chdir(REPO)
    model_dir = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
data: {{train: package://qala/samples/squad_sample_train.json, eval: package://qala/samples/squad_sample_dev.json,
        max_seq_length: 64, doc_stride: 32, max_eval_samples: 6}}
model: {{name_or_path: {model_dir}}}
search: {{model: {model_dir}, output_dir: {tmp_path}/search, objective: macs, backend: fp32, population_size: 2,
          iterations: 0, baseline_points: 2}}
"""
    )
    assert qs.main([str(recipe)]) == 0
    model = QalaModel.from_pretrained(model_dir, latency_repeats=1)
    frontier = json.loads((model_dir / "frontier.json").read_text())["frontier"]
    # The search's default units: keep ratios of each window's real length.
    assert {p.keep_ratios for p in model.points} == {tuple(row["keep_ratios"]) for row in frontier}
    result = model.answer(QUESTION, CONTEXT)
    assert result["answer"] in CONTEXT and tuple(result["keep_ratios"]) in {p.keep_ratios for p in model.points}


def test_int8_artifact_is_searched_and_answers(tmp_path, tiny_checkpoint, tiny_int8_artifact, monkeypatch):
    """INT8: the search scores the artifact (MACs objective: no compile), QalaModel serves it (eagerly)."""
    monkeypatch.chdir(REPO)
    # The session's static INT8 artifact of tiny_checkpoint (conftest; quantized once), copied: the search and the
    # latency calibration write into the artifact's folder.
    artifact = Path(shutil.copytree(tiny_int8_artifact, tmp_path / "int8"))
    assert json.loads((artifact / "quantization.json").read_text())["approach"] == "static"

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
data: {{train: package://qala/samples/squad_sample_train.json, eval: package://qala/samples/squad_sample_dev.json,
        max_seq_length: 64, doc_stride: 32, max_eval_samples: 4}}
model: {{name_or_path: {tiny_checkpoint}}}
search: {{model: {artifact}, output_dir: {tmp_path}/search, objective: macs, backend: int8, population_size: 1,
          iterations: 0, baseline_points: 2}}
"""
    )
    assert qs.main([str(recipe)]) == 0
    assert json.loads((artifact / "frontier.json").read_text())["backend"] == "int8"

    served = QalaModel.from_pretrained(artifact, latency_repeats=1, compile=False)
    cache = json.loads((artifact / f"latency_{host_name()}.json").read_text())
    assert list(cache["engines"]) == ["eager"] and served.engine == "eager"
    result = served.answer(QUESTION, CONTEXT, budget_ms=1e6)
    assert result["answer"] in CONTEXT and result["fits_budget"]


def test_budget_depends_on_the_length_of_the_question():
    # Cost models: the accurate point grows fast with length, the cheap one slowly.
    accurate = FrontierPoint(None, 70.0, 0.0, (1.0, 1.0), (1.0, 0.05, 0.0))
    cheap = FrontierPoint(None, 60.0, 0.0, (0.5, 0.3), (1.0, 0.02, 0.0))
    assert accurate.expected_ms([100]) == pytest.approx(6.0) and accurate.expected_ms([100, 100]) == pytest.approx(12.0)
    assert select_point([accurate, cheap], 8.0, [60]) == (accurate, True)  # 4 ms: a short question affords it
    assert select_point([accurate, cheap], 8.0, [300]) == (cheap, True)  # 16 vs 7 ms: a long one does not
    assert select_point([accurate, cheap], 8.0, [300, 300]) == (cheap, False)  # 14 ms: nothing fits, the fastest
    a, b, c = qa.fit_cost_model([32, 96, 160, 256], [1 + 0.1 * t + 0.001 * t * t for t in (32, 96, 160, 256)])
    assert (a, b, c) == pytest.approx((1, 0.1, 0.001))


def test_served_batches_are_unpadded_and_bounded(tmp_path, tiny_checkpoint, monkeypatch):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    model = QalaModel.from_pretrained(model_dir)
    model.max_batch_windows = 3
    shapes = []
    inner = model.model

    def spy(**kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        shapes.append((tuple(ids.shape), mask.sum(dim=1).tolist()))
        return inner(**kwargs)

    model.model = spy
    questions = [QUESTION, "Where does the Elbe rise?", "Which sea?", "What flows through Dresden and Hamburg?"]
    contexts = [" ".join([CONTEXT] * 5), CONTEXT, "The Elbe reaches the North Sea.", CONTEXT]
    # No budget: one configuration for all, so short and long windows are batched together.
    results = model.answer_batch(questions, contexts)
    assert all(r["answer"] in c for r, c in zip(results, contexts, strict=True))
    assert sum(r["windows"] for r in results) == sum(n for (n, _), _ in shapes)
    for (rows, width), real in shapes:
        assert rows <= 3  # bounded batches: memory stays flat in the context length
        assert width == max(real)  # padded only to the longest window of the batch
        # Windows sorted by length and grouped per 32 tokens: no call pads a window by 32 positions or more.
        assert (max(real) - 1) // 32 == (min(real) - 1) // 32, real
    lengths = [n for r in results for n in r["tokens"]]
    assert {(n - 1) // 32 for n in lengths} == {0, 1}  # windows of both groups were asked for
    assert all(max(r["tokens"]) <= 64 for r in results)


def test_empty_inputs_and_context_files(tmp_path, tiny_checkpoint, capsys):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    model = QalaModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="question #1: only whitespace; expected a non-blank string"):
        model.answer("  ", CONTEXT)
    with pytest.raises(ValueError, match="context #1: empty; expected a non-blank string"):
        model.answer(QUESTION, "")
    with pytest.raises(ValueError, match="context #2: only whitespace"):
        model.answer_batch([QUESTION, QUESTION], [CONTEXT, "\n\t \u00a0"])
    with pytest.raises(ValueError, match="question #1: expected a non-blank string, got NoneType"):
        model.answer(None, CONTEXT)
    capsys.readouterr()  # what loading the model printed
    for blank, option in (
        (["--question", " \t", "--context", CONTEXT], "--question"),
        (["--question", QUESTION, "--context", "\n \n"], "--context"),
    ):
        assert qa.main(["--model", str(model_dir), *blank]) == 2
        assert capsys.readouterr().err.strip() == f"error: {option}: only whitespace; expected a non-blank string"
    context_file = tmp_path / "context.txt"
    context_file.write_text(CONTEXT, encoding="utf-8")
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context-file", str(context_file)]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] in CONTEXT
    context_file.write_text(" \n\n ", encoding="utf-8")
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context-file", str(context_file)]) == 2
    assert capsys.readouterr().err.strip() == "error: --context-file: only whitespace; expected a non-blank string"
    context_file.write_bytes(b"\xff\xfe not utf-8 \x80")
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context-file", str(context_file)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "context.txt"
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --context-file {missing}: cannot read it (No such file or directory)"


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("--threads", "0", "0"),
        ("--threads", "-1", "-1"),
        ("--budget-ms", "0", "0.0"),
        ("--budget-ms", "-5", "-5.0"),
        ("--budget-ms", "nan", "nan"),
    ],
)
def test_meaningless_numbers_are_refused_before_the_model_loads(tmp_path, capsys, option, value, shown):
    """--threads -1 was a RuntimeError traceback from torch; 0 was quietly ignored; a budget of 0, below 0 or
    NaN fits nothing, so every question silently got the fastest configuration."""
    argv = ["--model", str(tmp_path / "absent"), "--question", QUESTION, "--context", CONTEXT, option, value]
    assert qa.main(argv) == 2  # the absent model is never reached
    assert capsys.readouterr().err.strip() == f"error: {option} must be positive, got {shown}"


def test_a_long_context_runs_in_several_bounded_batches(tmp_path, tiny_checkpoint, monkeypatch):
    """One question over a long context: its windows go through the model MAX_BATCH_WINDOWS at a time, so
    memory does not grow with the context (one batch of ~100 windows took 2 GB)."""
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    model = QalaModel.from_pretrained(model_dir)
    assert model.max_batch_windows == qa.MAX_BATCH_WINDOWS == 8
    rows = []
    inner = model.model

    def spy(**kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return inner(**kwargs)

    model.model = spy
    long_context = " ".join([CONTEXT] * 40)
    result = model.answer(QUESTION, long_context)
    assert result["windows"] > 3 * qa.MAX_BATCH_WINDOWS and result["answer"] in long_context
    assert sum(rows) == result["windows"] and max(rows) <= qa.MAX_BATCH_WINDOWS and len(rows) >= 4


def test_a_question_longer_than_the_window_is_one_line(tmp_path, tiny_checkpoint, capsys):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    question = " ".join(["through which cities does the river flow"] * 12) + "?"
    assert qa.main(["--model", str(model_dir), "--question", question, "--context", CONTEXT]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after what loading the model printed
    assert "Traceback" not in err and line.startswith("error: question #1 is ")
    assert "longer than the window: max_seq_length=64" in line


def _frontier(**changes):
    document = {
        "max_seq_length": 64,
        "doc_stride": 32,
        "num_layers": 2,
        "frontier": [
            {"keep_ratios": [0.9, 0.5], "f1": 40.0, "cost": 1.0},
            {"length_config": [64, 48], "f1": 50.0, "cost": 2.0},
        ],
    }
    for key, value in changes.items():
        if key.startswith("p1_"):
            document["frontier"][1][key[3:]] = value
        elif value is None:
            del document[key]
        else:
            document[key] = value
    return document


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"max_seq_length": None}, "'max_seq_length' must be a positive integer (the window length), got None"),
        ({"max_seq_length": 0}, "'max_seq_length' must be a positive integer (the window length), got 0"),
        ({"doc_stride": 64}, "'doc_stride' must be an integer in [0, max_seq_length=64), got 64"),
        ({"num_layers": "2"}, "'num_layers' must be a positive integer, got '2'"),
        ({"p1_length_config": [48, 64]}, "frontier[1].length_config: length_config must be non-increasing"),
        ({"p1_length_config": [80, 48]}, "frontier[1].length_config: length_config [80, 48] keeps more than max_"),
        ({"p1_length_config": [64, 0]}, "frontier[1].length_config: length_config entries must be >= 1"),
        ({"p1_length_config": [64.0, 48]}, "frontier[1].length_config must be integers, got [64.0, 48]"),
        ({"p1_length_config": [64, 48, 32]}, "frontier[1].length_config has 3 entries, expected 2 (one per layer)"),
        ({"p1_length_config": None, "p1_keep_ratios": [0.5, 0.9]}, "frontier[1].keep_ratios: keep_ratios must be non"),
        ({"p1_length_config": None, "p1_keep_ratios": [1.2, 0.9]}, "frontier[1].keep_ratios: keep_ratios entries mus"),
        ({"p1_length_config": None, "p1_keep_ratios": [0.5, 0.0]}, "frontier[1].keep_ratios: keep_ratios entries mus"),
        ({"p1_length_config": None}, "frontier[1] must have one of 'keep_ratios' and 'length_config', got neither"),
        ({"p1_keep_ratios": [0.9, 0.5]}, "frontier[1] must have one of 'keep_ratios' and 'length_config', got ['k"),
        ({"p1_keep_ratios": "0.9,0.5", "p1_length_config": None}, "frontier[1].keep_ratios must be a non-empty list"),
        ({"p1_f1": None}, "frontier[1].f1 must be a number, got None"),
        ({"p1_cost": "fast"}, "frontier[1].cost must be a number, got 'fast'"),
    ],
)
def test_read_frontier_validates_every_point(tmp_path, changes, expected):
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(_frontier()))
    assert qs.read_frontier(path)["max_seq_length"] == 64  # the valid document reads back
    path.write_text(json.dumps(_frontier(**changes)))
    with pytest.raises(ValueError) as info:
        qs.read_frontier(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)
    path.write_text('{"frontier": [')
    with pytest.raises(ValueError, match=r"frontier\.json: invalid JSON at line 1 column 15"):
        qs.read_frontier(path)


def test_answer_refuses_an_invalid_frontier_in_one_line(tmp_path, tiny_checkpoint, capsys):
    """An increasing configuration was served as is (a later layer cannot keep more than an earlier one)."""
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    frontier = json.loads((model_dir / "frontier.json").read_text())
    frontier["frontier"][0]["length_config"] = [40, 60]
    (model_dir / "frontier.json").write_text(json.dumps(frontier))
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context", CONTEXT]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: {model_dir / 'frontier.json'}: frontier[0].length_config: "
        "length_config must be non-increasing from layer to layer: [40, 60]"
    )
    del frontier["max_seq_length"]  # was a KeyError traceback in qala.answer
    (model_dir / "frontier.json").write_text(json.dumps(frontier))
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context", CONTEXT]) == 2
    assert "frontier.json: 'max_seq_length' must be a positive integer" in capsys.readouterr().err


def _replace_weights_in_place(model_dir, tmp_path):
    """The model retrained in place: other weights, same path, frontier.json and latency cache left beside them."""
    from tests.conftest import build_tiny_qa_checkpoint

    other = build_tiny_qa_checkpoint(tmp_path / "retrained", seed=1)
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")


def test_a_frontier_searched_on_other_weights_is_refused(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Silent before: a model retrained in place answered with the old model's configurations and F1 figures."""
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    frontier = json.loads((model_dir / "frontier.json").read_text())
    searched = content_hash(model_dir)
    frontier["search"] = {"inputs": {"model": searched}}  # as qala.search records it
    (model_dir / "frontier.json").write_text(json.dumps(frontier))
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    assert len(QalaModel.from_pretrained(model_dir).points) == 3
    _replace_weights_in_place(model_dir, tmp_path)
    now = content_hash(model_dir)
    with pytest.raises(IntegrityError, match=f"searched on another model \\(content {searched}, this model's is {now}"):
        QalaModel.from_pretrained(model_dir)
    capsys.readouterr()
    assert qa.main(["--model", str(model_dir), "--question", QUESTION, "--context", CONTEXT]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{model_dir / 'frontier.json'}: searched on another model" in errors[0]


def test_the_latency_cache_of_other_weights_is_measured_again(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)  # its cache is keyed by these weights
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    QalaModel.from_pretrained(model_dir)
    before = content_hash(model_dir)
    _replace_weights_in_place(model_dir, tmp_path)
    with caplog.at_level("INFO", logger="qala.answer"), pytest.raises(AssertionError, match="from the cache"):
        QalaModel.from_pretrained(model_dir)
    assert f"is for another setup (model: {before} -> {content_hash(model_dir)}): measuring again" in caplog.text


def test_the_latency_cache_of_other_engine_code_is_measured_again(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    QalaModel.from_pretrained(model_dir)  # this code's timings: read back
    before = qa.engine_code()
    monkeypatch.setattr(qa, "ENGINE_LIBRARIES", (*qa.ENGINE_LIBRARIES, "numpy"))  # as if an engine library changed
    with caplog.at_level("INFO", logger="qala.answer"), pytest.raises(AssertionError, match="from the cache"):
        QalaModel.from_pretrained(model_dir)
    assert f"(code: {before} -> {qa.engine_code()}): measuring again" in caplog.text


def test_a_question_the_vocabulary_cannot_read_gets_no_span(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Before: an Amharic question (all [UNK]) got a span with a score as confident as the English one's."""
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    model = QalaModel.from_pretrained(model_dir)
    amharic = "ኤልቤ በየትኞቹ ከተሞች ይፈሳል?"
    mixed = "Which are the ከተሞች of the ኤልቤ?"  # only function words are readable
    readable, unread, half = model.answer_batch([QUESTION, amharic, mixed], [CONTEXT] * 3)
    assert readable["flag"] is None and readable["answer"] in CONTEXT and readable["score"] is not None
    for result in (unread, half):
        assert result["answer"] == "" and result["score"] is None
        assert result["flag"].startswith("the model cannot read the question: ")
    assert "4 of its 4 words are unknown" in unread["flag"] and "function words" in half["flag"]
    capsys.readouterr()
    assert qa.main(["--model", str(model_dir), "--question", amharic, "--context", CONTEXT]) == 2
    assert capsys.readouterr().err.strip() == f"error: --question: {unread['flag']}"


def test_an_infinite_budget_is_refused_before_the_model_loads(tmp_path, capsys):
    """`--budget-ms inf` printed `Infinity` in the output, which is not JSON."""
    argv = ["--model", str(tmp_path / "absent"), "--question", QUESTION, "--context", CONTEXT, "--budget-ms", "inf"]
    assert qa.main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --budget-ms must be a finite positive number, got inf"


HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install -e '.[onnx]')")
def test_the_engine_recorded_as_fastest_is_served_unless_one_is_named(tmp_path, tiny_checkpoint, monkeypatch):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint, engines={"eager": 1.0, "onnxruntime": 0.5})
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)  # every engine's costs come from the cache
    served = QalaModel.from_pretrained(model_dir)
    assert served.engine == "onnxruntime" and served.model.name == "onnxruntime"
    assert [p.latency_ms for p in served.points] == [1.5, 3.0, 5.0]  # onnxruntime's costs, not eager's
    assert served.answer(QUESTION, CONTEXT)["answer"] in CONTEXT
    # Exported graphs are cached beside the model, in a hidden folder: not model content (frontier and cache hold).
    assert list((model_dir / qa.ENGINE_DIR).glob("*/plain*.onnx"))
    assert QalaModel.from_pretrained(model_dir).engine == "onnxruntime"
    # Named: that engine, whatever was fastest; `backend=` is the same option's older name.
    assert QalaModel.from_pretrained(model_dir, engine="eager").engine == "eager"
    assert QalaModel.from_pretrained(model_dir, backend="eager").model.name == "eager"
    with pytest.raises(ValueError, match="backend is engine's alias"):
        QalaModel.from_pretrained(model_dir, engine="eager", backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown serving engine 'tensorrt'"):
        QalaModel.from_pretrained(model_dir, engine="tensorrt")
    # An engine that re-quantizes on its own gives other answers: never chosen unnamed, however fast.
    faster = write_model_dir(tmp_path / "q", tiny_checkpoint, engines={"eager": 1.0, "onnxruntime-int8": 0.1})
    assert QalaModel.from_pretrained(faster).engine == "eager"


def test_no_calibration_serves_the_default_engine(tmp_path, tiny_checkpoint, monkeypatch):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint, engines={"eager": 1.0})
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    assert QalaModel.from_pretrained(model_dir).engine == qa.DEFAULT_ENGINE == "eager"


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install -e '.[onnx]')")
def test_calibration_times_each_engine_and_records_the_fastest(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint, cached_ms=False)
    assert qa.main(["--model", str(model_dir), "--calibrate", "--engine", "eager"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fastest"] == "eager" and list(printed["engines"]) == ["eager"] and printed["engines"]["eager"] > 0
    report = QalaModel.calibrate(model_dir, engines=["eager", "onnxruntime", "openvino-int8"], latency_repeats=1)
    timed = {name: ms for name, ms in report["engines"].items() if isinstance(ms, float)}
    assert set(timed) == {"eager", "onnxruntime"} and all(ms > 0 for ms in timed.values())
    # No calibration data and no recipe.yaml naming a training file: refused, the others still timed.
    assert report["engines"]["openvino-int8"].startswith("not run: engine 'openvino-int8' quantizes with NNCF")
    assert "pass --calibration-data" in report["engines"]["openvino-int8"]
    assert report["fastest"] == min(timed, key=timed.get)
    cache = json.loads((model_dir / f"latency_{host_name()}.json").read_text())
    assert cache["fastest"] == report["fastest"] and set(cache["engines"]) == {"eager", "onnxruntime"}
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    assert QalaModel.from_pretrained(model_dir).engine == report["fastest"]  # read back, nothing timed
    assert qa.main(["--model", str(model_dir), "--question", QUESTION]) == 2
    assert "--question and --context (or --context-file) are required unless --calibrate" in capsys.readouterr().err


def dynamic_int8_artifact(tmp_path, tiny_checkpoint) -> Path:
    """A dynamic INT8 artifact of the tiny checkpoint (span head INT8, encoder fp32): no activation scales."""
    from neural_compressor.torch.quantization import DynamicQuantConfig

    from qala.model import LengthAdaptiveForQuestionAnswering
    from qala.quantize import quantize_, save_quantized
    from qala.quantize.load import load_tokenizer

    model = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_checkpoint).eval()
    config = DynamicQuantConfig(w_granularity="per_channel")
    window = {"input_ids": torch.randint(5, 600, (1, 64)), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    quantize_(
        model, config, [{**window, "token_type_ids": torch.zeros(1, 64, dtype=torch.long)}], fp32_units=["encoder.*"]
    )
    path = tmp_path / "dynamic-int8"
    tokenizer = load_tokenizer(tiny_checkpoint)
    save_quantized(
        model, path, approach="dynamic", quant_config=config.to_dict(), fp32_units=["encoder.*"], tokenizer=tokenizer
    )
    return path


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install -e '.[onnx]')")
def test_int8_calibration_times_onnxruntime_inc_and_skips_an_engine_that_fails(
    tmp_path, tiny_checkpoint, tiny_int8_artifact, monkeypatch, caplog
):
    # An INT8 artifact's calibration times onnxruntime-inc (INC's own scales and fp32 units) beside eager and
    # compile-dynamic; compile-dynamic is left out here (it warms ~15 graphs: minutes on 2 cores).
    assert qa.CALIBRATION_ENGINES["int8"] == ("eager", "compile-dynamic", "onnxruntime-inc")
    monkeypatch.setattr(qa, "_installed", lambda engine: engine != "compile-dynamic")
    static = write_model_dir(tmp_path / "static", tiny_int8_artifact, cached_ms=False)
    report = QalaModel.calibrate(static, latency_repeats=1)
    assert list(report["engines"]) == ["eager", "onnxruntime-inc"]
    assert all(isinstance(ms, float) and ms > 0 for ms in report["engines"].values())
    cache = json.loads((static / f"latency_{host_name()}.json").read_text())
    assert set(cache["engines"]) == {"eager", "onnxruntime-inc"} and cache["fastest"] == report["fastest"]

    # A dynamic INT8 artifact has no activation scales: onnxruntime-inc refuses it at construction, skipped with
    # its reason (logged and recorded); eager is still timed and chosen.
    dynamic = write_model_dir(tmp_path / "dynamic", dynamic_int8_artifact(tmp_path, tiny_checkpoint), cached_ms=False)
    report = QalaModel.calibrate(dynamic, latency_repeats=1)
    refused = "not run: engine 'onnxruntime-inc' needs static activation scales"
    assert report["engines"]["onnxruntime-inc"].startswith(refused) and report["fastest"] == "eager"
    assert "engine onnxruntime-inc not calibrated: engine 'onnxruntime-inc' needs static" in caplog.text

    # An engine failing at warm-up with an error that is no ValueError (ONNX Runtime's derive from Exception):
    # skipped too, with the error's type; the others' timings stand.
    class Fail(Exception):
        pass

    warm = qa.warm_for_serving

    def failing(served, **kwargs):
        if getattr(served, "name", None) == "onnxruntime-inc":
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : a kernel this CPU lacks")
        return warm(served, **kwargs)

    monkeypatch.setattr(qa, "warm_for_serving", failing)
    report = QalaModel.calibrate(static, latency_repeats=1)
    assert (
        report["engines"]["onnxruntime-inc"] == "not run: Fail: [ONNXRuntimeError] : 1 : FAIL : a kernel this CPU lacks"
    )
    assert report["fastest"] == "eager" and isinstance(report["engines"]["eager"], float)


HAS_OV = all(importlib.util.find_spec(m) is not None for m in ("onnx", "openvino", "nncf"))
TRAIN_SAMPLE = REPO / "qala" / "samples" / "squad_sample_train.json"


@pytest.mark.skipif(not HAS_OV, reason="openvino/nncf/onnx not installed (pip install -e '.[onnx]')")
def test_openvino_int8_is_served_on_calibration_data_and_its_quantization_is_cached(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    import qala.data
    import qala.quantize.openvino as qov

    # Two frontier points, full length (the plain graph) and one keep configuration (the adaptive graph): a third
    # point took the same path once more (another adaptive graph quantized, and compiled in each of the four loads).
    engines = {"eager": 1.0, "openvino-int8": 0.5}
    model_dir = write_model_dir(tmp_path, tiny_checkpoint, engines=engines, points=FRONTIER[:2])
    monkeypatch.setattr(qa, "median_latency_ms", no_timing)
    monkeypatch.setattr(qa, "CALIBRATION_WINDOWS", 24)  # a quick quantization of the tiny model
    quantized, nncf_quantize = [], qov.nncf_quantize

    def counted(model, items):
        quantized.append(len(items))
        return nncf_quantize(model, items)

    monkeypatch.setattr(qov, "nncf_quantize", counted)
    served = QalaModel.from_pretrained(model_dir, engine="openvino-int8", calibration_data=TRAIN_SAMPLE)
    source = {"data": str(TRAIN_SAMPLE.resolve()), "sha256": content_hash(TRAIN_SAMPLE)}
    assert served.engine == "openvino-int8" and served.model.name == "openvino-int8"
    assert served.calibration == {**source, "from": "calibration_data", "max_windows": 24}
    assert served.model.facts["calibration"]["data"] == source["data"]
    # Each configuration's graph quantized once, on the windows asked for (no training question is too long here).
    assert quantized == [24, 24]
    # It really runs INT8: integer GEMMs in the compiled model, FakeQuantize nodes in the quantized graph.
    precisions = served.model.int8_precisions()
    assert any(k.startswith("FullyConnected:") and k.endswith(("u8", "i8")) for k in precisions), precisions
    assert "FakeQuantize" in {op.get_type_name() for op in served.model.base(None).get_ops()}
    # Well-formed answers (a random tiny model: no assertion on which span).
    questions = [QUESTION, "Where does the Elbe rise?", "What is the river called?"]
    contexts = [CONTEXT, CONTEXT, " ".join([CONTEXT] * 4)]
    for result, context in zip(served.answer_batch(questions, contexts), contexts, strict=True):
        assert isinstance(result["answer"], str) and result["answer"] and result["answer"] in context
        assert isinstance(result["score"], float) and result["score"] == result["score"]
    first = served.answer(QUESTION, CONTEXT)

    # A second load reads the quantized graphs back: no windows built, nothing quantized.
    def refuse(*args, **kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr(qov, "nncf_quantize", refuse)
    monkeypatch.setattr(qala.data, "calibration_windows", refuse)
    again = QalaModel.from_pretrained(model_dir, engine="openvino-int8", calibration_data=TRAIN_SAMPLE)
    assert again.answer(QUESTION, CONTEXT)["answer"] == first["answer"]
    assert again.answer(QUESTION, CONTEXT)["score"] == pytest.approx(first["score"], abs=1e-4)
    # warm=False (the one-shot CLI) compiles nothing at load, then only the shapes its question needs.
    lazy = QalaModel.from_pretrained(model_dir, engine="openvino-int8", calibration_data=TRAIN_SAMPLE, warm=False)
    assert not lazy.model._compiled and len(again.model._compiled) > 2
    assert lazy.answer(QUESTION, CONTEXT)["answer"] == first["answer"]
    assert len(lazy.model._compiled) == 1  # one window: one (configuration, bucket, batch size)
    # The model's recipe.yaml naming the same file calibrates the same way (the cache holds); said so.
    (model_dir / "recipe.yaml").write_text(f"data:\n  train: {TRAIN_SAMPLE}\n")
    from_recipe = QalaModel.from_pretrained(model_dir, engine="openvino-int8")
    assert from_recipe.calibration == {**source, "from": "recipe.yaml data.train", "max_windows": 24}
    # The CLI passes --calibration-data through.
    argv = ["--model", str(model_dir), "--engine", "openvino-int8", "--question", QUESTION, "--context", CONTEXT]
    capsys.readouterr()  # NNCF's progress bars
    assert qa.main([*argv, "--calibration-data", str(TRAIN_SAMPLE)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"] == first["answer"]


def test_openvino_int8_without_calibration_data_is_one_line(tmp_path, tiny_checkpoint, capsys):
    model_dir = write_model_dir(tmp_path, tiny_checkpoint)
    argv = ["--model", str(model_dir), "--engine", "openvino-int8", "--question", QUESTION, "--context", CONTEXT]
    assert qa.main(argv) == 2  # refused before the model loads (no openvino needed to say so)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: engine 'openvino-int8' quantizes with NNCF on training windows")
    assert f"{model_dir / 'recipe.yaml'} names none: pass --calibration-data" in err
    with pytest.raises(ValueError, match="pass --calibration-data"):
        QalaModel.from_pretrained(model_dir, engine="openvino-int8")
    # A recipe whose training file is not here (a hub name, or a path of another machine) says which.
    (model_dir / "recipe.yaml").write_text("data:\n  train: /elsewhere/train.json\n")
    with pytest.raises(ValueError, match=r"the training data of .*recipe.yaml \(/elsewhere/train.json\) is no file"):
        qa.calibration_source(model_dir, "openvino-int8")
    (model_dir / "recipe.yaml").write_text(f"data:\n  train: {TRAIN_SAMPLE}\n")
    assert qa.calibration_source(model_dir, "openvino-int8")["from"] == "recipe.yaml data.train"
    # Explicit data: a missing file, or data for an engine that does not calibrate, are refused too.
    assert qa.main([*argv, "--calibration-data", str(tmp_path / "absent.json")]) == 2
    assert "absent.json: no such file" in capsys.readouterr().err
    assert qa.main([*argv[:3], "eager", *argv[4:], "--calibration-data", str(TRAIN_SAMPLE)]) == 2
    assert "is only used by 'openvino-int8'" in capsys.readouterr().err
    assert qa.calibration_source(model_dir, "openvino-int8", "squad") == {
        "data": "squad",
        "split": "train",
        "from": "calibration_data",
    }
    assert qa.calibration_source(model_dir, "onnxruntime-int8") is None  # dynamic INT8: no data needed
