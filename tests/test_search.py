"""The evolutionary length search: genetic operators, Pareto extraction, MACs, accepted counts, resume,
distributed sharding, and the recipe-driven search on a tiny model."""

import dataclasses
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, BertConfig

import qala.search as qs
from qala.lengths import constant_ratio_length_config
from qala.model import LengthAdaptiveForQuestionAnswering, macs_per_sample
from qala.recipe import RecipeError
from qala.search import (
    SearchConfig,
    crossover,
    evolve,
    is_valid_gene,
    load_search_recipe,
    mutate,
    pareto_front,
    random_gene,
    select_parents,
)
from qala.utils import content_hash
from tests.conftest import REPO, build_tiny_qa_checkpoint

# ----------------------------------------------------------------------------- genetic operators


@pytest.mark.parametrize("layers,seq,ratio", [(6, 384, 0.8), (2, 64, 0.5), (12, 128, 0.3), (3, 5, 0.9)])
def test_random_mutated_and_crossed_genes_are_valid(layers, seq, ratio):
    rng = random.Random(0)
    lower = constant_ratio_length_config(ratio, layers, seq)
    parents = [random_gene(lower, seq, rng) for _ in range(50)] + [tuple(lower), (seq,) * layers]
    for parent in parents:
        assert is_valid_gene(parent, lower, seq), parent
    for _ in range(500):
        for prob in (0.0, 0.3, 1.0):
            child = mutate(rng.choice(parents), lower, seq, prob, rng)
            assert is_valid_gene(child, lower, seq), child
        child = crossover(*rng.sample(parents, 2), rng)
        assert is_valid_gene(child, lower, seq), child


def test_operators_edge_cases():
    rng = random.Random(1)
    lower = (3, 2, 1)
    assert mutate((5, 4, 3), lower, 6, 0.0, rng) == (5, 4, 3)  # nothing redrawn: the parent
    # The repair cuts a later layer that a shortened earlier one would otherwise undercut.
    assert crossover((6, 6, 6), (3, 2, 1), random.Random(0)) in {
        (6, 6, 6),
        (3, 2, 1),
        *[(a, min(b, a), min(c, b, a)) for a in (6, 3) for b in (6, 2) for c in (6, 1)],
    }
    for _ in range(200):
        child = crossover((6, 6, 6), (3, 2, 1), rng)
        assert all(b <= a for a, b in zip(child, child[1:], strict=False))
    assert not is_valid_gene((5, 6, 1), lower, 6)  # increasing
    assert not is_valid_gene((5, 1, 1), lower, 6)  # below the lower bound
    assert not is_valid_gene((7, 2, 1), lower, 6)  # above full length
    assert not is_valid_gene((5, 2), lower, 6)  # wrong number of layers


# ----------------------------------------------------------------------------- Pareto extraction


def test_pareto_front_with_ties_and_dominated_points():
    points = {
        (1,): (10.0, 50.0),
        (2,): (10.0, 60.0),  # same cost, better: beats (1,)
        (3,): (12.0, 60.0),  # costs more, no better: dominated by (2,)
        (4,): (15.0, 70.0),
        (5,): (15.0, 70.0),  # exact tie with (4,): one point per (cost, F1), the first gene kept
        (6,): (20.0, 65.0),  # dominated by (4,)
        (7,): (25.0, 80.0),
        (8,): (5.0, 10.0),  # cheapest: always on the front
    }
    assert pareto_front(points) == [(8,), (2,), (4,), (7,)]
    assert pareto_front({}) == []
    assert pareto_front({(1,): (1.0, 1.0)}) == [(1,)]


def test_parents_fall_back_to_the_next_layer_when_the_front_is_one_gene():
    points = {(1,): (1.0, 90.0), (2,): (2.0, 80.0), (3,): (3.0, 85.0), (4,): (4.0, 10.0)}
    assert pareto_front(points) == [(1,)]
    assert select_parents(points) == [(1,), (2,), (3,)]  # second layer: (2,) and (3,) beat (4,)


# ----------------------------------------------------------------------------- MACs


