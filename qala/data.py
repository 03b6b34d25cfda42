"""SQuAD v1.1 data: loading and validation, featurization into model windows, post-processing of
start/end logits into answer texts, and the official evaluation metrics.

Featurization and post-processing follow transformers' examples/pytorch/question-answering
(run_qa.py and utils_qa.py); the metrics are exactly those of the official evaluate-v1.1.py script.
Nothing here imports torch: post-processing and metrics work on numpy arrays and plain Python.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

from qala.recipe import DataConfig
from qala.utils import resolve_model_path

logger = logging.getLogger(__name__)

# The schema of the hub `squad` dataset, so that local files and hub data are interchangeable.
SQUAD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {
            "text": datasets.List(datasets.Value("string")),
            "answer_start": datasets.List(datasets.Value("int32")),
        },
    }
)

# How many problems a skip_invalid warning spells out; the rest are only counted.
_SHOWN_PROBLEMS = 5
# Questions tokenized per batch, and windows whose offsets post-processing holds as Python lists at once:
# both bound memory whatever the number of questions and the length of their contexts.
FEATURIZE_BATCH = 64
POSTPROCESS_WINDOWS = 2048

_MISSING = object()


class SquadFormatError(ValueError):
    """Bad SQuAD input; the message names the file, article title, question id and field and what was
    expected."""


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def load_squad(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    skip_invalid: bool = False,
    skip_option: str = "skip_invalid=True",
) -> datasets.Dataset:
    """Load SQuAD v1.1 questions as a flat `datasets.Dataset` with the columns of the hub `squad`
    dataset: id, title, context, question, answers = {"text": [...], "answer_start": [...]}.

    `source` is a SQuAD-format JSON file (any existing file, or any path ending in .json) or else a
    name (or local directory) for `datasets.load_dataset(source, split=split)`; `split` only applies
    to the latter. Every question is validated; a problem raises `SquadFormatError` (its message
    names `skip_option`, the way the caller's user turns skipping on), or with `skip_invalid=True`
    the bad questions are dropped and counted in one logged warning. A malformed top-level structure,
    and a source with no (valid) question at all, are always errors. As in real SQuAD-like files
    (COVID-QA), integer question ids are read as strings and a missing or null title as "".
    """
    path = Path(source)
    if path.is_file() or str(source).endswith(".json"):
        dataset, label = _load_json_file(path, str(source), skip_invalid, skip_option), str(source)
    else:
        label = f"{source}[{split}]"
        dataset = _load_hub_dataset(str(source), split, label, skip_invalid, skip_option)
    logger.info("Loaded %d questions from %s", len(dataset), label)
    return dataset


@dataclass(frozen=True)
class _Problem:
    """One validation problem. `is_question` tells a bad question (skippable, counted) from a
    malformed article or paragraph; `qid` is the question id when it has a usable one."""

    message: str
    is_question: bool = False
    qid: str | None = None


def _load_json_file(path: Path, label: str, skip_invalid: bool, skip_option: str) -> datasets.Dataset:
    if not path.is_file():
        raise SquadFormatError(f"{label}: SQuAD JSON file not found")
    rows, problems = _flatten_squad_json(_read_json(path, label), label)
    columns = {name: [row[name] for row in rows] for name in SQUAD_FEATURES}
    invalid = _validate_rows(columns, [row["where"] for row in rows], label, problems)
    _report_problems(problems, label, skip_invalid, skip_option, n_kept=len(rows) - len(invalid))
    keep = [i for i in range(len(rows)) if i not in invalid]
    kept = {name: [values[i] for i in keep] for name, values in columns.items()}
    # JSON answers are a list of {"text", "answer_start"}; the hub schema has parallel lists.
    kept["answers"] = [
        {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
        for answers in kept["answers"]
    ]
    return datasets.Dataset.from_dict(kept, features=SQUAD_FEATURES)


def _load_hub_dataset(name: str, split: str, label: str, skip_invalid: bool, skip_option: str) -> datasets.Dataset:
    dataset = datasets.load_dataset(name, split=split)
    # The same leniency as for JSON files: no titles, or integer ids.
    if "title" not in dataset.column_names:
        dataset = dataset.add_column("title", [""] * len(dataset))
    if "id" in dataset.column_names and getattr(dataset.features["id"], "dtype", "").startswith(("int", "uint")):
        dataset = dataset.cast_column("id", datasets.Value("string"))
    absent = [column for column in SQUAD_FEATURES if column not in dataset.column_names]
    if absent:
        raise SquadFormatError(
            f"{label}: missing column(s) {absent}; expected the columns of the hub 'squad' dataset "
            f"{list(SQUAD_FEATURES)}, got {dataset.column_names}"
        )
    dataset = dataset.select_columns(list(SQUAD_FEATURES))
    columns = _columns(dataset, list(SQUAD_FEATURES))
    columns["answers"] = [_hub_answers_as_list(answers) for answers in columns["answers"]]
    problems: list[_Problem] = []
    wheres = [f"{label}: article {title!r}" for title in columns["title"]]
    invalid = _validate_rows(columns, wheres, label, problems)
    _report_problems(problems, label, skip_invalid, skip_option, n_kept=len(dataset) - len(invalid))
    if invalid:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in invalid])
    return dataset


def _read_json(path: Path, label: str) -> Any:
    try:
        # utf-8-sig: tolerate a byte-order mark, which json.loads would reject.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SquadFormatError(f"{label}: not UTF-8 text ({err})") from err
    except OSError as err:
        raise SquadFormatError(f"{label}: cannot read the file ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SquadFormatError(
            f"{label}: invalid JSON at line {err.lineno} column {err.colno} (char {err.pos}): {err.msg}"
        ) from err


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _flatten_squad_json(data: Any, label: str) -> tuple[list[dict[str, Any]], list[_Problem]]:
    """Walk articles/paragraphs/qas into flat rows (fields may be _MISSING; they are checked later by
    `_validate_rows`). Articles or paragraphs whose structure cannot be walked become problems here."""
    if not isinstance(data, dict):
        raise SquadFormatError(f"{label}: expected a JSON object at the top level, got {_type_name(data)}")
    if "data" not in data:
        raise SquadFormatError(f"{label}: missing top-level field 'data' (the list of articles)")
    articles = data["data"]
    if not isinstance(articles, list):
        raise SquadFormatError(f"{label}: top-level field 'data' must be a list, got {_type_name(articles)}")

    rows: list[dict[str, Any]] = []
    problems: list[_Problem] = []
    for a_index, article in enumerate(articles):
        if not isinstance(article, dict):
            what = f"must be an object, got {_type_name(article)}"
            problems.append(_Problem(f"{label}: article #{a_index} {what}"))
            continue
        # Real SQuAD-like files (COVID-QA) have no titles: "" like the hub's, located by position.
        title = article.get("title")
        title = "" if title is None else title
        where = f"{label}: article {title!r}" if isinstance(title, str) and title else f"{label}: article #{a_index}"
        paragraphs = article.get("paragraphs", _MISSING)
        if paragraphs is _MISSING or not isinstance(paragraphs, list):
            what = (
                "missing field 'paragraphs'"
                if paragraphs is _MISSING
                else f"field 'paragraphs' must be a list, got {_type_name(paragraphs)}"
            )
            problems.append(_Problem(f"{where}: {what}"))
            continue
        for p_index, paragraph in enumerate(paragraphs):
            p_where = f"{where}, paragraph #{p_index}"
            if not isinstance(paragraph, dict):
                problems.append(_Problem(f"{p_where}: must be an object, got {_type_name(paragraph)}"))
                continue
            qas = paragraph.get("qas", _MISSING)
            if qas is _MISSING or not isinstance(qas, list):
                what = (
                    "missing field 'qas'" if qas is _MISSING else f"field 'qas' must be a list, got {_type_name(qas)}"
                )
                problems.append(_Problem(f"{p_where}: {what}"))
                continue
            context = paragraph.get("context", _MISSING)
            for q_index, qa in enumerate(qas):
                qid = qa.get("id", _MISSING) if isinstance(qa, dict) else _MISSING
                # Integer ids (COVID-QA) are ids too; duplicates after conversion are still caught.
                if isinstance(qid, int) and not isinstance(qid, bool):
                    qid = str(qid)
                # A question without a usable id is located by its position instead.
                q_where = where if isinstance(qid, str) else f"{p_where}, question #{q_index}"
                if not isinstance(qa, dict):
                    problems.append(
                        _Problem(
                            f"{p_where}, question #{q_index}: must be an object, got {_type_name(qa)}",
                            is_question=True,
                        )
                    )
                    continue
                rows.append(
                    {
                        "id": qid,
                        "title": title,
                        "context": context,
                        "question": qa.get("question", _MISSING),
                        "answers": qa.get("answers", _MISSING),
                        "where": q_where,
                    }
                )
    return rows, problems


def _hub_answers_as_list(answers: Any) -> Any:
    """Hub rows store answers as {"text": [...], "answer_start": [...]}; the checks want a list of
    {"text", "answer_start"} objects as in the JSON files."""
    if not isinstance(answers, dict):
        return answers
    texts, starts = answers.get("text", _MISSING), answers.get("answer_start", _MISSING)
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        return answers  # left malformed on purpose: the row check reports it
    return [{"text": text, "answer_start": start} for text, start in zip(texts, starts, strict=True)]


def _field_problem(value: Any, name: str, *, non_blank: bool = False) -> str | None:
    if value is _MISSING:
        return f"missing field '{name}'"
    if not isinstance(value, str):
        return f"field '{name}' must be a string, got {_type_name(value)}"
    if non_blank and not value.strip():
        return f"field '{name}' is empty" if not value else f"field '{name}' is only whitespace"
    return None


def _question_problem(qid: Any, title: Any, context: Any, question: Any, answers: Any) -> str | None:
    """The first thing wrong with one question (as a message without its location), or None."""
    for value, name, non_blank in (
        (qid, "id", True),
        (title, "title", False),
        (context, "context", True),
        (question, "question", True),
    ):
        problem = _field_problem(value, name, non_blank=non_blank)
        if problem:
            return problem
    if answers is _MISSING:
        return "missing field 'answers'"
    if not isinstance(answers, list):
        if isinstance(answers, dict):
            return "field 'answers' must be {'text': [...], 'answer_start': [...]} lists of equal length"
        return f"field 'answers' must be a list, got {_type_name(answers)}"
    if not answers:
        return "has no answers (every SQuAD v1.1 question needs at least one)"
    for k, answer in enumerate(answers):
        if not isinstance(answer, dict):
            return f"answers[{k}] must be an object, got {_type_name(answer)}"
        text, start = answer.get("text", _MISSING), answer.get("answer_start", _MISSING)
        problem = _field_problem(text, f"answers[{k}].text", non_blank=True)
        if problem:
            return problem
        if start is _MISSING:
            return f"missing field 'answers[{k}].answer_start'"
        # bool is an int subclass, but True is never a meant character offset.
        if not isinstance(start, int) or isinstance(start, bool):
            return f"field 'answers[{k}].answer_start' must be an integer, got {_type_name(start)}"
        end = start + len(text)
        if start < 0 or end > len(context) or context[start:end] != text:
            found = context[start:end] if start >= 0 else ""
            return (
                f"answers[{k}].answer_start={start} does not match the context "
                f"(context[{start}:{end}] is {found!r}, expected {text!r}; "
                f"the context has {len(context)} characters)"
            )
    return None


def _validate_rows(
    columns: Mapping[str, Sequence[Any]], wheres: Sequence[str], label: str, problems: list[_Problem]
) -> set[int]:
    """Check every question row; append a problem per bad row and return the bad row indices."""
    invalid: set[int] = set()
    first_seen: dict[str, str] = {}
    rows = zip(
        columns["id"],
        columns["title"],
        columns["context"],
        columns["question"],
        columns["answers"],
        wheres,
        strict=True,
    )
    for i, (qid, title, context, question, answers, where) in enumerate(rows):
        located = f"{where}, question {qid}" if isinstance(qid, str) else where
        message = _question_problem(qid, title, context, question, answers)
        if message is None and qid in first_seen:
            message = f"duplicate question id (first seen in {first_seen[qid]})"
        if isinstance(qid, str):
            first_seen.setdefault(qid, where.removeprefix(f"{label}: "))
        if message is not None:
            invalid.add(i)
            problems.append(
                _Problem(f"{located}: {message}", is_question=True, qid=qid if isinstance(qid, str) else None)
            )
    return invalid


def _report_problems(problems: list[_Problem], label: str, skip_invalid: bool, skip_option: str, n_kept: int) -> None:
    # Nothing to train on or evaluate is an error, never an empty run (a sampler crash, or F1 over 0 questions).
    if not problems and not n_kept:
        raise SquadFormatError(f"{label}: no questions (expected articles with paragraphs and qas in 'data')")
    if not problems:
        return
    if not skip_invalid:
        more = len(problems) - 1
        counted = f"and {more} more problem(s) in {label}; " if more else ""
        raise SquadFormatError(f"{problems[0].message} [{counted}{skip_option} skips invalid questions]")
    if not n_kept:
        raise SquadFormatError(
            f"{label}: no valid question to use, all skipped ({len(problems)} problem(s)); "
            f"the first: {problems[0].message.removeprefix(f'{label}: ')}"
        )
    skipped = sum(1 for problem in problems if problem.is_question)
    ids = [problem.qid for problem in problems if problem.qid is not None]
    structural = len(problems) - skipped
    logger.warning(
        "%s: skipped %d invalid question(s) (%d kept)%s; first ids: %s; first problems:\n  %s",
        label,
        skipped,
        n_kept,
        f" and {structural} malformed article(s)/paragraph(s)" if structural else "",
        ", ".join(ids[:_SHOWN_PROBLEMS]) or "-",
        "\n  ".join(problem.message for problem in problems[:_SHOWN_PROBLEMS]),
    )


def references_from(dataset: datasets.Dataset | Mapping[str, Sequence[Any]]) -> dict[str, list[str]]:
    """Question id -> gold answer texts, the `references` argument of `squad_metrics`."""
    columns = _columns(dataset, ["id", "answers"])
    return {qid: list(answers["text"]) for qid, answers in zip(columns["id"], columns["answers"], strict=True)}


def _columns(data: datasets.Dataset | Mapping[str, Sequence[Any]], names: list[str]) -> dict[str, list[Any]]:
    """Whole columns as Python lists, whatever format (torch, numpy, column subset) the caller set."""
    if isinstance(data, datasets.Dataset):
        return data.with_format(None).select_columns(names)[:]
    return {name: list(data[name]) for name in names}


# --------------------------------------------------------------------------------------------------
# Featurization (run_qa.py style: question first, context second, overlapping context windows)
# --------------------------------------------------------------------------------------------------


def _check_featurize_args(tokenizer: Any, max_seq_length: int, doc_stride: int) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"a fast (Rust `tokenizers`) tokenizer is required for offset mappings and overflowing windows, "
            f"got {type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if doc_stride < 0 or doc_stride >= max_seq_length:
        raise ValueError(f"doc_stride={doc_stride} must be >= 0 and smaller than max_seq_length={max_seq_length}")
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and max_seq_length > model_max_length:
        raise ValueError(
            f"max_seq_length={max_seq_length} is larger than the tokenizer's model_max_length={model_max_length}"
        )
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    if max_seq_length <= n_special + 1:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room beside {n_special} special tokens")


def _check_question_room(
    examples: Mapping[str, Any], questions: list[str], tokenizer: Any, max_seq_length: int, doc_stride: int
) -> None:
    """Refuse questions that leave no more than doc_stride tokens for the context in a truncated window.
    The Rust tokenizer would otherwise panic (PanicException, not an Exception subclass, with a backtrace)."""
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for i, q_len in enumerate(lengths):
        room = max_seq_length - n_special - q_len
        if room > doc_stride:
            continue
        # Only a context that needs truncation trips the tokenizer; this is rare, so tokenize it alone.
        c_len = len(tokenizer(examples["context"][i], add_special_tokens=False)["input_ids"])
        if q_len + c_len + n_special > max_seq_length:
            if room <= 0:
                raise ValueError(
                    f"question {examples['id'][i]} is {q_len} tokens long, longer than the window: "
                    f"max_seq_length={max_seq_length} with {n_special} special tokens leaves at most "
                    f"{max_seq_length - n_special} tokens for question and context; shorten the question "
                    f"or raise max_seq_length"
                )
            raise ValueError(
                f"question {examples['id'][i]} is {q_len} tokens long: with max_seq_length={max_seq_length} "
                f"and {n_special} special tokens only {room} tokens are left per context window, but they "
                f"must be more than doc_stride={doc_stride}; raise max_seq_length or lower doc_stride"
            )


def _tokenize_windows(
    examples: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    pad_to_max_length: bool = False,
) -> Any:
    """The windows of a batch of examples (both prepare_*_features take these keyword arguments)."""
    _check_featurize_args(tokenizer, max_seq_length, doc_stride)
    # Some SQuAD questions start with lots of spaces, which waste window room and can make the
    # truncation fail; run_qa.py strips them too.
    questions = [q.lstrip() for q in examples["question"]]
    _check_question_room(examples, questions, tokenizer, max_seq_length, doc_stride)
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else "do_not_pad",
    )


def _cls_index(input_ids: list[int], tokenizer: Any) -> int:
    # "No answer in this window" points at the CLS token (RoBERTa calls it <s>, which is also bos).
    for token_id in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        if token_id is not None and token_id in input_ids:
            return input_ids.index(token_id)
    return 0


def prepare_train_features(examples: Mapping[str, Any], tokenizer: Any, **window: Any) -> dict[str, list[Any]]:
    """Tokenize a batch of examples into training windows with start/end token labels.

    A long context yields several windows overlapping by `doc_stride` tokens. The label is the first
    gold answer; a window that does not contain it whole is labelled with the CLS index (0). Rows are
    unpadded unless `pad_to_max_length` (training pads dynamically with DataCollatorWithPadding).
    `window`: max_seq_length (384), doc_stride (128), pad_to_max_length (False), as `_tokenize_windows`.
    """
    encoded = _tokenize_windows(examples, tokenizer, **window)
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    offset_mapping = encoded.pop("offset_mapping")
    start_positions: list[int] = []
    end_positions: list[int] = []
    for i, offsets in enumerate(offset_mapping):
        cls_index = _cls_index(encoded["input_ids"][i], tokenizer)
        answers = examples["answers"][sample_mapping[i]]
        span = None
        if answers["answer_start"]:
            text = answers["text"][0]
            # Labels should sit on the answer's words, not on whitespace at its edges (a start char on
            # a space would otherwise select the token before it).
            start_char = answers["answer_start"][0] + (len(text) - len(text.lstrip()))
            end_char = answers["answer_start"][0] + len(text.rstrip())
            span = _token_span(offsets, encoded.sequence_ids(i), start_char, end_char)
        start, end = span if span is not None else (cls_index, cls_index)
        start_positions.append(start)
        end_positions.append(end)
    features = dict(encoded)
    features["start_positions"] = start_positions
    features["end_positions"] = end_positions
    return features


def _token_span(
    offsets: list[tuple[int, int]], sequence_ids: list[int | None], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token indices of the first and last context tokens covering [start_char, end_char), or None when
    the window does not contain the whole answer."""
    context_tokens = [k for k, seq_id in enumerate(sequence_ids) if seq_id == 1]
    if not context_tokens:
        return None
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    # Unlike run_qa.py, the scans stay inside the context: the trailing [SEP] has offsets (0, 0), so an
    # unbounded forward scan walks past an answer that ends the window.
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def prepare_eval_features(examples: Mapping[str, Any], tokenizer: Any, **window: Any) -> dict[str, list[Any]]:
    """Tokenize a batch of examples into evaluation windows.

    Each window keeps `example_id` (the question id) and an `offset_mapping` whose non-context
    positions (question, special tokens, padding) are None, so post-processing can only pick context
    spans and map them back to characters. `window` as `prepare_train_features`.
    """
    encoded = _tokenize_windows(examples, tokenizer, **window)
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    offset_mapping = encoded.pop("offset_mapping")
    example_ids: list[str] = []
    context_offsets: list[list[tuple[int, int] | None]] = []
    for i, offsets in enumerate(offset_mapping):
        example_ids.append(examples["id"][sample_mapping[i]])
        sequence_ids = encoded.sequence_ids(i)
        context_offsets.append([o if sequence_ids[k] == 1 else None for k, o in enumerate(offsets)])
    features = dict(encoded)
    features["example_id"] = example_ids
    features["offset_mapping"] = context_offsets
    return features


def featurize(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    train: bool,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    pad_to_max_length: bool = False,
    source: str | None = None,
) -> datasets.Dataset:
    """Map a `load_squad` dataset to train or eval features (one row per context window). `source`, the
    file the questions come from, starts the message of a question the window cannot hold."""
    # Fail before datasets starts a progress bar and fingerprints the tokenizer.
    _check_featurize_args(tokenizer, max_seq_length, doc_stride)
    prepare: Callable[..., dict[str, list[Any]]] = prepare_train_features if train else prepare_eval_features
    try:
        features = dataset.map(
            prepare,
            batched=True,
            # A batch's windows are Python lists until written: datasets' 1000 questions of 20k characters
            # (COVID-QA) are ~28k windows and took 6 GB; FEATURIZE_BATCH questions keep memory flat.
            batch_size=FEATURIZE_BATCH,
            remove_columns=dataset.column_names,
            fn_kwargs={
                "tokenizer": tokenizer,
                "max_seq_length": max_seq_length,
                "doc_stride": doc_stride,
                "pad_to_max_length": pad_to_max_length,
            },
            desc=f"Featurizing {'train' if train else 'eval'} windows",
        )
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f"{source}: {e}") from None
    logger.info("Featurized %d questions into %d windows", len(dataset), len(features))
    return features


