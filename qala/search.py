"""Evolutionary search over per-layer sequence lengths: the F1-versus-cost Pareto frontier of one model.

    python -m qala.search RECIPE.yaml [key.sub=value ...] [--install-into MODEL_DIR]
    torchrun --nproc-per-node N -m qala.search RECIPE.yaml ...     # candidates spread over N processes

The search of the Length-Adaptive Transformer (Kim & Cho 2021, `evolution.py`), driven by the recipe's
`search` section. A gene is a length configuration: one kept length per layer, non-increasing, each
between the recipe's lowest configuration (`min_keep_ratio` per layer) and full length. Generation 0
is the two bounds, the constant-keep-ratio configurations, the recipe's `initial_genes` and
`population_size` random genes; every later generation breeds `mutation_size` mutated and
`crossover_size` crossed-over children of the current Pareto frontier. Only accepted children count:
valid, never seen before, and with a cost between the costs of the lowest and the full configuration.
The cost is analytic MACs (`macs_per_sample`) or latency measured here on the deployed backend (fp32,
or the INT8 artifact).

OUTPUT_DIR/generation-N.json   checkpoint after each generation (every evaluated gene, population,
                               RNG state); a rerun resumes from the latest one, if it was written for
                               the same inputs (settings, and by content the model and the questions)
OUTPUT_DIR/evaluations.jsonl   every evaluation as it finishes, so a killed generation is not redone
OUTPUT_DIR/genes.json          every evaluated gene with its cost and F1
OUTPUT_DIR/frontier.json       the Pareto frontier (re-scored on the whole evaluation file when the
                               search scored a subset) and the constant-keep-ratio curve
OUTPUT_DIR/frontier.png        F1 versus cost: frontier, constant keep ratios, every evaluated gene
The frontier is also copied into the searched model directory (search.install_frontier) and into
--install-into, where `qala.answer.QalaModel` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qala.cli import recipe_parser, run_main
from qala.data import load_split, question_subset, windows
from qala.evaluate import evaluate_features
from qala.lengths import constant_ratio_length_config, kept_per_layer
from qala.model import batch_inputs, macs_per_sample
from qala.quantize.load import load_model, load_tokenizer, model_kind
from qala.recipe import DataConfig, Recipe, SearchConfig, fingerprint, load_recipe
from qala.stage import is_main_process, stage_inputs, stage_lock, stored_record, write_recipe
from qala.utils import (
    MANIFEST_NAME,
    atomic_write_json,
    atomic_write_text,
    content_hash,
    environment_info,
    examples_hash,
    latency_stats,
    median_latency_ms,
    resolve_model_path,
    time_calls,
)

logger = logging.getLogger(__name__)

Gene = tuple[int, ...]

FRONTIER_NAME = "frontier.json"
GENES_NAME = "genes.json"
PLOT_NAME = "frontier.png"
EVALUATIONS_NAME = "evaluations.jsonl"
# Ratio-mode genes are per-layer keep ratios in percent: 1 .. 100.
RATIO_GRID = 100


# --------------------------------------------------------------------------- genes and operators


def is_valid_gene(gene: Sequence[int], lower: Sequence[int], seq_length: int) -> bool:
    """Non-increasing, and layer by layer within [lower[i], seq_length]."""
    if len(gene) != len(lower):
        return False
    if any(b > a for a, b in zip(gene, gene[1:], strict=False)):
        return False
    return all(lo <= n <= seq_length for n, lo in zip(gene, lower, strict=True))


def random_gene(lower: Sequence[int], seq_length: int, rng: random.Random) -> Gene:
    """Each layer keeps a uniform draw from [lower[i], what the previous layer kept]."""
    gene, prev = [], seq_length
    for lo in lower:
        prev = rng.randint(lo, prev)
        gene.append(prev)
    return tuple(gene)


def mutate(parent: Sequence[int], lower: Sequence[int], seq_length: int, prob: float, rng: random.Random) -> Gene:
    """With probability `prob` a layer's length is redrawn from [lower[i], the child's previous layer];
    a layer left alone is cut to the previous layer's length where a redraw shortened that one.

    `lower` is non-increasing, so every redraw range is non-empty and the child stays valid.
    """
    child, prev = [], seq_length
    for n, lo in zip(parent, lower, strict=True):
        prev = rng.randint(lo, prev) if rng.random() < prob else min(n, prev)
        child.append(prev)
    return tuple(child)


def crossover(a: Sequence[int], b: Sequence[int], rng: random.Random) -> Gene:
    """Each layer from one parent or the other, then cut to the previous layer's length (repair).

    The repair keeps the child within the parents' bounds: layer i ends up at least
    min(a[i], b[i], child[i-1]) >= lower[i], since lower is non-increasing.
    """
    child, prev = [], None
    for x, y in zip(a, b, strict=True):
        n = x if rng.random() < 0.5 else y
        prev = n if prev is None else min(n, prev)
        child.append(prev)
    return tuple(child)


def pareto_front(points: Mapping[Gene, tuple[float, float]]) -> list[Gene]:
    """The genes no other gene beats, by cost (lower is better) then F1 (higher is better); cheapest first.

    `points` maps gene -> (cost, f1). A gene is dropped when another costs no more and scores at least as
    well; of genes with exactly equal cost and F1, the first in gene order is kept (one point per
    (cost, F1)), so the frontier has strictly increasing cost and strictly increasing F1.
    """
    front: list[Gene] = []
    for gene in sorted(points, key=lambda g: (points[g][0], -points[g][1], g)):
        if not front or points[gene][1] > points[front[-1]][1]:
            front.append(gene)
    return front


def select_parents(points: Mapping[Gene, tuple[float, float]], minimum: int = 2) -> list[Gene]:
    """The Pareto frontier; if it has fewer than `minimum` genes (crossover needs two), the next
    non-dominated layers too."""
    remaining = dict(points)
    parents: list[Gene] = []
    while remaining and len(parents) < minimum:
        layer = pareto_front(remaining)
        parents += layer
        for gene in layer:
            del remaining[gene]
    return parents


def keep_ratios(min_keep_ratio: float, points: int) -> list[float]:
    """`points` keep ratios evenly spaced from 1 down to min_keep_ratio (both included)."""
    return [1 - (1 - min_keep_ratio) * i / (points - 1) for i in range(points)]


# --------------------------------------------------------------------------- cost


def gene_config(gene: Sequence[int], ratio_mode: bool) -> dict[str, list]:
    """The model keyword a gene stands for: keep_ratios (percent genes) or the absolute length_config."""
    if ratio_mode:
        return {"keep_ratios": [n / RATIO_GRID for n in gene]}
    return {"length_config": [int(n) for n in gene]}


def window_latency_cost(
    model: Callable, windows_: Sequence[Mapping[str, torch.Tensor]], *, repeats: int = 5, warmup: int = 2
) -> Callable[[Gene], float]:
    """gene -> mean ms per window of running every sampled real window (batch 1, unpadded) once."""

    def cost(gene: Gene) -> float:
        kwargs = gene_config(gene, True)

        def one_pass() -> None:
            for inputs in windows_:
                model(**inputs, **kwargs)

        with torch.no_grad():
            seconds = time_calls(one_pass, warmup=warmup, repeats=repeats)
        return latency_stats(seconds)["median_ms"] / len(windows_)

    return cost


def latency_cost(
    model: Callable, inputs: Mapping[str, torch.Tensor], *, repeats: int = 5, warmup: int = 2
) -> Callable[[Gene], float]:
    """gene -> median milliseconds of `model(**inputs, length_config=gene)` on this machine."""

    def cost(gene: Gene) -> float:
        with torch.no_grad():
            timing = median_latency_ms(
                lambda: model(**inputs, length_config=list(gene)), warmup=warmup, repeats=repeats
            )
        return timing["median_ms"]

    return cost


# --------------------------------------------------------------------------- the search loop


@dataclass
class SearchState:
    """Everything a generation checkpoint holds."""

    generation: int
    bounds: tuple[float, float]  # cost of the lowest and of the full configuration
    genes: dict[Gene, dict[str, Any]] = field(default_factory=dict)  # every evaluated gene, in order
    population: list[Gene] = field(default_factory=list)  # the Pareto frontier after this generation
    history: list[dict[str, Any]] = field(default_factory=list)  # per generation: accepted, attempts
    rng_state: Any = None

    def points(self) -> dict[Gene, tuple[float, float]]:
        """(cost, F1) of the genes within the cost bounds."""
        return {g: (r["cost"], r["f1"]) for g, r in self.genes.items() if r["status"] == "ok"}

    def to_json(self, fingerprint: str) -> dict[str, Any]:
        version, internal, gauss = self.rng_state
        return {
            "generation": self.generation,
            "fingerprint": fingerprint,
            "bounds": list(self.bounds),
            "population": [list(g) for g in self.population],
            "history": self.history,
            "genes": list(self.genes.values()),
            "rng_state": [version, list(internal), gauss],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SearchState:
        version, internal, gauss = data["rng_state"]
        return cls(
            generation=data["generation"],
            bounds=tuple(data["bounds"]),
            genes={tuple(r["gene"]): dict(r) for r in data["genes"]},
            population=[tuple(g) for g in data["population"]],
            history=list(data["history"]),
            rng_state=(version, tuple(internal), gauss),
        )


def _distributed() -> tuple[int, int] | None:
    """(rank, world size) under torchrun with an initialised process group, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


