"""Command-line values checked before any work (issue 20): each a single line and exit 2, fast."""

import logging
import time

from qala import answer as qa
from qala.bench import cli as bench_cli
from qala.cli import setup_logging
from qala.train import main as train_main
from tests.conftest import REPO
from tests.test_runs import RECIPE as RUNS_RECIPE

# test_runs' recipe: every stage writes into {out}; here with a model.
RECIPE = RUNS_RECIPE + "model: {{name_or_path: {model}}}\n"


def test_an_unknown_serving_engine_fails_before_any_row(tmp_path, tiny_checkpoint, capsys):
    """Before: the GEMM peak and 12 rows ran, then each qala row failed with a traceback in the log."""
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out, model=tiny_checkpoint))
    assert bench_cli.main([str(recipe), "--table", "questions", "--qala-backend", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --qala-backend 'nosuch': unknown serving engine; choose one of [")
    assert not out.exists()  # not even the lock: nothing started
    argv = ["--model", str(tmp_path / "absent"), "--question", "Who?", "--context", "Me.", "--backend", "nosuch"]
    assert qa.main(argv) == 2
    assert capsys.readouterr().err.strip().startswith("error: --backend 'nosuch': unknown serving engine")


def test_quiet_mode_hides_the_tokenizers_indexing_errors_line(caplog):
    """qala says a long question is too long in one line; transformers' own warning is -v only."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    message = "Token indices sequence length is longer than ... will result in indexing errors"
    try:
        setup_logging(verbose=False)
        with caplog.at_level(logging.WARNING):
            logger.warning(message)
            logger.warning("another warning")
        assert message not in caplog.text and "another warning" in caplog.text
        caplog.clear()
        setup_logging(verbose=True)
        with caplog.at_level(logging.WARNING):
            logger.warning(message)
        assert message in caplog.text
    finally:
        setup_logging(verbose=False)


def test_an_unreachable_hub_id_fails_fast(tmp_path, monkeypatch, capsys):
    """Before: ~30-55 s of retries before the hub-id failure of qala.train was said."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: unreachable, at once
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "out", model="nosuch-org/nosuch-model"))
    started = time.monotonic()
    assert train_main([str(recipe)]) == 2
    assert time.monotonic() - started < 10
    assert capsys.readouterr().err.strip() == (
        "error: model directory not found: nosuch-org/nosuch-model (nor a Hugging Face Hub model: the Hub cannot be "
        "reached from here and nosuch-org/nosuch-model is not in the local cache)"
    )