# --------------------------------------------------------------------------------------------------
# Post-processing (utils_qa.postprocess_qa_predictions for SQuAD v1: no null answer)
# --------------------------------------------------------------------------------------------------


def postprocess_with_scores(
    examples: datasets.Dataset | Mapping[str, Sequence[Any]],
    features: datasets.Dataset | Mapping[str, Sequence[Any]],
    start_logits: np.ndarray | Sequence[np.ndarray],
    end_logits: np.ndarray | Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, tuple[str, float]]:
    """Question id -> (best answer text, its start_logit + end_logit) over all windows of the question.

    Candidate spans pair the n_best_size highest start and end logits of each window; spans touching a
    non-context position (offset None), with end < start, or longer than max_answer_length tokens are
    dropped. A question with no valid span gets ("", -inf). Logit rows may be padded beyond a window's
    offset_mapping (or be ragged); only the first len(offset_mapping) positions count.
    """
    ex = _columns(examples, ["id", "context"])
    example_ids = _columns(features, ["example_id"])["example_id"]
    if len(start_logits) != len(example_ids) or len(end_logits) != len(example_ids):
        raise ValueError(
            f"got {len(start_logits)} start and {len(end_logits)} end logit rows for {len(example_ids)} features"
        )
    features_per_example: dict[str, list[int]] = defaultdict(list)
    for feature_index, example_id in enumerate(example_ids):
        features_per_example[example_id].append(feature_index)

    predictions: dict[str, tuple[str, float]] = {}
    without_features = 0
    offsets_of: dict[int, Any] = {}
    questions = list(zip(ex["id"], ex["context"], strict=True))
    for q, (qid, context) in enumerate(questions):
        if qid not in features_per_example:
            without_features += 1
        if not all(i in offsets_of for i in features_per_example.get(qid, ())):
            offsets_of = _offsets_from(features, questions[q:], features_per_example)
        best: tuple[float, int, int] | None = None  # (score, start char, end char)
        for feature_index in features_per_example.get(qid, ()):
            offsets = offsets_of[feature_index]
            feature_start = np.asarray(start_logits[feature_index])
            feature_end = np.asarray(end_logits[feature_index])
            length = min(len(offsets), len(feature_start), len(feature_end))
            feature_start, feature_end = feature_start[:length], feature_end[:length]
            start_indexes = np.argsort(feature_start)[-1 : -n_best_size - 1 : -1].tolist()
            end_indexes = np.argsort(feature_end)[-1 : -n_best_size - 1 : -1].tolist()
            for start_index in start_indexes:
                if offsets[start_index] is None or len(offsets[start_index]) < 2:
                    continue
                for end_index in end_indexes:
                    if offsets[end_index] is None or len(offsets[end_index]) < 2:
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    score = float(feature_start[start_index] + feature_end[end_index])
                    # Strict ">" keeps the first of equal scores, as run_qa's stable sort does.
                    if best is None or score > best[0]:
                        best = (score, offsets[start_index][0], offsets[end_index][1])
        predictions[qid] = (context[best[1] : best[2]], best[0]) if best is not None else ("", float("-inf"))
    if without_features:
        logger.warning("%d question(s) have no features; their answer is ''", without_features)
    return predictions


