"""Measure one benchmark row in this process and write its result JSON.

    python -m qala.bench.worker SPEC.json OUT        # OUT: a file, or a folder (OUT/worker-<pid>.json)

The harness (qala.bench.cli) starts one worker per row (per row and round, benchmark.rounds), so peak resident
memory is the row's own and no row inherits another's threads, allocator state or compiled graphs; torch's
run_cpu launcher starts it per instance in the core sweep. A row may name another Python (`python` in its spec,
e.g. the IPEX environment's), so this module imports only what the row needs. measure() runs a row on its engine
(qala.bench.peers) and times the passes of its workload, chosen by the row's `padded` flag: padded (model
calls on the padded windows of `inputs`, one pass per batch size) or real questions (the first `questions`
answered in requests of `batch_size`, end to end: tokenization, every window unpadded, post-processing, each
request timed; the F1 comes from the answers of that same timed pass, and MACs are counted on real tokens).
"gemm_peak" runs qala.bench.roofline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qala.utils import atomic_write_json, time_calls

logger = logging.getLogger(__name__)
Predictor = Callable[[Mapping[str, Any]], tuple[Any, Any]]


def make_batch(inputs: Mapping[str, Any], batch_size: int, start: int = 0) -> dict[str, Any]:
    """`batch_size` windows from `start`, tiling the windows when there are fewer."""
    import torch

    index = torch.tensor([(start + i) % inputs["input_ids"].size(0) for i in range(batch_size)])
    return {k: v.index_select(0, index).contiguous() for k, v in inputs.items()}


def _engine(spec: Mapping[str, Any], example: Mapping[str, Any]) -> tuple[Predictor, dict[str, Any]]:
    """(predict, facts) of the row's engine; a padded row's `kind` names it where the spec has no engine."""
    from qala.bench.peers import ENGINES

    name = spec.get("engine") or spec["kind"]
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {sorted(ENGINES)}")
    return ENGINES[name](spec, Path(spec["work_dir"]), example)


Pass = tuple[str, Callable[[], Any], dict[str, Any]]  # (name, one timed call, time_calls options)
Workload = tuple[Any, Callable[[Predictor, dict], Iterator[Pass]], Callable[[dict, dict], dict]]


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One row, padded or not (its `padded` flag): the row's engine built on the workload's example, then each
    timed pass the workload yields (untimed warm-up inside it), then the workload's summary of the timings."""
    padded = spec.get("padded", spec["kind"] != "real_questions")  # rows planned before the flag: by kind
    example, passes, summary = (_padded if padded else _questions)(spec)
    started = time.perf_counter()
    predict, facts = _engine(spec, example)
    result: dict[str, Any] = {**facts, "load_seconds": round(time.perf_counter() - started, 2)}
    timed = {name: time_calls(call, **options) for name, call, options in passes(predict, facts)}
    return {**result, **summary(timed, facts)}


def _padded(spec: Mapping[str, Any]) -> Workload:
    """Model calls on the padded windows of `inputs`, one timed pass per batch size (batch 1 cycles through
    different windows, since real inputs differ in how many tokens are real); the first call (compiling) apart."""
    from safetensors.torch import load_file

    from qala.bench.report import summarize

    inputs, first_call = load_file(spec["inputs"]), {}

    def passes(call: Predictor, facts: dict) -> Iterator[Pass]:
        for b in spec["batch_sizes"]:
            latency = b == 1 and not spec.get("throughput_only")
            repeats = spec["latency_repeats"] if latency else spec["repeats"]
            distinct = min(repeats, inputs["input_ids"].size(0)) if latency else 1
            windows = [make_batch(inputs, b, start=i * b) for i in range(distinct)]
            first_call[str(b)] = round(time_calls(lambda w=windows: call(w[0]), warmup=0, repeats=1)[0], 3)
            options = {"warmup": max(spec["warmup"] - 1, 0), "repeats": repeats, "min_repeats": spec["min_repeats"]}
            cycle = itertools.cycle(windows)
            yield str(b), lambda c=cycle: call(next(c)), {**options, "max_seconds": spec["max_seconds_per_measurement"]}

    def summary(timed: dict, facts: dict) -> dict:
        batches = {b: summarize(seconds, int(b)) for b, seconds in timed.items()}
        return {"batches": batches, "first_call_seconds": first_call}

    # Engines that trace per shape (IPEX) build the first batch size's graph while loading.
    return make_batch(inputs, spec["batch_sizes"][0]), passes, summary


