"""Mixed-precision planner: one candidate per layer under a bit budget, checked against brute force."""

import itertools
import random

import pytest

from weightwise.errors import WeightwiseError
from weightwise.quantize.planner import Candidate, budget_from_bpw, budget_from_mb, plan_mixed_precision


def _layers(seed: int, n_layers: int = 5, n_cands: int = 3, bit_range=(10, 100)) -> dict[str, list[Candidate]]:
    rng = random.Random(seed)
    return {
        f"layer{i}": [Candidate(f"c{j}", rng.randint(*bit_range), rng.uniform(0, 10), info={"j": j}) for j in range(n_cands)]
        for i in range(n_layers)
    }


def _brute_force(layers, budget):
    best = None
    for combo in itertools.product(*layers.values()):
        if sum(c.bits for c in combo) <= budget:
            err = sum(c.error for c in combo)
            best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    layers = _layers(seed)
    lo = sum(min(c.bits for c in cs) for cs in layers.values())
    hi = sum(max(c.bits for c in cs) for cs in layers.values())
    for budget in (lo, (2 * lo + hi) // 3, (lo + 2 * hi) // 3, hi):
        plan = plan_mixed_precision(layers, budget)
        assert plan.optimal and plan.budget_bits == budget
        assert set(plan.choices) == set(layers) and all(plan.choices[n] in layers[n] for n in layers)
        assert plan.total_bits == sum(c.bits for c in plan.choices.values()) <= budget
        assert plan.total_error == pytest.approx(sum(c.error for c in plan.choices.values()))
        assert plan.total_error == pytest.approx(_brute_force(layers, budget), rel=1e-9, abs=1e-12)
        assert plan.labels == {n: c.label for n, c in plan.choices.items()}


@pytest.mark.parametrize("seed", range(3))
def test_never_exceeds_a_tight_budget_with_large_bit_counts(seed):
    layers = _layers(seed, n_layers=30, n_cands=4, bit_range=(1_000_000, 20_000_000))
    lo = sum(min(c.bits for c in cs) for cs in layers.values())
    rng = random.Random(seed)
    for _ in range(3):
        budget = lo + rng.randint(0, 50_000_000)
        plan = plan_mixed_precision(layers, budget)
        assert plan.total_bits <= budget


def test_generous_budget_picks_the_least_error_everywhere():
    layers = _layers(11, n_layers=6, n_cands=4)
    plan = plan_mixed_precision(layers, 10**9)
    assert plan.choices == {n: min(cs, key=lambda c: c.error) for n, cs in layers.items()}


def test_infeasible_budget_names_the_minimum():
    layers = {"a": [Candidate("4b", 400, 1.0), Candidate("2b", 200, 5.0)], "b": [Candidate("4b", 300, 1.0), Candidate("3b", 250, 2.0)]}
    assert plan_mixed_precision(layers, 450).labels == {"a": "2b", "b": "3b"}
    with pytest.raises(WeightwiseError, match="smallest candidates of the 2 layers already take 450 bits"):
        plan_mixed_precision(layers, 449)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(WeightwiseError, match="no layers"):
        plan_mixed_precision({}, 100)
    with pytest.raises(WeightwiseError, match="no candidates"):
        plan_mixed_precision({"a": []}, 100)
    with pytest.raises(WeightwiseError, match="same label"):
        plan_mixed_precision({"a": [Candidate("x", 1, 1.0), Candidate("x", 2, 0.5)]}, 100)
    with pytest.raises(WeightwiseError, match="errors finite"):
        plan_mixed_precision({"a": [Candidate("x", 1, float("nan"))]}, 100)


def test_budget_helpers():
    assert budget_from_bpw(4.25, 1000) == 4250
    assert budget_from_bpw(3.3, 10) == 33  # the decimal target taken exactly
    assert budget_from_bpw(4, 1000, fixed_bits=1000) == 3000
    assert budget_from_mb(1.5, fixed_bits=2_000_000) == 12_000_000 - 2_000_000
    with pytest.raises(WeightwiseError, match="fixed tensors alone take 9000000 bits"):
        budget_from_mb(1, fixed_bits=9_000_000)
