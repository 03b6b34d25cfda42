import json

from qala.evaluate import main
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
                "--keep-ratio",
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