def test_macs_hand_count():
    config = BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    # Layer 0: 8 tokens in, 6 kept.  QKVO 4*8*32*32 = 32768; scores+sum 2*8*8*32 = 4096;
    #          selection 4*8*8 = 256; FFN on kept 2*6*32*64 = 24576                        -> 61696
    # Layer 1: 6 in, 3 kept.       4*6*32*32 = 24576; 2*6*6*32 = 2304; 4*6*6 = 144; 2*3*32*64 = 12288 -> 39312
    # Span head on all 8 restored positions: 8*32*2 = 512
    assert macs_per_sample(config, [6, 3], 8) == 61696 + 39312 + 512
    # Full length: no selection cost, FFN on all tokens.
    full = 2 * (4 * 8 * 32 * 32 + 2 * 8 * 8 * 32 + 2 * 8 * 32 * 64) + 512
    assert macs_per_sample(config, None, 8) == full
    assert macs_per_sample(config, [8, 8], 8) == full
    assert macs_per_sample(config, [9, 9], 8) == full  # a length above what is left keeps everything
    with pytest.raises(ValueError, match="2 layers"):
        macs_per_sample(config, [6], 8)


def test_macs_are_monotone_in_every_layer():
    config = BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=6)
    rng = random.Random(0)
    lower = constant_ratio_length_config(0.5, 6, 384)
    for _ in range(200):
        gene = list(random_gene(lower, 384, rng))
        i = rng.randrange(6)
        if gene[i] > (gene[i + 1] if i + 1 < 6 else 0) and gene[i] > lower[i]:
            smaller = gene[:i] + [gene[i] - 1] + gene[i + 1 :]
            assert macs_per_sample(config, smaller, 384) < macs_per_sample(config, gene, 384)


# ----------------------------------------------------------------------------- the search loop with fakes


class FakeEvaluator:
    """Cost = tokens processed; F1 rises with the kept tokens, with a gene-dependent wiggle so that the
    front is not simply every gene. Counts calls per gene; can fail after N F1 calls (a kill)."""

    def __init__(self, fail_after=None, out_of_bounds=lambda gene: False):
        self.costs, self.f1s = Counter(), Counter()
        self.fail_after = fail_after
        self.out_of_bounds = out_of_bounds

    def cost(self, gene):
        self.costs[gene] += 1
        return 1e9 if self.out_of_bounds(gene) else float(sum(gene))

    def f1(self, gene):
        if self.fail_after is not None and sum(self.f1s.values()) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.f1s[gene] += 1
        return round(50 + 40 * (1 - 1 / sum(gene) ** 0.5) + (hash(gene) % 7) / 10, 6)


SMALL = SearchConfig(
    population_size=6, mutation_size=5, crossover_size=4, iterations=4, min_keep_ratio=0.6, baseline_points=3
)


def run_fake(evaluator, output_dir=None, config=SMALL, seed=3, layers=4, seq=32):
    return evolve(
        evaluator.cost,
        evaluator.f1,
        num_layers=layers,
        seq_length=seq,
        config=config,
        seed=seed,
        output_dir=output_dir,
    )


def test_accepted_counts_are_exact_and_no_gene_is_evaluated_twice():
    fake = FakeEvaluator()
    state, _ = run_fake(fake)
    assert max(fake.costs.values()) == 1 and max(fake.f1s.values()) == 1
    assert set(fake.costs) == set(state.genes)
    lower = constant_ratio_length_config(0.6, 4, 32)
    assert all(is_valid_gene(g, lower, 32) for g in state.genes)
    by_generation = Counter((r["generation"], r["origin"]) for r in state.genes.values() if r["status"] == "ok")
    assert by_generation[(0, "random")] == 6
    for generation in range(1, 5):
        assert by_generation[(generation, "mutation")] == 5
        assert by_generation[(generation, "crossover")] == 4
        assert state.history[generation]["mutation"] == 5 and state.history[generation]["crossover"] == 4
    assert state.population == pareto_front(state.points())
    # Children record their parents, which were on the previous generation's front (or its fallback).
    child = next(r for r in state.genes.values() if r["origin"] == "crossover")
    assert len(child["parents"]) == 2