class GeneEvaluator:
    """Scores genes once each: cost first, F1 only within the bounds; sharded over ranks when distributed.

    Every result is appended to evaluations.jsonl as it finishes (rank 0), and a rerun reads it back,
    so genes evaluated in a generation that was killed are not evaluated again. Only lines written
    under the same `fingerprint` are reused: a changed setup (data, subset, backend) scores afresh.
    """

    def __init__(
        self,
        cost_fn: Callable[[Gene], float],
        f1_fn: Callable[[Gene], float],
        journal: Path | None,
        fingerprint: str = "",
    ) -> None:
        self.cost_fn, self.f1_fn = cost_fn, f1_fn
        self.journal = journal
        self.fingerprint = fingerprint
        self.cache: dict[Gene, dict[str, Any]] = {}
        if journal is not None and journal.is_file():
            for line in journal.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half-written last line of a killed run
                if record.pop("fingerprint", None) == fingerprint:
                    self.cache.setdefault(tuple(record["gene"]), {}).update(record)
        self.is_writer = is_main_process()

    def _write(self, record: dict[str, Any]) -> None:
        self.cache.setdefault(tuple(record["gene"]), {}).update(record)
        if self.journal is not None and self.is_writer:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as f:
                f.write(json.dumps({**record, "fingerprint": self.fingerprint}) + "\n")

    def _one(self, gene: Gene, bounds: tuple[float, float] | None) -> dict[str, Any]:
        cached = self.cache.get(gene, {})
        cost = cached["cost"] if "cost" in cached else float(self.cost_fn(gene))
        # Latency is noisy: a gene can time outside the bounds even though its lengths are inside.
        if bounds is not None and not bounds[0] <= cost <= bounds[1]:
            return {"gene": list(gene), "cost": cost, "f1": None, "status": "out_of_bounds"}
        f1 = cached["f1"] if cached.get("f1") is not None else float(self.f1_fn(gene))
        return {"gene": list(gene), "cost": cost, "f1": f1, "status": "ok"}

    def __call__(self, genes: Sequence[Gene], bounds: tuple[float, float] | None) -> list[dict[str, Any]]:
        dist = _distributed()
        if dist is None:
            results = []
            for gene in genes:
                record = self._one(gene, bounds)
                self._write(record)
                results.append(record)
            return results
        rank, world = dist
        mine = [(i, self._one(gene, bounds)) for i, gene in enumerate(genes) if i % world == rank]
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        by_index = dict(item for part in gathered for item in part)
        results = [by_index[i] for i in range(len(genes))]
        for record in results:
            self._write(record)
        return results

    def f1_full(self, genes: Sequence[Gene], f1_full_fn: Callable[[Gene], float]) -> dict[Gene, float]:
        """F1 on the whole evaluation file (the final re-scoring), cached like the rest."""
        todo = [g for g in genes if self.cache.get(g, {}).get("f1_full") is None]
        dist = _distributed()
        if dist is None:
            for gene in todo:
                self._write({"gene": list(gene), "f1_full": float(f1_full_fn(gene))})
        else:
            rank, world = dist
            mine = [(g, float(f1_full_fn(g))) for i, g in enumerate(todo) if i % world == rank]
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
            for gene, score in (item for part in gathered for item in part):
                self._write({"gene": list(gene), "f1_full": score})
        return {g: self.cache[g]["f1_full"] for g in genes}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    paths = sorted(Path(output_dir).glob("generation-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return paths[-1] if paths else None


def evolve(
    cost_fn: Callable[[Gene], float],
    f1_fn: Callable[[Gene], float],
    *,
    num_layers: int,
    seq_length: int,
    config: SearchConfig,
    seed: int,
    output_dir: str | Path | None = None,
    fingerprint: str = "",
    inputs: Mapping[str, Any] | None = None,
) -> tuple[SearchState, GeneEvaluator]:
    """Run (or resume) the evolutionary search; returns the final state and the evaluator (its cache).

    `cost_fn(gene)` and `f1_fn(gene)` are called at most once per gene over the whole search, resumes
    included. With `output_dir`, generation-N.json is written after every generation and the search
    resumes from the latest one when it was written under the same `fingerprint` (of `inputs`, recorded
    in it to say what changed); otherwise the search starts again from generation 0.
    """
    lower = tuple(constant_ratio_length_config(config.min_keep_ratio, num_layers, seq_length))
    full = (seq_length,) * num_layers
    initial = initial_genes(config, lower, seq_length)  # a bad one is refused before anything is scored
    out = Path(output_dir) if output_dir is not None else None
    evaluator = GeneEvaluator(cost_fn, f1_fn, out / EVALUATIONS_NAME if out is not None else None, fingerprint)
    is_writer = evaluator.is_writer
    rng = random.Random(seed)

    last = latest_checkpoint(out) if out is not None else None
    data, why = stored_record(last, inputs, fingerprint=fingerprint)
    if why is not None:
        # Its genes were scored on another model, data or setup: resuming would mix them into this frontier.
        logger.info("%s was written for other inputs (%s): starting the search again", last, why)
        if is_writer:
            for stale in out.glob("generation-*.json"):
                stale.unlink()
    if data is not None:
        state = SearchState.from_json(data)
        if any(len(g) != num_layers or max(g) > seq_length for g in state.genes):
            raise ValueError(
                f"{last}: its genes do not fit a {num_layers}-layer model at {seq_length} tokens; "
                f"use another search.output_dir or delete {out}/generation-*.json"
            )
        rng.setstate(state.rng_state)
        logger.info("resuming after generation %d (%s)", state.generation, last)
    else:
        state = _generation_zero(evaluator, lower, full, initial, seq_length, config, rng)
        _checkpoint(state, rng, out, fingerprint, is_writer, inputs)

    while state.generation < config.iterations:
        state.generation += 1
        _breed(state, evaluator, lower, seq_length, config, rng)
        _checkpoint(state, rng, out, fingerprint, is_writer, inputs)
    return state, evaluator


def _checkpoint(
    state: SearchState,
    rng: random.Random,
    out: Path | None,
    fingerprint: str,
    is_writer: bool,
    inputs: Mapping[str, Any] | None = None,
) -> None:
    state.population = pareto_front(state.points())
    state.rng_state = rng.getstate()
    best = max((state.genes[g]["f1"] for g in state.population), default=float("nan"))
    logger.info(
        "generation %d: %d genes evaluated, frontier of %d, best F1 %.2f",
        state.generation,
        len(state.genes),
        len(state.population),
        best,
    )
    if out is not None and is_writer:
        document = {**state.to_json(fingerprint), **({"inputs": inputs} if inputs else {})}
        atomic_write_json(out / f"generation-{state.generation}.json", document)


def _add(state: SearchState, records: Iterable[dict[str, Any]], origins: Iterable[dict[str, Any]]) -> int:
    """Store evaluated genes with where they came from; returns how many are within the bounds."""
    accepted = 0
    for record, origin in zip(records, origins, strict=True):
        state.genes[tuple(record["gene"])] = {**record, "generation": state.generation, **origin}
        accepted += record["status"] == "ok"
    return accepted


def _generation_zero(
    evaluator: GeneEvaluator,
    lower: Gene,
    full: Gene,
    initial: Sequence[Gene],
    seq_length: int,
    config: SearchConfig,
    rng: random.Random,
) -> SearchState:
    num_layers = len(lower)
    # The bounds first: their costs are the cost bounds every other gene must respect.
    bound_genes = list(dict.fromkeys([lower, full]))
    records = evaluator(bound_genes, None)
    costs = [r["cost"] for r in records]
    state = SearchState(generation=0, bounds=(min(costs), max(costs)))
    _add(state, records, [{"origin": "bound"}] * len(records))

    ratio_genes = [
        tuple(constant_ratio_length_config(r, num_layers, seq_length))
        for r in keep_ratios(config.min_keep_ratio, config.baseline_points)
    ]
    ratio_genes = [g for g in dict.fromkeys(ratio_genes) if g not in state.genes]
    _add(state, evaluator(ratio_genes, state.bounds), [{"origin": "keep_ratio"}] * len(ratio_genes))
    given = [g for g in dict.fromkeys(initial) if g not in state.genes]
    _add(state, evaluator(given, state.bounds), [{"origin": "initial"}] * len(given))

    accepted, attempts = 0, 0
    cap = config.max_attempts_factor * max(config.population_size, 1)
    while accepted < config.population_size and attempts < cap:
        batch: list[Gene] = []
        while len(batch) < config.population_size - accepted and attempts < cap:
            attempts += 1
            gene = random_gene(lower, seq_length, rng)
            if gene not in state.genes and gene not in batch:
                batch.append(gene)
        accepted += _add(state, evaluator(batch, state.bounds), [{"origin": "random"}] * len(batch))
    if accepted < config.population_size:
        logger.warning(
            "generation 0: only %d of %d random genes accepted after %d proposals (search space too small?)",
            accepted,
            config.population_size,
            attempts,
        )
    state.history.append({"generation": 0, "random": accepted, "proposals": attempts})
    return state


def initial_genes(config: SearchConfig, lower: Gene, seq_length: int) -> list[Gene]:
    """search.initial_genes as genes: each keep ratio of the grid rounded up to a whole step, as
    constant_ratio_length_config rounds; one outside the search space raises ValueError naming it."""
    genes = []
    for i, ratios in enumerate(config.initial_genes):
        gene = tuple(max(1, math.ceil(r * seq_length - 1e-9)) for r in ratios)
        if not is_valid_gene(gene, lower, seq_length):
            floor = [round(n / seq_length, 4) for n in lower]
            raise ValueError(
                f"search.initial_genes[{i}]: {list(ratios)} is not a {len(lower)}-layer configuration at or above "
                f"the min_keep_ratio floor {floor}"
            )
        genes.append(gene)
    return genes


def _breed(
    state: SearchState,
    evaluator: GeneEvaluator,
    lower: Gene,
    seq_length: int,
    config: SearchConfig,
    rng: random.Random,
) -> None:
    """One generation: children of the current frontier until mutation_size and crossover_size are
    accepted (or the proposal cap is reached). Proposals go in rounds so that each round can be
    evaluated in parallel; a round's out-of-bounds children are replaced in the next round."""
    parents = select_parents(state.points())
    wanted = {"mutation": config.mutation_size, "crossover": config.crossover_size if len(parents) >= 2 else 0}
    if config.crossover_size and len(parents) < 2:
        logger.warning("generation %d: fewer than two parents, no crossover", state.generation)
    accepted = dict.fromkeys(wanted, 0)
    attempts, cap = 0, config.max_attempts_factor * max(sum(wanted.values()), 1)
    while any(accepted[k] < wanted[k] for k in wanted) and attempts < cap:
        batch: list[Gene] = []
        origins: list[dict[str, Any]] = []
        for kind in wanted:
            need = wanted[kind] - accepted[kind]
            while need > 0 and attempts < cap:
                attempts += 1
                if kind == "mutation":
                    chosen = [rng.choice(parents)]
                    child = mutate(chosen[0], lower, seq_length, config.mutation_prob, rng)
                else:
                    chosen = rng.sample(parents, 2)
                    child = crossover(chosen[0], chosen[1], rng)
                if child in state.genes or child in batch:
                    continue
                batch.append(child)
                origins.append({"origin": kind, "parents": [list(p) for p in chosen]})
                need -= 1
        if not batch:
            break
        records = evaluator(batch, state.bounds)
        for record, origin in zip(records, origins, strict=True):
            accepted[origin["origin"]] += record["status"] == "ok"
        _add(state, records, origins)
    if any(accepted[k] < wanted[k] for k in wanted):
        logger.warning(
            "generation %d: accepted %s of %s children after %d proposals",
            state.generation,
            accepted,
            wanted,
            attempts,
        )
    state.history.append({"generation": state.generation, **accepted, "proposals": attempts})


# --------------------------------------------------------------------------- the recipe-driven run


def load_search_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Recipe, SearchConfig]:
    """The recipe and its `search` section; raises RecipeError listing every problem."""
    recipe = load_recipe(path, list(overrides))
    return recipe, recipe.search


def search_inputs(recipe: Recipe, search: SearchConfig, *, model: str, eval_data: str) -> dict[str, Any]:
    """What a checkpoint's genes depend on: the search and scoring settings (not `iterations`: a finished
    search may be extended), and by content the searched model (`model`) and questions (`eval_data`)."""
    settings = dataclasses.asdict(search)
    for key in ("iterations", "output_dir", "install_frontier", "latency_repeats", "latency_warmup", "seed"):
        settings.pop(key)
    return stage_inputs(
        {
            "search": settings,
            "seed": search.seed if search.seed is not None else recipe.run.seed,
            "data": dataclasses.asdict(recipe.data),
            "eval": recipe.eval.evaluate_kwargs(),
            "model": model,
            "eval_data": eval_data,
        }
    )


def load_backend(model_dir: str | Path, backend: str) -> tuple[Any, Callable]:
    """(model to score, callable to time) for an fp32 directory or an INT8 artifact.

    INT8 is scored eagerly and timed through qala.quantize.CompiledQA (the deployed path); fp32 is
    scored and timed eagerly.
    """
    kind = model_kind(model_dir)
    if kind != backend:
        hint = "point search.model at qala.tune's OUTPUT_DIR/model, or set search.backend=fp32"
        if kind == "int8":
            hint = "set search.backend=int8, or point search.model at an fp32 model"
        raise FileNotFoundError(f"{model_dir} is an {kind} model directory, not {backend}: {hint}")
    compiled = load_model(model_dir, compiled=backend == "int8")
    return getattr(compiled, "model", compiled), compiled


def backbone_config(model: Any, model_dir: str | Path) -> Any:
    """The transformers config (layers, hidden size...) of a loaded model, or read from its directory."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        return config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def run(recipe: Recipe, search: SearchConfig, *, install_into: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The recipe's search end to end; returns the frontier document (also written as frontier.json)."""
    check_install_targets(search.model, install_into)  # before the lock and the search, not after them
    with stage_lock(search.output_dir):  # rank 0 alone writes there
        return _run(recipe, search, install_into=install_into)


def _run(recipe: Recipe, search: SearchConfig, *, install_into: Sequence[str | Path]) -> dict[str, Any]:
    started = time.perf_counter()
    writer = is_main_process()
    out = Path(search.output_dir)
    if search.latency_threads:
        torch.set_num_threads(search.latency_threads)
    d, e = recipe.data, recipe.eval
    seed = search.seed if search.seed is not None else recipe.run.seed
    model_dir = Path(resolve_model_path(search.model))
    if not model_dir.is_dir():
        raise FileNotFoundError(f"search.model: directory not found: {search.model}")
    model, timed = load_backend(model_dir, search.backend)
    tokenizer = load_tokenizer(model_dir)
    config = backbone_config(model, model_dir)
    num_layers, seq_length = config.num_hidden_layers, d.max_seq_length
    ratio_mode = d.length_units == "ratio"
    # Genes are ints either way: percent of the real length (ratio mode) or padded positions.
    grid = RATIO_GRID if ratio_mode else seq_length

    examples = load_split(d, "eval")
    features = windows(examples, tokenizer, d, train=False, padded=not ratio_mode)
    sub_examples, sub_features = question_subset(examples, features, search.eval_samples, seed)
    sample_inputs = _cost_windows(features, search.latency_windows, seed)
    sample_lengths = [int(x["input_ids"].size(1)) for x in sample_inputs]
    if writer:
        write_recipe(out, dataclasses.replace(recipe, search=search))

    def score(gene: Gene, examples_, features_) -> float:
        config_ = gene_config(gene, ratio_mode)
        metrics, _ = evaluate_features(model, examples_, features_, **config_, **e.evaluate_kwargs(), progress=False)
        return metrics["f1"]

    def macs_of(gene: Gene) -> float:
        if not ratio_mode:
            return float(macs_per_sample(config, gene, seq_length))
        ratios = gene_config(gene, True)["keep_ratios"]
        return sum(macs_per_sample(config, kept_per_layer(ratios, n), n) for n in sample_lengths) / len(sample_lengths)

    inputs = search_inputs(recipe, search, model=content_hash(model_dir), eval_data=examples_hash(examples))
    search_key = fingerprint(inputs)
    state, evaluator = evolve(
        _cost_function(search, timed, features, sample_inputs, macs_of, ratio_mode),
        lambda g: score(g, sub_examples, sub_features),
        num_layers=num_layers,
        seq_length=grid,
        config=search,
        seed=seed,
        output_dir=out,
        fingerprint=search_key,
        inputs=inputs,
    )
    subset = sub_examples is not examples
    frontier, curve = _frontier_rows(
        state, evaluator, search, num_layers, grid, ratio_mode, subset, lambda g: score(g, examples, features), macs_of
    )
    questions = {"questions": len(examples), "search_questions": len(sub_examples)}
    document = {
        **_frontier_settings(search, d, num_layers, grid, ratio_mode, sample_lengths, state.bounds, questions),
        "frontier": frontier,
        "keep_ratio_curve": curve,
        "search": {
            "generations": state.generation,
            "evaluated": len(state.genes),
            "within_bounds": len(state.points()),
            "subset_frontier": len(state.population),
            "history": state.history,
            "seed": seed,
            "fingerprint": search_key,
            "inputs": inputs,
            "wall_seconds_this_run": round(time.perf_counter() - started, 1),
        },
        "environment": environment_info(),
    }
    if writer:
        targets = [*([model_dir] if search.install_frontier else []), *map(Path, install_into)]
        _write_frontier(out, document, list(state.genes.values()), targets)
    return document


def _write_frontier(out: Path, document: dict[str, Any], genes: list[dict[str, Any]], targets: list[Path]) -> None:
    """genes.json, frontier.json and its plot in the output folder; the frontier also into each of `targets`."""
    atomic_write_json(out / GENES_NAME, {"objective": document["objective"], "genes": genes})
    atomic_write_json(out / FRONTIER_NAME, document)
    plot_frontier(document, genes, out / PLOT_NAME)
    for target in dict.fromkeys(targets):
        install_frontier(out / FRONTIER_NAME, target)


def _cost_windows(features: Any, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The fixed seeded sample of `count` real windows, each a batch of one, that ratio-mode costs are
    measured (or counted) on."""
    sample = random.Random(seed).sample(range(len(features)), min(count, len(features)))
    return [batch_inputs(features.select([i])[:]) for i in sample]


def _cost_function(
    search: SearchConfig,
    timed: Callable,
    features: Any,
    sample_inputs: Sequence[Mapping[str, torch.Tensor]],
    macs_of: Callable[[Gene], float],
    ratio_mode: bool,
) -> Callable[[Gene], float]:
    """What a gene costs: its MACs, or the deployed backend's latency on the sampled real windows (ratio
    mode) or on one padded batch of `latency_batch_size` windows (absolute mode)."""
    if search.objective == "macs":
        return macs_of
    if ratio_mode:
        return window_latency_cost(timed, sample_inputs, repeats=search.latency_repeats, warmup=search.latency_warmup)
    inputs = batch_inputs(features[: search.latency_batch_size])
    repeat = math.ceil(search.latency_batch_size / inputs["input_ids"].size(0))
    inputs = {k: v.repeat(repeat, 1)[: search.latency_batch_size] for k, v in inputs.items()}
    return latency_cost(timed, inputs, repeats=search.latency_repeats, warmup=search.latency_warmup)


def _frontier_rows(
    state: SearchState,
    evaluator: GeneEvaluator,
    search: SearchConfig,
    num_layers: int,
    grid: int,
    ratio_mode: bool,
    subset: bool,
    whole_file_f1: Callable[[Gene], float],
    macs_of: Callable[[Gene], float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The final frontier and the constant-keep-ratio curve, both with F1 on the whole evaluation file
    (re-scored where the search scored a subset of it)."""
    ratio_genes = {
        r: tuple(constant_ratio_length_config(r, num_layers, grid))
        for r in keep_ratios(search.min_keep_ratio, search.baseline_points)
    }
    ratio_genes = {r: g for r, g in ratio_genes.items() if g in state.genes}
    to_rescore = list(dict.fromkeys([*state.population, *ratio_genes.values()]))
    # Out-of-bounds keep-ratio genes have no F1 yet; the curve needs one.
    full_f1 = {g: state.genes[g]["f1"] for g in to_rescore if not subset and state.genes[g]["f1"] is not None}
    full_f1.update(evaluator.f1_full([g for g in to_rescore if g not in full_f1], whole_file_f1))
    final = pareto_front({g: (state.genes[g]["cost"], full_f1[g]) for g in state.population})

    def entry(gene: Gene) -> dict[str, Any]:
        record = state.genes[gene]
        row = {**gene_config(gene, ratio_mode), "cost": record["cost"], "f1": full_f1[gene]}
        if subset:
            row["f1_subset"] = record["f1"]
        row["macs"] = round(macs_of(gene))
        if search.objective == "latency":
            row["latency_ms"] = record["cost"]
        return row

    return [entry(g) for g in final], [{"keep_ratio": round(r, 4), **entry(g)} for r, g in ratio_genes.items()]


def _frontier_settings(
    search: SearchConfig,
    data: DataConfig,
    num_layers: int,
    grid: int,
    ratio_mode: bool,
    sample_lengths: Sequence[int],
    bounds: tuple[float, float],
    questions: dict[str, int],
) -> dict[str, Any]:
    """The head of frontier.json: what was searched, in which unit, the cost bounds, on which questions,
    and how latency was timed."""
    lower = constant_ratio_length_config(search.min_keep_ratio, num_layers, grid)
    return {
        "objective": search.objective,
        "cost_unit": "ms" if search.objective == "latency" else "MACs",
        "backend": search.backend,
        "model": str(search.model),
        "length_mode": data.length_units,
        "max_seq_length": data.max_seq_length,
        "doc_stride": data.doc_stride,
        # Ratio mode: costs are per real window, averaged over this many sampled dev windows.
        "cost_windows": {
            "count": len(sample_lengths),
            "mean_tokens": round(sum(sample_lengths) / len(sample_lengths), 1),
        }
        if ratio_mode
        else None,
        "num_layers": num_layers,
        "min_keep_ratio": search.min_keep_ratio,
        "lower_bound": gene_config(lower, ratio_mode),
        "cost_bounds": list(bounds),
        "eval": {"data": data.eval, **questions},
        "latency": {
            "batch_size": search.latency_batch_size,
            "threads": torch.get_num_threads(),
            "repeats": search.latency_repeats,
        }
        if search.objective == "latency"
        else None,
    }


def read_frontier(path: str | Path) -> dict[str, Any]:
    """A frontier.json that run() wrote: "frontier" (points with "length_config" (absolute) or "keep_ratios"
    (relative), "cost", "f1", "macs"), "keep_ratio_curve", "backend", "objective", "max_seq_length" and the
    run's settings. Readers (qala.bench, qala.answer) call this rather than opening the file themselves.

    Validated, since a served configuration that is wrong would give silently wrong answers: max_seq_length
    (positive int), doc_stride if present, and each point's one configuration (keep_ratios in (0, 1] or
    length_config in [1, max_seq_length], non-increasing layer to layer, the same number of layers in all), f1 and
    cost numbers. A problem raises ValueError naming the file and the point index and field."""
    from qala.lengths import check_keep_ratios, check_length_config

    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(document, dict) or not isinstance(document.get("frontier"), list):
        raise ValueError(f"{path} is not a frontier.json of qala.search: no 'frontier' list")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    seq_length = document.get("max_seq_length")
    if not integer(seq_length, 1):
        raise ValueError(f"{path}: 'max_seq_length' must be a positive integer (the window length), got {seq_length!r}")
    stride = document.get("doc_stride", 0)
    if not (integer(stride, 0) and stride < seq_length):
        raise ValueError(f"{path}: 'doc_stride' must be an integer in [0, max_seq_length={seq_length}), got {stride!r}")
    num_layers = document.get("num_layers")
    if num_layers is not None and not integer(num_layers, 1):
        raise ValueError(f"{path}: 'num_layers' must be a positive integer, got {num_layers!r}")
    for i, point in enumerate(document["frontier"]):
        where = f"{path}: frontier[{i}]"
        if not isinstance(point, dict):
            raise ValueError(f"{where} must be an object, got {type(point).__name__}")
        given = [key for key in ("keep_ratios", "length_config") if point.get(key) is not None]
        if len(given) != 1:
            raise ValueError(f"{where} must have one of 'keep_ratios' and 'length_config', got {given or 'neither'}")
        key, values = given[0], point[given[0]]
        if not isinstance(values, list) or not values or not all(number(v) for v in values):
            raise ValueError(f"{where}.{key} must be a non-empty list of numbers, got {values!r}")
        if key == "length_config" and not all(isinstance(v, int) for v in values):
            raise ValueError(f"{where}.length_config must be integers, got {values!r}")
        if num_layers is not None and len(values) != num_layers:
            raise ValueError(f"{where}.{key} has {len(values)} entries, expected {num_layers} (one per layer)")
        num_layers = len(values)
        try:
            if key == "keep_ratios":
                check_keep_ratios(values)
            else:
                check_length_config(values, max_seq_length=seq_length)
        except ValueError as e:
            raise ValueError(f"{where}.{key}: {e}") from None
        for field_name in ("f1", "cost"):
            if not number(point.get(field_name)):
                raise ValueError(f"{where}.{field_name} must be a number, got {point.get(field_name)!r}")
    return document


def check_install_targets(model: str | None, install_into: Sequence[str | Path]) -> None:
    """Raise naming the first --install-into folder that is no directory, or that holds a model (config.json or
    a manifest) other than the searched `model` by content, as qala.answer compares them: it would refuse that
    frontier. Checked before the search: a bad target used to fail, or be written, only after the whole search."""
    if not install_into:
        return
    for target in install_into:
        if not Path(target).is_dir():
            raise FileNotFoundError(
                f"--install-into {target}: not a directory; expected a model directory to copy frontier.json into"
            )
    model_dir = Path(resolve_model_path(str(model))) if model else None
    if model_dir is None or not model_dir.is_dir():
        return  # the search itself names search.model
    searched = content_hash(model_dir)
    for target in install_into:
        holds_a_model = any((Path(target) / name).is_file() for name in ("config.json", MANIFEST_NAME))
        if holds_a_model and content_hash(target) != searched:
            raise ValueError(
                f"--install-into {target}: holds another model than search.model {model} (content "
                f"{content_hash(target)}, searched {searched}); qala.answer refuses a frontier searched on other "
                "weights: install it only into copies of the searched model"
            )


def install_frontier(frontier_file: str | Path, model_dir: str | Path) -> Path:
    """Copy frontier.json into a model directory (qala.answer reads it there)."""
    target = Path(model_dir) / FRONTIER_NAME
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"cannot install the frontier: {model_dir} is not a directory")
    atomic_write_text(target, Path(frontier_file).read_text())
    # Latencies measured for the previous frontier's configurations are re-measured on first load.
    logger.info("installed %s into %s", frontier_file, model_dir)
    return target


