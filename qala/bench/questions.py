"""One row of the real-questions table: what a user waits for, per question, end to end, on unpadded windows.

    python -m qala.bench benchmarks/real_questions.yaml --table questions [--resume]

Each row answers the first `data.max_eval_samples` questions of `data.eval` in requests of
`batch_size` questions: tokenization into overlapping windows (no padding), one forward call over all
windows of the request padded only to its longest window (dynamic padding; qala rows: one call per
32-token length group), post-processing to answer text. Every request is timed (qala.utils.time_calls),
and the answers of that same timed pass give the row's F1, so speed and accuracy always come from the
same questions. Reported per row: ms per question p50 / p90 (request time / questions in it),
questions/s (questions / summed request time), achieved GMAC/s on real tokens (qala.model.macs_per_sample
at each window's real length, summed, over the summed request time; padding positions are work done but
not counted) and its share of the measured INT8 GEMM peak (qala.bench.roofline, the machine's highest).
The rows are planned by qala.bench.plan.plan_question_rows; each runs on an engine of qala.bench.peers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qala.bench.peers import ENGINES, Predictor


def length_groups(inputs: Mapping[str, Any], multiple: int | None = None) -> list[tuple[list[int], int]]:
    """(rows, width) per call of a qala row: the request's windows sorted by real length and grouped per 32
    tokens (qala.quantize.engines.length_batches), each group cut to its longest window (then padded to
    `multiple`, the row's pad_to_multiple_of). A request of 32 questions then pads each window by fewer than
    32 positions instead of every window to the request's longest."""
    from qala.quantize.engines import length_batches

    lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
    width = inputs["input_ids"].size(1)
    groups = []
    for rows in length_batches(lengths, max_batch=len(lengths)):
        longest = max(lengths[i] for i in rows)
        padded = longest + (-longest % multiple if multiple and multiple > 1 else 0)
        groups.append((rows, min(padded, width)))
    return groups


def grouped(predict: Predictor, multiple: int | None = None, pad_id: int = 0) -> Predictor:
    """`predict` called once per length group of the batch (length_groups); the logits come back at the
    batch's rows and positions (positions past a group's width: -1e4, padding, never an answer)."""
    import numpy as np
    import torch

    def run(inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        rows, width = inputs["input_ids"].shape
        start = np.full((rows, width), -1e4, dtype=np.float32)
        end = np.full((rows, width), -1e4, dtype=np.float32)
        for group, cut in length_groups(inputs, multiple):
            index = torch.tensor(group)
            part = {k: v[index, :cut] for k, v in inputs.items()}
            part = pad_to_multiple(part, multiple, pad_id)
            s, e = predict(part)
            start[group, :cut], end[group, :cut] = s[:, :cut], e[:, :cut]
        return start, end

    return run


def pad_to_multiple(inputs: dict[str, Any], multiple: int | None, pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a batch to a multiple of `multiple` positions (attention_mask 0 on the padding)."""
    import torch.nn.functional as F

    seq = inputs["input_ids"].size(1)
    extra = -seq % multiple if multiple and multiple > 1 else 0
    if not extra:
        return inputs
    return {k: F.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0) for k, v in inputs.items()}


def real_token_macs(config: Any, spec: Mapping[str, Any], lengths: Sequence[int]) -> int:
    """MACs of windows at their real lengths under the row's configuration (qala.model.macs_per_sample)."""
    from qala.model import kept_per_layer, macs_per_sample

    values, mode = spec.get("length_config"), spec.get("length_mode")
    total = 0
    for n in lengths:
        kept = None if values is None else kept_per_layer(values, n) if mode == "ratio" else list(values)
        total += macs_per_sample(config, kept, n)
    return total


def _backbone_config(spec: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig, BertConfig

    return BertConfig(**spec["arch"]) if spec.get("arch") else AutoConfig.from_pretrained(spec["path"])


def _requests(spec: Mapping[str, Any]) -> tuple[dict[str, list], list[dict[str, list]]]:
    """(the row's questions as columns, those questions in requests of batch_size): the first N, in file order."""
    from qala.data import load_squad
    from qala.utils import resolve_model_path

    examples = load_squad(resolve_model_path(spec["data"]), split=spec["data_split"])
    n = min(spec["questions"] or len(examples), len(examples))
    columns = examples.select(range(n)).with_format(None).select_columns(["id", "question", "context", "answers"])[:]
    b = spec["batch_size"]
    return columns, [{k: columns[k][i : i + b] for k in ("id", "question", "context")} for i in range(0, n, b)]


def _survey(
    requests: Sequence[Mapping[str, Any]], featurize: Callable, call_shapes: Callable
) -> tuple[set, list[dict[str, Any]], list[int], int]:
    """An untimed pass over the tokenizer: (every call shape, one request's inputs per new call shape, every
    window's real length, padded positions). The shapes warm compiled graphs before the clock starts (no
    request may wait for a compile); the real lengths give the MACs."""
    shapes: set[tuple[int, int]] = set()
    warm: list[dict[str, Any]] = []
    real_lengths: list[int] = []
    padded_positions = 0
    for request in requests:
        features, inputs = featurize(request)
        calls = call_shapes(inputs)
        if not set(calls) <= shapes:
            warm.append(inputs)
            shapes.update(calls)
        real_lengths += [len(ids) for ids in features["input_ids"]]
        padded_positions += sum(rows * width for rows, width in calls)
    return shapes, warm, real_lengths, padded_positions


def _timed_pass(requests: Sequence[Mapping[str, Any]], answer: Callable) -> tuple[dict[str, str], list[float]]:
    """Every request answered once, each call timed (qala.utils.time_calls): (answers by question id, seconds)."""
    from qala.utils import time_calls

    predictions: dict[str, str] = {}
    queue = iter(requests)

    def next_request() -> None:
        predictions.update({qid: text for qid, (text, _) in answer(next(queue)).items()})

    return predictions, time_calls(next_request, warmup=0, repeats=len(requests))


def measure_questions(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One row: answer the questions request by request, each request timed; speed, F1 and MACs."""
    from transformers import AutoTokenizer

    from qala.data import postprocess_with_scores, prepare_eval_features, references_from, squad_metrics
    from qala.model import batch_inputs
    from qala.utils import environment_info, latency_stats

    if spec["engine"] not in ENGINES:
        raise ValueError(f"unknown engine {spec['engine']!r}; expected one of {sorted(ENGINES)}")
    columns, requests = _requests(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    pad_id, multiple = tokenizer.pad_token_id or 0, spec.get("pad_to_multiple_of")
    window = {"max_seq_length": spec["max_seq_length"], "doc_stride": spec["doc_stride"]}
    answers = {"n_best_size": spec["n_best_size"], "max_answer_length": spec["max_answer_length"]}

    def featurize(request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        features = prepare_eval_features(request, tokenizer, **window)
        return features, pad_to_multiple(batch_inputs(features, pad_id=pad_id), multiple, pad_id)

    # qala rows run a request's windows in length groups (length_groups): every call's shape is a group's.
    by_length = spec["engine"] == "qala"

    def call_shapes(inputs: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
        if not by_length:
            return (tuple(inputs["input_ids"].shape),)
        return tuple((len(rows), cut) for rows, cut in length_groups(inputs, multiple))

    shapes, warm, real_lengths, padded_positions = _survey(requests, featurize, call_shapes)
    # The example is the request with the most windows: engines that compile per batch size warm up to it.
    example = max(warm, key=lambda inputs: inputs["input_ids"].size(0))
    predict, facts = ENGINES[spec["engine"]](spec, Path(spec["work_dir"]), example)
    if by_length:
        predict = grouped(predict, multiple, pad_id)
        facts = {**facts, "length_groups": "windows sorted by length, one call per 32-token group"}

    def answer(request: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
        features, inputs = featurize(request)
        return postprocess_with_scores(request, features, *predict(inputs), **answers)

    for request in requests[: spec.get("warmup", 1)]:
        answer(request)
    for inputs in warm if facts.get("warm_every_shape") else []:
        predict(inputs)
    predictions, seconds = _timed_pass(requests, answer)
    stats = latency_stats([s / len(r["id"]) for s, r in zip(seconds, requests, strict=True)])
    metrics = squad_metrics(predictions, references_from(columns))
    n, total = len(columns["id"]), sum(seconds)
    macs = real_token_macs(_backbone_config(spec), spec, real_lengths)
    scored = not spec.get("f1_note")  # random weights: speed only
    return {
        **facts,
        "questions": n,
        "requests": len(requests),
        "windows": len(real_lengths),
        "real_tokens": sum(real_lengths),
        "padded_positions": padded_positions,
        "shapes": len(shapes),
        "untimed_warmup_requests": min(spec.get("warmup", 1), len(requests)),
        "warmed_shapes": len(shapes) if facts.get("warm_every_shape") else 0,
        "f1": round(metrics["f1"], 2) if scored else None,
        "exact_match": round(metrics["exact_match"], 2) if scored else None,
        "ms_p50": stats["p50_ms"],
        "ms_p90": stats["p90_ms"],
        "ms_p99": stats["p99_ms"],
        "questions_per_s": round(n / total, 3),
        "seconds": round(total, 3),
        "gmacs_real_tokens": round(macs / 1e9, 3),
        "achieved_gmacs_per_s": round(macs / total / 1e9, 3),
        "python": sys.executable,
        "worker_versions": environment_info()["versions"],
    }