def test_out_of_bounds_genes_are_never_accepted_nor_scored():
    # Pretend every gene whose first layer is odd times outside the bounds (noisy latency).
    fake = FakeEvaluator(out_of_bounds=lambda g: g[0] % 2 == 1 and g[0] != 32 and g != (20, 12, 8, 5))
    state, _ = run_fake(fake)
    rejected = [g for g, r in state.genes.items() if r["status"] == "out_of_bounds"]
    assert rejected, "the fake should have produced out-of-bounds proposals"
    assert not set(rejected) & set(fake.f1s)  # cost measured, F1 never computed
    lo, hi = state.bounds
    assert all(lo <= r["cost"] <= hi for r in state.genes.values() if r["status"] == "ok")
    assert not set(rejected) & set(state.population)
    by_generation = Counter((r["generation"], r["origin"]) for r in state.genes.values() if r["status"] == "ok")
    for generation in range(1, 5):
        assert by_generation[(generation, "mutation")] == 5
        assert by_generation[(generation, "crossover")] == 4
    assert max(fake.costs.values()) == 1


def test_initial_genes_are_scored_in_generation_zero_and_bad_ones_refused_before_any_scoring():
    # 4 layers on a 32-step grid: [1, 1, 0.5, 0.25] is a late-drop shape no keep-ratio gene has.
    config = dataclasses.replace(SMALL, initial_genes=[[1, 1, 0.5, 0.25], [1, 0.9, 0.9, 0.5]])
    fake = FakeEvaluator()
    state, _ = run_fake(fake, config=config)
    initial = {g for g, r in state.genes.items() if r["origin"] == "initial"}
    assert initial == {(32, 32, 16, 8), (32, 29, 29, 16)}  # ceil(0.9 * 32) = 29
    assert all(state.genes[g]["generation"] == 0 and fake.f1s[g] == 1 for g in initial)
    # Below the min_keep_ratio floor (0.6 compounded: layer 4 keeps >= 5 of 32), or the wrong layer count.
    for bad in ([1, 1, 0.5, 0.1], [1, 1, 1]):
        fake = FakeEvaluator()
        with pytest.raises(ValueError, match=r"search.initial_genes\[0\]: .* floor"):
            run_fake(fake, config=dataclasses.replace(SMALL, initial_genes=[bad]))
        assert not fake.costs  # refused before anything was scored


def test_a_small_search_space_stops_at_the_proposal_cap():
    # 2 layers, 4 tokens, keep ratio 0.5: lower bound (2, 1), only 9 genes exist.
    config = SearchConfig(population_size=3, mutation_size=30, crossover_size=30, iterations=2, min_keep_ratio=0.5)
    fake = FakeEvaluator()
    state, _ = run_fake(fake, config=config, layers=2, seq=4)
    assert len(state.genes) <= 9 and max(fake.costs.values()) == 1
    assert state.history[-1]["proposals"] <= config.max_attempts_factor * 60


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    reference, _ = run_fake(FakeEvaluator(), tmp_path / "straight")
    total_f1_calls = len(reference.genes)

    # Killed in generation 3, after 4 of its genes are scored.
    scored_by_generation_2 = sum(r["generation"] <= 2 for r in reference.genes.values())
    killed = FakeEvaluator(fail_after=scored_by_generation_2 + 4)
    with pytest.raises(KeyboardInterrupt):
        run_fake(killed, tmp_path / "killed")
    assert qs.latest_checkpoint(tmp_path / "killed").name == "generation-2.json"
    resumed_fake = FakeEvaluator()
    resumed, _ = run_fake(resumed_fake, tmp_path / "killed")

    assert list(resumed.genes) == list(reference.genes)
    assert resumed.genes == reference.genes
    assert resumed.population == reference.population
    assert resumed.history == reference.history
    # Genes scored before the kill (even those of the unfinished generation 3) are not scored again.
    assert not set(killed.f1s) & set(resumed_fake.f1s)
    assert sum(killed.f1s.values()) + sum(resumed_fake.f1s.values()) == total_f1_calls
    # The checkpoints of both runs are identical, RNG state included.
    for n in range(5):
        a = json.loads((tmp_path / "straight" / f"generation-{n}.json").read_text())
        b = json.loads((tmp_path / "killed" / f"generation-{n}.json").read_text())
        assert a == b, n
    # A finished search reruns from its last checkpoint without evaluating anything.
    again = FakeEvaluator()
    run_fake(again, tmp_path / "killed")
    assert not again.costs and not again.f1s