def _offsets_from(
    features: datasets.Dataset | Mapping[str, Sequence[Any]],
    questions: Sequence[tuple[str, str]],
    features_per_example: Mapping[str, list[int]],
) -> dict[int, Any]:
    """Window index -> offset_mapping for the windows of the first of `questions` and the next ones, up to
    about POSTPROCESS_WINDOWS windows: the whole column as Python lists took 1.7 GB on COVID-QA."""
    wanted: list[int] = []
    for qid, _context in questions:
        if wanted and len(wanted) + len(features_per_example.get(qid, ())) > POSTPROCESS_WINDOWS:
            break
        wanted += features_per_example.get(qid, ())
    if isinstance(features, datasets.Dataset):
        rows = features.with_format(None).select_columns(["offset_mapping"])[wanted]["offset_mapping"]
    else:
        rows = [features["offset_mapping"][i] for i in wanted]
    return dict(zip(wanted, rows, strict=True))


def postprocess_predictions(examples, features, start_logits, end_logits, **options: int) -> dict[str, str]:
    """Question id -> best answer text ("" when no valid span); arguments and rules (n_best_size,
    max_answer_length) as `postprocess_with_scores`."""
    scored = postprocess_with_scores(examples, features, start_logits, end_logits, **options)
    return {qid: text for qid, (text, _score) in scored.items()}