def plot_frontier(document: Mapping[str, Any], genes: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """F1 versus cost: every evaluated gene, the frontier and the constant-keep-ratio curve of the same model."""
    # matplotlib's object API: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, unit = (1e-9, "GMACs per window") if document["cost_unit"] == "MACs" else (1.0, "ms (measured)")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = [g for g in genes if g.get("status") == "ok"]
    subset = document["eval"]["search_questions"] < document["eval"]["questions"]
    ax.scatter(
        [g["cost"] * scale for g in ok],
        [g["f1"] for g in ok],
        s=8,
        color="0.7",
        label=f"evaluated genes ({len(ok)}{', subset F1' if subset else ''})",
    )
    curve = document["keep_ratio_curve"]
    ax.plot(
        [p["cost"] * scale for p in curve],
        [p["f1"] for p in curve],
        "s--",
        color="tab:orange",
        label="constant keep ratio",
    )
    for p in curve:
        ax.annotate(
            f"{p['keep_ratio']:g}", (p["cost"] * scale, p["f1"]), fontsize=7, xytext=(3, -9), textcoords="offset points"
        )
    front = document["frontier"]
    ax.plot(
        [p["cost"] * scale for p in front], [p["f1"] for p in front], "o-", color="tab:blue", label="Pareto frontier"
    )
    ax.set_xlabel(f"{document['objective']}: {unit}")
    ax.set_ylabel("F1" + (" (whole evaluation file)" if subset else ""))
    name = "/".join(Path(document["model"]).parts[-2:])
    ax.set_title(f"{name}: {document['backend']}, {document['max_seq_length']} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m qala.search", __doc__, "YAML recipe with a search section, e.g. recipes/squad_search.yaml"
    )
    parser.add_argument(
        "--install-into",
        action="append",
        default=[],
        metavar="MODEL_DIR",
        help="also copy frontier.json here: a copy of search.model (another model is refused before the search)",
    )
    return run_main(parser, argv, _main)


def _main(args, recipe: Recipe) -> int:
    search = recipe.search
    started_group = False
    try:
        # torchrun sets WORLD_SIZE but leaves the process group to the script; gloo works on CPU hosts.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="gloo")
            started_group = True
        is_main = is_main_process()
        document = run(recipe, search, install_into=args.install_into)
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    if is_main:
        unit = document["cost_unit"]
        print(f"Pareto frontier ({document['objective']}, {document['backend']}):")
        for row in document["frontier"]:
            cost = f"{row['cost']:.2f} ms" if unit == "ms" else f"{row['cost'] / 1e9:.3f} GMACs"
            print(f"  F1 {row['f1']:6.2f}  {cost:>14}  {row.get('keep_ratios') or row.get('length_config')}")
        print(f"wrote {Path(search.output_dir) / FRONTIER_NAME}, {GENES_NAME}, {PLOT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