def test_a_checkpoint_for_another_model_shape_is_refused(tmp_path):
    run_fake(FakeEvaluator(), tmp_path, config=SearchConfig(population_size=2, iterations=0, baseline_points=2))
    with pytest.raises(ValueError, match="do not fit"):
        run_fake(FakeEvaluator(), tmp_path, layers=3)


def test_a_checkpoint_written_for_other_inputs_is_not_resumed(tmp_path, caplog):
    def search(evaluator, output_dir, model, iterations=4):
        config = SearchConfig(**{**dataclasses.asdict(SMALL), "iterations": iterations})
        return evolve(
            evaluator.cost,
            evaluator.f1,
            num_layers=4,
            seq_length=32,
            config=config,
            seed=3,
            output_dir=output_dir,
            fingerprint=f"fp-{model}",
            inputs={"model": model},
        )

    search(FakeEvaluator(), tmp_path / "out", "a")
    reference, _ = search(FakeEvaluator(), tmp_path / "straight", "b", iterations=2)
    again = FakeEvaluator()
    with caplog.at_level("INFO", logger="qala.search"):
        state, _ = search(again, tmp_path / "out", "b", iterations=2)
    assert "generation-4.json was written for other inputs (model: a -> b): starting the search again" in caplog.text
    assert state.genes == reference.genes and state.population == reference.population
    assert sum(again.f1s.values()) == len(reference.genes)  # nothing of the other model's search reused
    written = sorted((tmp_path / "out").glob("generation-*.json"))
    assert [p.name for p in written] == ["generation-0.json", "generation-1.json", "generation-2.json"]
    assert all(json.loads(p.read_text())["inputs"] == {"model": "b"} for p in written)


