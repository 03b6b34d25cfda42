import json

import numpy as np
import pytest

from qala.evaluate import main, predict_logits
from tests.conftest import SAMPLES


def test_evaluate_cli_prints_metrics_and_writes_official_predictions(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pred.json"
    data = SAMPLES / "squad_sample_dev.json"
    code = main(
        [
            str(tiny_checkpoint),
            str(data),
            "--length-config",
            "100,50",
            "--max-seq-length",
            "128",
            "--doc-stride",
            "64",
            "--max-samples",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(line)
    assert metrics["n"] == 10 and metrics["length_config"] == [100, 50]
    assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 100
    predictions = json.loads(out.read_text())
    assert len(predictions) == 10 and all(isinstance(v, str) for v in predictions.values())
    contexts = {
        qa["id"]: p["context"] for a in json.loads(data.read_text())["data"] for p in a["paragraphs"] for qa in p["qas"]
    }
    assert all(answer in contexts[qid] for qid, answer in predictions.items())


def test_evaluate_cli_keep_ratio_and_bad_inputs(tiny_checkpoint, tmp_path, capsys):
    data = SAMPLES / "squad_sample_dev.json"
    assert (
        main(
            [
                str(tiny_checkpoint),
                str(data),
                "--padded-keep-ratio",
                "0.5",
                "--max-seq-length",
                "128",
                "--doc-stride",
                "64",
                "--max-samples",
                "4",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["length_config"] == [64, 32]
    assert main([str(tiny_checkpoint), str(data), "--length-config", "10,20"]) == 2
    assert "non-increasing" in capsys.readouterr().err
    assert main([str(tiny_checkpoint), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-samples", "0"), ("--max-seq-length", "0")],
)
def test_non_positive_numbers_are_refused_before_the_model_loads(tmp_path, capsys, option, value):
    """--batch-size 0 was `range() arg 3 must not be zero`; -1 printed F1 0 over no predictions at all;
    --max-samples 0 and --max-seq-length 0 quietly meant "all" and "the model's"."""
    absent_model = tmp_path / "no-model"  # checked first: the model is never loaded
    assert main([str(absent_model), str(SAMPLES / "squad_sample_dev.json"), option, value]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {option} must be positive, got {value}"


def test_predict_logits_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        predict_logits(lambda **kwargs: None, {"input_ids": [[1, 2]]}, batch_size=0)


def test_windows_and_logits_are_kept_per_window(tiny_checkpoint):
    """Memory stays flat in the context length: each window keeps only its own start/end logits (its length,
    never max_seq_length x anything), and the model sees batches of at most batch_size windows."""
    from transformers import AutoTokenizer

    from qala.data import featurize, load_squad
    from qala.quantize.load import load_model

    model = load_model(tiny_checkpoint)
    examples = load_squad(SAMPLES / "squad_sample_dev.json").select(range(6))
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    features = featurize(examples, tokenizer, train=False, max_seq_length=96, doc_stride=32)
    batches = []

    def spy(**inputs):
        batches.append(tuple(inputs["input_ids"].shape))
        return model(**inputs)

    starts, ends = predict_logits(spy, features, batch_size=4, progress=False)
    lengths = [len(ids) for ids in features["input_ids"]]
    assert [s.shape for s in starts] == [e.shape for e in ends] == [(n,) for n in lengths]
    assert sum(rows for rows, _ in batches) == len(lengths) > 4 and max(rows for rows, _ in batches) <= 4
    # Longest windows first (a heap that grows with the batches fragments), each batch padded to its longest.
    widths = [width for _, width in batches]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths) > widths[-1] >= min(lengths)
    # Every window gets its own logits back, as when it runs alone.
    for j in (0, len(lengths) - 1, lengths.index(min(lengths))):
        alone_starts, alone_ends = predict_logits(model, features.select([j]), progress=False)
        np.testing.assert_allclose(starts[j], alone_starts[0], atol=1e-5)
        np.testing.assert_allclose(ends[j], alone_ends[0], atol=1e-5)


def test_output_path_and_keep_ratio_are_checked_before_the_model_loads(tmp_path, capsys):
    """`--out DIR` failed after the whole evaluation (metrics lost); `--padded-keep-ratio 0` named --length-config."""
    absent_model = tmp_path / "no-model"  # never reached: each check comes first
    data = str(SAMPLES / "squad_sample_dev.json")
    assert main([str(absent_model), data, "--out", str(tmp_path)]) == 2
    expected = f"error: --out {tmp_path}: is a directory; give a file name (e.g. {tmp_path / 'predictions.json'})"
    assert capsys.readouterr().err.strip() == expected
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([str(absent_model), data, "--out", str(blocker / "p.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {blocker / 'p.json'}: {blocker} is a file, not a directory"
    for value in ("0", "1.5", "nan"):
        assert main([str(absent_model), data, "--padded-keep-ratio", value]) == 2
        assert (
            capsys.readouterr().err.strip()
            == f"error: --padded-keep-ratio: expected a share in (0, 1], got {float(value)}"
        )


def test_skip_samples_scores_only_the_questions_after_them(tiny_checkpoint, tmp_path, capsys):
    data = str(SAMPLES / "squad_sample_dev.json")
    common = [str(tiny_checkpoint), data, "--max-seq-length", "128", "--doc-stride", "64"]
    assert main([*common, "--max-samples", "6", "--out", str(tmp_path / "six.json")]) == 0
    capsys.readouterr()
    assert main([*common, "--skip-samples", "4", "--max-samples", "2", "--out", str(tmp_path / "two.json")]) == 0
    last_two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    six = json.loads((tmp_path / "six.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (last_two["n"], last_two["skip_samples"]) == (2, 4)
    assert two == dict(list(six.items())[4:])  # the same questions, the same answers, in file order
    assert main([*common, "--skip-samples", "100000"]) == 2
    assert "--skip-samples" in capsys.readouterr().err


def test_keep_margins_report_the_macs_each_window_kept(tiny_checkpoint, capsys):
    """--keep-margins drops by logit margin (span rule) under --keep-ratios; macs_ratio counts the tokens each
    window kept: 1.0 at full length, the ratios' own cost with them, lower again with a tight margin."""
    data = SAMPLES / "squad_sample_dev.json"
    common = [str(tiny_checkpoint), str(data), "--max-seq-length", "128", "--doc-stride", "64", "--max-samples", "6"]
    common += ["--selection", "span"]

    def run(*options):
        assert main([*common, *options]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    full, ratios = run(), run("--keep-ratios", "0.8,0.5")
    tight = run("--keep-ratios", "0.8,0.5", "--keep-margins", "none,0")
    assert full["macs_ratio"] == 1.0 and full.get("keep_margins") is None
    assert ratios["macs_ratio"] < 1.0 and tight["keep_margins"] == [None, 0.0]
    # margin 0 keeps [CLS] and the best-scoring token(s) only after layer 1
    assert tight["macs_ratio"] < ratios["macs_ratio"]
    assert main([*common, "--keep-margins", "none,-1"]) == 2
    assert "--keep-margins 'none,-1': keep_margins entries must be >= 0" in capsys.readouterr().err
    assert main([*common, "--keep-margins", "5"]) == 2
    assert "1 entries, the model has 2 layers" in capsys.readouterr().err