# --------------------------------------------------------------------------------------------------
# Metrics: exactly the official evaluate-v1.1.py definitions
# --------------------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, remove punctuation, remove articles (a, an, the), collapse whitespace."""
    lowered = s.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalized answers (0 when they share no token)."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} as percentages over the reference questions (best over each question's gold
    answers; a question without a prediction scores 0) and "n", the number of reference questions."""
    if not references:
        raise ValueError("no reference questions to score")
    exact_match = f1 = 0.0
    missing = 0
    for qid, ground_truths in references.items():
        if not ground_truths:
            raise ValueError(f"question {qid} has no gold answers")
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        exact_match += max(float(exact_match_score(prediction, truth)) for truth in ground_truths)
        f1 += max(f1_score(prediction, truth) for truth in ground_truths)
    if missing:
        logger.warning("%d of %d reference question(s) have no prediction and score 0", missing, len(references))
    n = len(references)
    return {"exact_match": 100.0 * exact_match / n, "f1": 100.0 * f1 / n, "n": n}


# --------------------------------------------------------------------------------------------------
# The recipe's data, as every stage loads it
# --------------------------------------------------------------------------------------------------


def load_split(data: DataConfig, which: Literal["train", "eval"]) -> datasets.Dataset:
    """The recipe's training or evaluation questions, with max_train_samples / max_eval_samples applied.
    data.skip_invalid applies to both: train, tune and search all say `data.skip_invalid=true` to a bad file."""
    source, split, limit = (
        (data.train, data.train_split, data.max_train_samples)
        if which == "train"
        else (data.eval, data.eval_split, data.max_eval_samples)
    )
    examples = load_squad(
        resolve_model_path(source), split=split, skip_invalid=data.skip_invalid, skip_option="data.skip_invalid=true"
    )
    return examples.select(range(min(limit, len(examples)))) if limit else examples


def windows(
    examples: datasets.Dataset, tokenizer: Any, data: DataConfig, *, train: bool, padded: bool | None = None
) -> datasets.Dataset:
    """Featurized windows. Training windows are unpadded (batches pad dynamically). Evaluation windows
    are padded to max_seq_length by default, which absolute length configurations (the paper mode)
    need; keep-ratio configurations and serving use `padded=False`: each window at its real length."""
    return featurize(
        examples,
        tokenizer,
        train=train,
        max_seq_length=data.max_seq_length,
        doc_stride=data.doc_stride,
        pad_to_max_length=(not train) if padded is None else padded,
        source=data.train if train else data.eval,
    )


def question_subset(
    examples: datasets.Dataset, features: datasets.Dataset, n: int | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded random subset of n questions and their windows (all of them when n is None or too large).

    Random, not the first n: the first questions of a SQuAD file all come from one article.
    """
    if not n or n >= len(examples):
        return examples, features
    import random

    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    subset = examples.select(chosen)
    ids = set(subset["id"])
    return subset, features.filter(lambda f: f["example_id"] in ids)