def _distributed_worker(rank, world, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fake = FakeEvaluator()
        state, _ = run_fake(fake)
        Path(f"{out_file}.{rank}").write_text(
            json.dumps({"genes": list(state.genes.values()), "f1": [list(g) for g in fake.f1s]})
        )
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_share_the_work_and_agree(tmp_path):
    world = 2
    # fork: the workers inherit the imported modules instead of importing torch again.
    torch.multiprocessing.start_processes(
        _distributed_worker,
        args=(world, tmp_path / "init", tmp_path / "out"),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    reference, _ = run_fake(FakeEvaluator())
    for result in results:
        assert result["genes"] == list(reference.genes.values())
    scored = [tuple(g) for result in results for g in result["f1"]]
    assert len(scored) == len(set(scored)) == len(reference.genes)  # each gene scored on exactly one rank
    assert all(results[r]["f1"] for r in range(world))  # both ranks did some of it


# ----------------------------------------------------------------------------- recipes and the tiny model

RECIPE = """
run: {{output_dir: {tmp}/run, seed: 5}}
data:
  train: package://qala/samples/squad_sample_train.json
  eval: package://qala/samples/squad_sample_dev.json
  max_seq_length: 64
  doc_stride: 16  # the longest sample question is 30 tokens: room for > 16 context tokens
  length_units: absolute
model: {{name_or_path: {model}}}
eval: {{batch_size: 32}}
search:
  model: {model}
  output_dir: {tmp}/search
  objective: macs
  backend: fp32
  population_size: 3
  mutation_size: 2
  crossover_size: 2
  iterations: 2
  min_keep_ratio: 0.6
  eval_samples: 8
  baseline_points: 3
"""


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_checkpoint):
    # A copy: the search installs frontier.json into the model directory it searched.
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


def write_recipe(tmp_path, model):
    path = tmp_path / "search.yaml"
    path.write_text(RECIPE.format(tmp=tmp_path, model=model))
    return path


def test_search_on_the_tiny_model_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_model_dir)
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert qs.main([str(path), "--install-into", str(other)]) == 0
    out = tmp_path / "search"
    for name in ("frontier.json", "genes.json", "frontier.png", "generation-0.json", "generation-2.json"):
        assert (out / name).is_file(), name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["objective"] == "macs" and frontier["num_layers"] == 2 and frontier["max_seq_length"] == 64
    assert frontier["eval"] == {
        "data": "package://qala/samples/squad_sample_dev.json",
        "questions": 61,
        "search_questions": 8,
    }
    assert frontier["frontier"], "the frontier is never empty"
    config = LengthAdaptiveForQuestionAnswering.from_pretrained(tiny_model_dir).config
    lower = constant_ratio_length_config(0.6, 2, 64)
    costs = [row["cost"] for row in frontier["frontier"]]
    assert costs == sorted(costs)
    for row in frontier["frontier"]:
        assert is_valid_gene(row["length_config"], lower, 64)
        assert row["cost"] == row["macs"] == macs_per_sample(config, row["length_config"], 64)
        assert 0 <= row["f1"] <= 100 and "f1_subset" in row
    assert [p["keep_ratio"] for p in frontier["keep_ratio_curve"]] == [1.0, 0.8, 0.6]
    assert "versions" in frontier["environment"]
    genes = json.loads((out / "genes.json").read_text())["genes"]
    assert len({tuple(g["gene"]) for g in genes}) == len(genes) == frontier["search"]["evaluated"]
    # Installed where qala.answer looks for it.
    assert json.loads((tiny_model_dir / "frontier.json").read_text()) == frontier
    assert (other / "frontier.json").is_file()
    assert "Pareto frontier (macs, fp32)" in capsys.readouterr().out

    # Rerun: resumes from generation-2.json, nothing evaluated again (the journal answers the final re-scoring).
    lines = (out / "evaluations.jsonl").read_text().count("\n")
    assert qs.main([str(path)]) == 0
    assert (out / "evaluations.jsonl").read_text().count("\n") == lines
    assert json.loads((out / "frontier.json").read_text())["frontier"] == frontier["frontier"]


