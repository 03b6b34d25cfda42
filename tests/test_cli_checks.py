"""Command-line values checked before any work (issue 20): each a single line and exit 2, fast."""

import logging
import shutil
import time

from qala import answer as qa
from qala.bench import cli as bench_cli
from qala.cli import setup_logging
from qala.search import main as search_main
from qala.train import main as train_main
from tests.conftest import REPO, build_tiny_qa_checkpoint
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


def test_questions_only_flags_are_refused_for_the_padded_table(tmp_path, tiny_checkpoint, capsys):
    """Before: with the default --table padded, --qala-backend and --pad-multiple were accepted and did nothing."""
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out, model=tiny_checkpoint))
    for flags, name in ((["--qala-backend", "eager"], "--qala-backend"), (["--pad-multiple", "32"], "--pad-multiple")):
        assert bench_cli.main([str(recipe), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {name} applies to --table questions or all, not to --table padded"
        assert bench_cli.main([str(recipe), "--table", "padded", *flags]) == 2
        assert name in capsys.readouterr().err
    assert not out.exists()  # refused before the lock and the first row


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


def test_quiet_mode_hides_the_warnings_of_the_libraries_child_loggers(caplog):
    """Found by the issue-20 re-check: qala.bench printed torchao.kernel.intmm's "Detected no triton" warning in
    quiet mode, as the filter on the torchao logger does not see its children's records. Errors still show."""
    child = logging.getLogger("torchao.kernel.intmm")
    try:
        setup_logging(verbose=False)
        with caplog.at_level(logging.WARNING):
            child.warning("Warning: Detected no triton")
            child.error("a real torchao error")
            logging.getLogger("qala.train").warning("qala's own warning")
        assert "Detected no triton" not in caplog.text
        assert "a real torchao error" in caplog.text and "qala's own warning" in caplog.text
        caplog.clear()
        setup_logging(verbose=True)
        with caplog.at_level(logging.WARNING):
            child.warning("Warning: Detected no triton")
        assert "Detected no triton" in caplog.text
    finally:
        setup_logging(verbose=False)


def test_search_install_targets_are_checked_before_the_search(tmp_path, tiny_checkpoint, capsys):
    """Found by the issue-20 re-check: `--install-into` a folder that did not exist failed after the whole search
    (having installed into the others), and one holding another model got the frontier with exit 0, which
    qala.answer then refused. Now one line and exit 2 before the lock; a copy of the searched model is accepted."""
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out, model=tiny_checkpoint))
    searched = [str(recipe), f"search.model={tiny_checkpoint}", "search.backend=fp32"]
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    absent = tmp_path / "absent"
    assert search_main([*searched, "--install-into", str(copy), "--install-into", str(absent)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --install-into {absent}: not a directory; expected a model directory to copy frontier.json into"
    )
    other = build_tiny_qa_checkpoint(tmp_path / "other", seed=1)
    capsys.readouterr()  # its progress bar
    assert search_main([*searched, "--install-into", str(copy), "--install-into", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --install-into {other}: holds another model than search.model {tiny_checkpoint}")
    assert "\n" not in err
    assert not out.exists() and not (copy / "frontier.json").exists()  # nothing started, nothing installed


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
