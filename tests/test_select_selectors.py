"""Rank averaging, the budget and the selector registry (top, bottom, random, stratified, k-center, facility)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from weightwise.errors import WeightwiseError
from weightwise.select.combine import percentile_ranks, rank_average
from weightwise.select.selectors import (
    SELECTOR_NAMES,
    BottomConfig,
    FacilityConfig,
    KCenterConfig,
    RandomConfig,
    SelectionRequest,
    SelectorConfig,
    StratifiedConfig,
    TopConfig,
    budget_count,
    facility_location,
    run_selector,
    stratum_quotas,
)

finite = st.floats(-1e6, 1e6, allow_nan=False)


def unit_rows(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clusters(rng: np.random.Generator, centers: int, per: int, d: int = 16, noise: float = 0.05) -> np.ndarray:
    """``centers`` orthogonal directions, ``per`` noisy unit vectors around each (cluster c = rows c·per …)."""
    x = np.repeat(np.eye(d)[:centers], per, axis=0) + noise * rng.normal(size=(centers * per, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def request(combined, k, candidates=None, strata=None, vectors=None, seed=0) -> SelectionRequest:
    combined = np.asarray(combined, dtype=float)
    candidates = np.arange(len(combined)) if candidates is None else np.asarray(candidates)
    return SelectionRequest(candidates=candidates, k=k, combined=combined, strata=strata,
                            embeddings=None if vectors is None else (lambda: vectors), seed=seed)


def coverage(vectors: np.ndarray, chosen: np.ndarray) -> float:
    return float(np.maximum(vectors @ vectors[chosen].T, 0).max(axis=1).sum())


# rank averaging ---------------------------------------------------------------------------------------------


def test_one_scorer_gives_its_own_percentile_ranks_with_ties_averaged_and_nan_last():
    scores = np.array([3.0, 1.0, np.nan, 3.0, 2.0])
    high = rank_average({"a": scores}, {"a": 2.0}, {"a": "high"})
    np.testing.assert_allclose(high, [3.5 / 4, 1 / 4, 0.0, 3.5 / 4, 2 / 4])
    low = rank_average({"a": scores}, {"a": 1.0}, {"a": "low"})
    np.testing.assert_allclose(low, [1.5 / 4, 1.0, 0.0, 1.5 / 4, 3 / 4])


def test_weights_average_the_ranks():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([30.0, 20.0, 10.0])
    combined = rank_average({"a": a, "b": b}, {"a": 3.0, "b": 1.0}, {"a": "high", "b": "high"})
    np.testing.assert_allclose(combined, (3 * percentile_ranks(a, "high") + percentile_ranks(b, "high")) / 4)
    assert np.argmax(combined) == 2  # the heavier scorer wins


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(finite, st.just(float("nan"))), min_size=1, max_size=30), st.sampled_from(["high", "low"]))
def test_ranks_are_bounded_and_follow_the_preferred_order(values, prefer):
    scores = np.array(values)
    ranks = rank_average({"s": scores}, {"s": 1.0}, {"s": prefer})
    assert np.all((ranks >= 0) & (ranks <= 1))
    scored = ~np.isnan(scores)
    assert np.all(ranks[~scored] == 0) and np.all(ranks[scored] > 0)
    sign = 1 if prefer == "high" else -1
    for i in np.flatnonzero(scored):
        for j in np.flatnonzero(scored):
            if sign * scores[i] > sign * scores[j]:
                assert ranks[i] > ranks[j]
            elif scores[i] == scores[j]:
                assert ranks[i] == ranks[j]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=20), st.floats(0.1, 10), st.floats(0.1, 10))
def test_improving_one_score_never_lowers_the_combined_rank(pairs, wa, wb):
    a, b = np.array(pairs).T
    before = rank_average({"a": a, "b": b}, {"a": wa, "b": wb}, {"a": "high", "b": "low"})
    better = a.copy()
    better[0] = a.max() + 1
    after = rank_average({"a": better, "b": b}, {"a": wa, "b": wb}, {"a": "high", "b": "low"})
    assert after[0] >= before[0] and np.all((after >= 0) & (after <= 1))


@pytest.mark.parametrize("scores, weights, prefer, match", [
    ({}, {}, {}, "no scores"),
    ({"a": np.ones(3)}, {"b": 1.0}, {"a": "high"}, "exactly the scorers"),
    ({"a": np.ones(3), "b": np.ones(4)}, {"a": 1.0, "b": 1.0}, {"a": "high", "b": "high"}, "equal-length"),
    ({"a": np.ones((3, 2))}, {"a": 1.0}, {"a": "high"}, "1-D"),
    ({"a": np.ones(3)}, {"a": 0.0}, {"a": "high"}, "positive weight"),
    ({"a": np.ones(3)}, {"a": 1.0}, {"a": "up"}, "unknown prefer"),
])
def test_rank_average_rejects_mismatched_input(scores, weights, prefer, match):
    with pytest.raises(WeightwiseError, match=match):
        rank_average(scores, weights, prefer)


# budget ---------------------------------------------------------------------------------------------------------


def test_budget_count():
    assert budget_count(10, 4, None) == 4
    assert budget_count(10, 10, None) == 10
    assert budget_count(10, None, 0.25) == 2  # 2.5 rounds to the nearest even count
    assert budget_count(10, None, 0.36) == 4
    assert budget_count(10, None, 0.01) == 1  # never 0
    assert budget_count(7, None, 1.0) == 7


@pytest.mark.parametrize("n, budget, fraction, match", [
    (10, 11, None, "budget of 11 examples is larger than the 10 eligible examples: lower it"),
    (0, 1, None, "nothing left to select"),
    (10, None, None, "exactly one of budget"),
    (10, 3, 0.5, "exactly one of budget"),
    (10, None, 1.5, r"outside \(0, 1\]"),
    (10, None, 0.0, r"outside \(0, 1\]"),
    (10, 0, None, "at least 1"),
])
def test_budget_count_errors(n, budget, fraction, match):
    with pytest.raises(WeightwiseError, match=match):
        budget_count(n, budget, fraction)


# registry and common contract -------------------------------------------------------------------------------


def test_configs_parse_by_name_and_forbid_unknown_fields():
    adapter = TypeAdapter(SelectorConfig)
    assert isinstance(adapter.validate_python({"name": "kcenter", "quality": 0.3}), KCenterConfig)
    assert adapter.validate_python({"name": "stratified", "field": "task"}).within == "top"
    assert SELECTOR_NAMES == ("top", "bottom", "random", "stratified", "kcenter", "facility")
    for bad in ({"name": "top", "k": 3}, {"name": "facility", "quality": 1.5}, {"name": "stratified"}, {"name": "best"}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)
    assert FacilityConfig.needs_embeddings and not TopConfig.needs_embeddings
    assert StratifiedConfig.needs_strata and not KCenterConfig.needs_strata


ALL_CONFIGS = [TopConfig(), BottomConfig(), RandomConfig(), StratifiedConfig(field="task"),
               StratifiedConfig(field="task", within="random"), KCenterConfig(), KCenterConfig(quality=0.5),
               FacilityConfig(), FacilityConfig(quality=0.5)]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_every_selector_returns_k_distinct_eligible_indices(data):
    n = data.draw(st.integers(1, 40))
    candidates = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))))
    k = data.draw(st.integers(1, len(candidates)))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    combined = np.where(rng.random(n) < 0.2, 0.5, rng.random(n))  # some ties
    strata = [data.draw(st.sampled_from(["a", "b", "c", ""])) for _ in range(n)]
    if all(strata[i] == "" for i in candidates):
        strata[candidates[0]] = "a"
    vectors = unit_rows(rng, n)
    vectors[rng.random(n) < 0.2] = vectors[0]  # exact duplicates
    for config in ALL_CONFIGS:
        chosen = run_selector(config, request(combined, k, rng.permutation(candidates), strata, vectors, seed))
        assert len(chosen) == k and len(set(chosen.tolist())) == k, config
        assert set(chosen.tolist()) <= set(candidates.tolist()), config


def test_run_selector_rejects_bad_requests():
    with pytest.raises(WeightwiseError, match="cannot choose 4 of 3"):
        run_selector(TopConfig(), request(np.zeros(5), 4, candidates=[0, 1, 2]))
    with pytest.raises(WeightwiseError, match="repeat"):
        run_selector(TopConfig(), request(np.zeros(5), 1, candidates=[0, 0, 2]))
    with pytest.raises(WeightwiseError, match="pool indices"):
        run_selector(TopConfig(), request(np.zeros(5), 1, candidates=[0, 5]))
    with pytest.raises(WeightwiseError, match="embeddings"):
        run_selector(KCenterConfig(), request(np.zeros(5), 1))
    with pytest.raises(WeightwiseError, match="one row per pool example"):
        run_selector(FacilityConfig(), request(np.zeros(5), 1, vectors=np.ones((4, 3))))


# top / bottom / random --------------------------------------------------------------------------------------


def test_top_and_bottom_rank_the_candidates_only_with_ties_by_pool_index():
    combined = np.array([0.9, 0.2, 0.5, 0.5, 1.0, 0.1])
    candidates = [5, 3, 2, 1, 0]  # index 4, the best, was filtered out
    assert run_selector(TopConfig(), request(combined, 3, candidates)).tolist() == [0, 2, 3]
    assert run_selector(BottomConfig(), request(combined, 3, candidates)).tolist() == [5, 1, 2]


def test_random_is_reproducible_for_a_seed_and_differs_across_seeds():
    combined = np.zeros(1000)
    first = run_selector(RandomConfig(), request(combined, 50, seed=7))
    assert np.array_equal(first, run_selector(RandomConfig(), request(combined, 50, seed=7)))
    assert not np.array_equal(np.sort(first), np.sort(run_selector(RandomConfig(), request(combined, 50, seed=8))))


def test_random_is_roughly_uniform():
    counts = np.zeros(10)
    for seed in range(400):
        counts[run_selector(RandomConfig(), request(np.arange(10.0), 3, seed=seed))] += 1
    assert counts.min() > 80 and counts.max() < 160  # 120 expected each


# stratified -----------------------------------------------------------------------------------------------------


def test_stratum_quotas_are_proportional_by_largest_remainder():
    assert stratum_quotas(np.array([60, 30, 10]), 10).tolist() == [6, 3, 1]
    assert stratum_quotas(np.array([50, 30, 20]), 7).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4 → the .5 gets the spare
    assert stratum_quotas(np.array([97, 1, 1, 1]), 4).tolist() == [1, 1, 1, 1]  # every stratum gets one
    assert stratum_quotas(np.array([97, 1, 1, 1]), 2).tolist() == [2, 0, 0, 0]  # fewer picks than strata


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.data())
def test_stratum_quotas_sum_to_k_fit_their_strata_and_stay_near_the_exact_share(sizes, data):
    sizes = np.array(sizes)
    k = data.draw(st.integers(1, int(sizes.sum())))
    quotas = stratum_quotas(sizes, k)
    assert quotas.sum() == k and np.all(quotas >= 0) and np.all(quotas <= sizes)
    if k >= len(sizes):
        assert np.all(quotas >= 1)
    else:
        assert np.all(np.abs(quotas - k * sizes / sizes.sum()) < 1)


def test_stratified_keeps_each_value_at_its_share_and_its_best_within():
    strata = ["math"] * 60 + ["code"] * 30 + ["chat"] * 10
    combined = np.random.default_rng(0).random(100)
    chosen = run_selector(StratifiedConfig(field="task"), request(combined, 10, strata=strata))
    picked = [strata[i] for i in chosen]
    assert (picked.count("math"), picked.count("code"), picked.count("chat")) == (6, 3, 1)
    for value, quota in (("math", 6), ("code", 3), ("chat", 1)):
        members = [i for i in range(100) if strata[i] == value]
        best = sorted(members, key=lambda i: -combined[i])[:quota]
        assert {i for i in chosen if strata[i] == value} == set(best)


def test_stratified_random_within_is_seeded():
    strata = ["a"] * 50 + ["b"] * 50
    one = run_selector(StratifiedConfig(field="t", within="random"), request(np.zeros(100), 10, strata=strata, seed=1))
    assert np.array_equal(one, run_selector(StratifiedConfig(field="t", within="random"),
                                            request(np.zeros(100), 10, strata=strata, seed=1)))
    assert sum(strata[i] == "a" for i in one) == 5


def test_stratified_missing_values_form_their_own_stratum_and_all_missing_is_an_error():
    strata = ["a"] * 6 + [""] * 4
    chosen = run_selector(StratifiedConfig(field="t"), request(np.arange(10.0), 5, strata=strata))
    assert sum(strata[i] == "" for i in chosen) == 2
    with pytest.raises(WeightwiseError, match="no candidate example has the field 't'"):
        run_selector(StratifiedConfig(field="t"), request(np.zeros(4), 2, strata=[""] * 4))
    with pytest.raises(WeightwiseError, match="needs each example's 't' value"):
        run_selector(StratifiedConfig(field="t"), request(np.zeros(4), 2))


# k-center ----------------------------------------------------------------------------------------------------------


def test_kcenter_starts_at_the_best_score_and_covers_far_clusters_before_near_duplicates():
    rng = np.random.default_rng(0)
    vectors = clusters(rng, centers=4, per=20)
    combined = rng.random(80)
    combined[25] = 2.0  # cluster 1
    chosen = run_selector(KCenterConfig(), request(combined, 4, vectors=vectors))
    assert chosen[0] == 25
    assert sorted(chosen // 20) == [0, 1, 2, 3]


def test_kcenter_quality_one_follows_the_combined_score():
    rng = np.random.default_rng(1)
    vectors = clusters(rng, centers=2, per=10)
    combined = rng.random(20)
    chosen = run_selector(KCenterConfig(quality=1.0), request(combined, 6, vectors=vectors))
    assert chosen.tolist() == np.argsort(-combined)[:6].tolist()


# facility location ----------------------------------------------------------------------------------------------


def test_facility_lazy_greedy_matches_plain_greedy():
    rng = np.random.default_rng(2)
    vectors = unit_rows(rng, 60, d=6).astype(np.float32)
    sim = np.maximum(vectors @ vectors.T, 0)
    covered, plain = np.zeros(60), []
    for _ in range(12):
        gains = np.maximum(sim - covered[:, None], 0).sum(axis=0)
        gains[plain] = -1
        plain.append(int(np.argmax(gains)))
        covered = np.maximum(covered, sim[:, plain[-1]])
    lazy = facility_location(vectors, np.zeros(60), 12, quality=0.0, block=8)
    assert lazy.tolist() == plain


def test_facility_covers_clustered_data_better_than_random():
    rng = np.random.default_rng(3)
    vectors = clusters(rng, centers=8, per=30, noise=0.15)
    combined = np.zeros(len(vectors))
    chosen = run_selector(FacilityConfig(), request(combined, 8, vectors=vectors))
    assert sorted(chosen // 30) == list(range(8))  # one per cluster
    randoms = [coverage(vectors, run_selector(RandomConfig(), request(combined, 8, seed=s))) for s in range(20)]
    assert coverage(vectors, chosen) > max(randoms)


def test_facility_quality_trades_coverage_for_score():
    rng = np.random.default_rng(4)
    vectors = clusters(rng, centers=4, per=25, noise=0.15)
    combined = np.zeros(100)
    combined[:25] = 1 + rng.random(25)  # cluster 0 scores best
    plain = run_selector(FacilityConfig(), request(combined, 8, vectors=vectors))
    blended = run_selector(FacilityConfig(quality=0.8), request(combined, 8, vectors=vectors))
    assert combined[blended].mean() > combined[plain].mean()
    assert coverage(vectors, plain) > coverage(vectors, blended)


def test_diversity_selectors_never_start_from_an_unscored_candidate():
    vectors = clusters(np.random.default_rng(5), centers=3, per=4)
    combined = np.array([np.nan, 0.2, 0.9] + [0.1] * 9)
    for config in (KCenterConfig(), KCenterConfig(quality=1.0)):
        assert run_selector(config, request(combined, 3, vectors=vectors))[0] == 2