# --------------------------------------------------------------------------- real questions, end to end


def length_groups(inputs: Mapping[str, Any], multiple: int | None = None) -> list[tuple[list[int], int]]:
    """(rows, width) per call of a qala row: the request's windows sorted by real length and grouped per 32
    tokens (qala.quantize.engines.length_batches), each group cut to its longest window (then padded to
    `multiple`): a request of 32 questions pads each window by fewer than 32 positions, not to its longest."""
    from qala.quantize.engines import length_batches

    lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
    groups = []
    for rows in length_batches(lengths, max_batch=len(lengths)):
        longest = max(lengths[i] for i in rows)
        padded = longest + (-longest % multiple if multiple and multiple > 1 else 0)
        groups.append((rows, min(padded, inputs["input_ids"].size(1))))
    return groups


def grouped(predict: Predictor, multiple: int | None = None, pad_id: int = 0) -> Predictor:
    """`predict` called once per length group (length_groups); the logits come back at the batch's rows and
    positions (positions past a group's width: -1e4, padding, never an answer)."""
    import numpy as np
    import torch

    def run(inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        start, end = (np.full(tuple(inputs["input_ids"].shape), -1e4, dtype=np.float32) for _ in range(2))
        for group, cut in length_groups(inputs, multiple):
            index = torch.tensor(group)
            s, e = predict(pad_to_multiple({k: v[index, :cut] for k, v in inputs.items()}, multiple, pad_id))
            start[group, :cut], end[group, :cut] = s[:, :cut], e[:, :cut]
        return start, end

    return run


def pad_to_multiple(inputs: dict[str, Any], multiple: int | None, pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a batch to a multiple of `multiple` positions (attention_mask 0 on the padding)."""
    import torch.nn.functional as F

    extra = -inputs["input_ids"].size(1) % multiple if multiple and multiple > 1 else 0
    if not extra:
        return inputs
    return {k: F.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0) for k, v in inputs.items()}


def real_token_macs(config: Any, spec: Mapping[str, Any], lengths: Sequence[int]) -> int:
    """MACs of windows at their real lengths under the row's configuration (qala.model.macs_per_sample)."""
    from qala.bench.peers import length_kwargs
    from qala.lengths import kept_per_layer
    from qala.model import macs_per_sample

    length = length_kwargs(spec)
    ratios, absolute = length.get("keep_ratios"), length.get("length_config")
    kept = [kept_per_layer(ratios, n) if ratios else absolute for n in lengths]
    return sum(macs_per_sample(config, k, n) for k, n in zip(kept, lengths, strict=True))


def _answerer(spec: Mapping[str, Any], requests: Sequence[Mapping[str, Any]]) -> tuple[Callable, Callable, dict]:
    """(featurize(request) -> (features, inputs), bind(predict) -> (predict, answer), survey): windows unpadded
    (to the row's pad_to_multiple_of), in length groups for qala rows. The survey is an untimed pass over the
    tokenizer: every call shape, one request's inputs per new call shape (compiled graphs warm on those before
    the clock starts: no request may wait for a compile), every window's real length (the MACs), padding."""
    from transformers import AutoTokenizer

    from qala.data import postprocess_with_scores, prepare_eval_features
    from qala.model import batch_inputs

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    pad_id, multiple, qala = tokenizer.pad_token_id or 0, spec.get("pad_to_multiple_of"), spec["engine"] == "qala"

    def featurize(request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        features = prepare_eval_features(
            request, tokenizer, max_seq_length=spec["max_seq_length"], doc_stride=spec["doc_stride"]
        )
        return features, pad_to_multiple(batch_inputs(features, pad_id=pad_id), multiple, pad_id)

    def bind(predict: Predictor) -> tuple[Predictor, Callable]:
        predict = grouped(predict, multiple, pad_id) if qala else predict
        best = {"n_best_size": spec["n_best_size"], "max_answer_length": spec["max_answer_length"]}

        def answer(request: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
            features, inputs = featurize(request)
            return postprocess_with_scores(request, features, *predict(inputs), **best)

        return predict, answer

    survey: dict[str, Any] = {"shapes": set(), "warm": [], "real_lengths": [], "padded_positions": 0}
    for request in requests:
        features, inputs = featurize(request)
        shape = tuple(inputs["input_ids"].shape)
        calls = tuple((len(rows), cut) for rows, cut in length_groups(inputs, multiple)) if qala else (shape,)
        if not set(calls) <= survey["shapes"]:
            survey["warm"].append(inputs)
            survey["shapes"].update(calls)
        survey["real_lengths"] += [len(ids) for ids in features["input_ids"]]
        survey["padded_positions"] += sum(rows * width for rows, width in calls)
    return featurize, bind, survey


def _questions(spec: Mapping[str, Any]) -> Workload:
    """Real questions, end to end: the first `questions` answered in requests of `batch_size`, one timed pass of
    every request (tokenization, every window unpadded, post-processing); speed, the F1 of those answers, MACs."""
    from transformers import AutoConfig, BertConfig

    from qala.data import load_squad, references_from, squad_metrics
    from qala.utils import environment_info, latency_stats, resolve_model_path

    examples = load_squad(resolve_model_path(spec["data"]), split=spec["data_split"])
    n = min(spec["questions"] or len(examples), len(examples))  # the first N, in file order
    columns = examples.select(range(n)).with_format(None).select_columns(["id", "question", "context", "answers"])[:]
    b, warmup = spec["batch_size"], spec.get("warmup", 1)
    requests = [{k: columns[k][i : i + b] for k in ("id", "question", "context")} for i in range(0, n, b)]
    featurize, bind, survey = _answerer(spec, requests)
    predictions: dict[str, str] = {}

    def passes(predict: Predictor, facts: dict) -> Iterator[Pass]:
        predict, answer = bind(predict)
        for request in requests[:warmup]:
            answer(request)
        for inputs in survey["warm"] if facts.get("warm_every_shape") else []:
            predict(inputs)
        queue = iter(requests)

        def timed() -> None:
            predictions.update({q: text for q, (text, _) in answer(next(queue)).items()})

        yield "requests", timed, {"warmup": 0, "repeats": len(requests)}

    def summary(timed: dict, facts: dict) -> dict:
        seconds, lengths, shapes = timed["requests"], survey["real_lengths"], len(survey["shapes"])
        stats = latency_stats([s / len(r["id"]) for s, r in zip(seconds, requests, strict=True)])
        metrics = squad_metrics(predictions, references_from(columns))
        total, scored = sum(seconds), not spec.get("f1_note")  # f1_note: random weights
        config = BertConfig(**spec["arch"]) if spec.get("arch") else AutoConfig.from_pretrained(spec["path"])
        macs = real_token_macs(config, spec, lengths)
        result = {"questions": n, "requests": len(requests), "windows": len(lengths), "real_tokens": sum(lengths)}
        if spec["engine"] == "qala":
            result["length_groups"] = "windows sorted by length, one call per 32-token group"
        result.update(padded_positions=survey["padded_positions"], shapes=shapes)
        result["untimed_warmup_requests"] = min(warmup, len(requests))
        result["warmed_shapes"] = shapes if facts.get("warm_every_shape") else 0
        result.update({k: round(metrics[k], 2) if scored else None for k in ("f1", "exact_match")})
        result.update({f"ms_{p}": stats[f"{p}_ms"] for p in ("p50", "p90", "p99")})
        result.update(
            questions_per_s=round(n / total, 3), seconds=round(total, 3), gmacs_real_tokens=round(macs / 1e9, 3)
        )
        result["achieved_gmacs_per_s"] = round(macs / total / 1e9, 3)
        return {**result, "python": sys.executable, "worker_versions": environment_info()["versions"]}

    # The example is the request with the most windows: engines that compile per batch size warm up to it.
    return max(survey["warm"], key=lambda inputs: inputs["input_ids"].size(0)), passes, summary


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a
    worker started by a large parent would report the parent's peak; VmHWM belongs to the new address space."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(spec_file: str | Path, out: str | Path) -> int:
    """Measure the row spec in `spec_file` and write its result JSON to `out` (a file or a folder)."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    out = Path(out) / f"worker-{os.getpid()}.json" if Path(out).is_dir() else Path(out)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result: dict[str, Any] = {"id": spec["id"], "threads": torch.get_num_threads(), "pid": os.getpid()}
    started = time.perf_counter()
    if spec["kind"] == "gemm_peak":
        from qala.bench.roofline import gemm_peak

        result.update(gemm_peak(spec.get("threads"), spec.get("gemm_size", 2048)))
    else:
        result.update(measure(spec))
    result["peak_rss_mb"] = peak_rss_mb()
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m qala.bench.worker SPEC.json OUT", file=sys.stderr)
        return 2
    # Quiet: the harness shows a failed worker's last stderr lines as the row's error.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args[0], args[1])


if __name__ == "__main__":
    sys.exit(main())