# --------------------------------------------------------------------------------------------------
# Calibration windows (engines that quantize on their own: NNCF)
# --------------------------------------------------------------------------------------------------


def calibration_windows(
    source: str | os.PathLike[str],
    tokenizer: Any,
    *,
    count: int,
    max_seq_length: int,
    doc_stride: int,
    split: str = "train",
    skip_invalid: bool = False,
) -> list[dict[str, np.ndarray]]:
    """The first `count` evaluation windows (unpadded, one per item: {input_ids, attention_mask,
    token_type_ids?} as int64 arrays [1, tokens]) of the questions of `source` (load_squad's: a SQuAD-format
    JSON file or a hub name with `split`), for an engine that calibrates its own INT8 quantization.

    Calibration only needs representative windows: questions too long for this window size (no context room
    beyond doc_stride, which featurizing refuses) are left out rather than failing. Only as many questions
    are tokenized as the windows need."""
    examples = load_squad(resolve_model_path(str(source)), split=split, skip_invalid=skip_invalid)
    room = max_seq_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride
    found: list[dict[str, np.ndarray]] = []
    for i in range(0, len(examples), FEATURIZE_BATCH):
        chunk = examples.select(range(i, min(i + FEATURIZE_BATCH, len(examples)))).with_format(None)[:]
        lengths = [len(ids) for ids in tokenizer(chunk["question"], add_special_tokens=False)["input_ids"]]
        kept = [j for j, n in enumerate(lengths) if n < room]
        if not kept:
            continue
        chunk = {name: [values[j] for j in kept] for name, values in chunk.items()}
        features = prepare_eval_features(chunk, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride)
        for j in range(len(features["input_ids"])):
            found.append(
                {
                    name: np.asarray([features[name][j]], dtype=np.int64)
                    for name in ("input_ids", "attention_mask", "token_type_ids")
                    if name in features
                }
            )
        if len(found) >= count:
            break
    return found[:count]