def test_a_search_of_weights_replaced_at_the_same_path_starts_again(
    tmp_path, tiny_model_dir, monkeypatch, caplog, capsys
):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_model_dir)
    assert qs.main([str(path)]) == 0
    out = tmp_path / "search"
    before = json.loads((out / "frontier.json").read_text())["search"]["inputs"]["model"]
    recorded = (out / "recipe.yaml").read_text()

    build_tiny_qa_checkpoint(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", tiny_model_dir / "model.safetensors")
    with caplog.at_level("INFO", logger="qala.search"):
        assert qs.main([str(path)]) == 0
    after = content_hash(tiny_model_dir)
    assert f"generation-2.json was written for other inputs (model: {before} -> {after})" in caplog.text
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["search"]["inputs"]["model"] == after
    for checkpoint in out.glob("generation-*.json"):
        assert json.loads(checkpoint.read_text())["fingerprint"] == frontier["search"]["fingerprint"]

    # A start that fails (no model there) leaves the search's recipe.yaml as the last run wrote it.
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert qs.main([str(path), f"search.model={empty}"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == recorded
    assert load_search_recipe(out / "recipe.yaml")[1].model == str(tiny_model_dir)


def test_search_latency_objective_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_model_dir)
    recipe, search = load_search_recipe(
        path,
        [
            "search.objective=latency",
            "search.iterations=1",
            "search.latency_repeats=2",
            "search.latency_warmup=1",
            "search.install_frontier=false",
            "~search.eval_samples",
            "data.max_eval_samples=6",
        ],
    )
    document = qs.run(recipe, search)
    assert document["cost_unit"] == "ms" and document["latency"]["batch_size"] == 1
    lo, hi = document["cost_bounds"]
    assert 0 < lo <= hi
    for row in document["frontier"]:
        assert lo <= row["latency_ms"] <= hi and "f1_subset" not in row
    assert not (tiny_model_dir / "frontier.json").exists()
    genes = json.loads((tmp_path / "search" / "genes.json").read_text())["genes"]
    assert all(g["f1"] is None for g in genes if g["status"] == "out_of_bounds")


def test_search_recipe_errors_name_their_key_and_exit_2(tmp_path, tiny_model_dir, capsys):
    path = write_recipe(tmp_path, tiny_model_dir)
    assert qs.main([str(path), "search.mutation_sise=3", "search.objective=speed"]) == 2
    err = capsys.readouterr().err
    assert "search.mutation_sise: unknown key (did you mean 'mutation_size'?)" in err
    assert "search.objective: expected one of ['latency', 'macs']" in err
    assert qs.main([str(path), "data.doc_stride=99"]) == 2
    assert "data.doc_stride: must be smaller" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="min_keep_ratio"):
        load_search_recipe(path, ["search.min_keep_ratio=0", "search.latency_repeats=0"])
    with pytest.raises(RecipeError, match=r"initial_genes\[1\]: expected non-increasing keep ratios"):
        load_search_recipe(path, ["search.initial_genes=[[1,0.9],[1,0.5,0.6]]"])
    # An fp32 directory is not an INT8 artifact: the message says what to change.
    assert qs.main([str(path), "search.backend=int8"]) == 2
    assert "search.backend=fp32" in capsys.readouterr().err


def test_shipped_search_recipe_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    path = REPO / "recipes" / "squad_search.yaml"
    overrides = []
    if not (REPO.parent / "shared" / "data" / "squad-v1.1").is_dir():
        overrides += [
            "data.train=package://qala/samples/squad_sample_train.json",
            "data.eval=package://qala/samples/squad_sample_dev.json",
        ]
    overrides += [f"model.name_or_path={tmp_path}"]
    recipe, search = load_search_recipe(path, overrides)
    assert path.read_text().startswith("# python -m qala.search recipes/squad_search.yaml\n")
    assert search.objective == "latency" and search.backend == "int8"  # the default objective
    assert recipe.data.max_seq_length == 384


def test_search_in_ratio_units_on_real_window_lengths(tmp_path, tiny_model_dir, monkeypatch):
    """The default units: genes are percent keep ratios of each window's real length; costs are per real
    (unpadded) window, MACs averaged and latency measured over the same fixed sample of windows."""
    monkeypatch.chdir(REPO)
    path = write_recipe(tmp_path, tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    for objective in ("latency",):  # rows carry MACs too, averaged over the same windows
        recipe, search = load_search_recipe(
            path,
            [
                "data.length_units=ratio",
                f"search.objective={objective}",
                f"search.output_dir={tmp_path}/search-{objective}",
                "data.max_eval_samples=12",
                "search.iterations=1",
                "search.latency_windows=4",
                "search.latency_repeats=1",
                "search.latency_warmup=0",
                "search.install_frontier=false",
            ],
        )
        document = qs.run(recipe, search)
        assert document["length_mode"] == "ratio" and document["cost_windows"]["count"] == 4
        assert 0 < document["cost_windows"]["mean_tokens"] <= 64  # real window lengths (these are mostly full)
        lower = document["lower_bound"]["keep_ratios"]
        assert lower == pytest.approx([0.6, 0.36])
        for row in document["frontier"] + document["keep_ratio_curve"]:
            ratios = row["keep_ratios"]
            assert "length_config" not in row
            assert all(0 < r <= 1 for r in ratios) and ratios == sorted(ratios, reverse=True)
            assert all(lo <= r + 1e-9 for r, lo in zip(ratios, lower, strict=True))
            # MACs per real window never exceed those of a full window of max_seq_length
            assert row["macs"] <= macs_per_sample(config, None, 64)
        assert [p["keep_ratio"] for p in document["keep_ratio_curve"]] == [1.0, 0.8, 0.6]
