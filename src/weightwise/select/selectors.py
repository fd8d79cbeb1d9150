"""Registry of selectors: a typed config (pydantic, discriminated by ``name``) → its handler.

A selector turns the eligible candidates, their combined scores and a budget k into k chosen pool
indices, in the order chosen. ``top``/``bottom`` rank by the combined score, ``random`` is the baseline,
``stratified`` keeps each value of a record field at its share of the pool, and ``kcenter``/``facility``
trade score for diversity on sentence embeddings. Adding a selector = a config class + a handler + one
registry line + tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightwise.errors import WeightwiseError


class _Selector(BaseModel):
    model_config = ConfigDict(extra="forbid")
    needs_embeddings: ClassVar[bool] = False
    needs_strata: ClassVar[bool] = False


class TopConfig(_Selector):
    """The k highest combined scores (ties: earlier pool index first)."""

    name: Literal["top"] = "top"


class BottomConfig(_Selector):
    """The k lowest combined scores (ties: earlier pool index first)."""

    name: Literal["bottom"] = "bottom"


class RandomConfig(_Selector):
    """A uniform sample of k candidates, seeded: the baseline every scorer should beat."""

    name: Literal["random"] = "random"


class StratifiedConfig(_Selector):
    """The budget split across the values of a record field in proportion to each value's candidates
    (largest-remainder rounding; with k ≥ number of values every value gets at least one), then top or
    random within each value. Records without the field form the stratum ""."""

    needs_strata: ClassVar[bool] = True

    name: Literal["stratified"] = "stratified"
    field: str = Field(..., min_length=1, description="Record field whose values are the strata (e.g. a task or source name).")
    within: Literal["top", "random"] = Field("top", description="How each stratum's share is chosen.")


class KCenterConfig(_Selector):
    """Greedy k-center on unit embeddings (cosine distance): start from the highest combined score, then
    repeatedly take the candidate farthest from everything chosen, so far clusters are covered before near
    neighbours (Sener & Savarese 2018, arXiv 1708.00489)."""

    needs_embeddings: ClassVar[bool] = True

    name: Literal["kcenter"] = "kcenter"
    quality: float = Field(0.0, ge=0, le=1, description="Each pick maximises (1 − quality)·distance/max distance + "
                           "quality·combined score (min-max scaled over the candidates): 0 is pure coverage.")


class FacilityConfig(_Selector):
    """Greedy facility location: maximise Σ_i max_{j∈S} sim(i, j) over all candidates i (sim: cosine clipped
    at 0), a submodular coverage objective; lazy greedy, its gains refreshed in blocks."""

    needs_embeddings: ClassVar[bool] = True

    name: Literal["facility"] = "facility"
    quality: float = Field(0.0, ge=0, le=1, description="Each pick maximises (1 − quality)·gain/largest gain + "
                           "quality·combined score (min-max scaled over the candidates): 0 is pure coverage.")


SelectorConfig = Annotated[
    Union[TopConfig, BottomConfig, RandomConfig, StratifiedConfig, KCenterConfig, FacilityConfig],
    Field(discriminator="name"),
]


@dataclass(frozen=True)
class SelectionRequest:
    """What a selector chooses from. ``combined`` and ``strata`` are indexed by pool index; ``embeddings``
    lazily gives (n_pool, d) unit vectors (only diversity selectors call it)."""

    candidates: np.ndarray
    k: int
    combined: np.ndarray
    strata: list[str] | None
    embeddings: Callable[[], np.ndarray] | None
    seed: int


def budget_count(n_eligible: int, budget: int | None, fraction: float | None) -> int:
    """How many examples to keep: ``budget`` itself, or ``fraction`` of the eligible ones rounded to the
    nearest count (at least 1)."""
    if (budget is None) == (fraction is None):
        raise WeightwiseError("give exactly one of budget (a count of examples) and fraction (a share of them)")
    if n_eligible <= 0:
        raise WeightwiseError("nothing left to select: the filters or scorers dropped every example; relax them")
    if budget is not None:
        if budget < 1:
            raise WeightwiseError(f"budget of {budget} examples: keep at least 1")
        if budget > n_eligible:
            raise WeightwiseError(f"budget of {budget} examples is larger than the {n_eligible} eligible examples: "
                                  "lower it or give a fraction")
        return budget
    if not 0 < fraction <= 1:
        raise WeightwiseError(f"fraction {fraction} is outside (0, 1]: give the share of examples to keep")
    return max(1, round(fraction * n_eligible))


def _ranked(candidates: np.ndarray, combined: np.ndarray, descending: bool) -> np.ndarray:
    """Candidates sorted by combined score (NaN last), ties by pool index."""
    values = combined[candidates]
    key = np.where(np.isnan(values), np.inf, -values if descending else values)
    return candidates[np.lexsort((candidates, key))]


def _top(config: TopConfig, request: SelectionRequest) -> np.ndarray:
    return _ranked(request.candidates, request.combined, descending=True)[: request.k]


def _bottom(config: BottomConfig, request: SelectionRequest) -> np.ndarray:
    return _ranked(request.candidates, request.combined, descending=False)[: request.k]


def _random(config: RandomConfig, request: SelectionRequest) -> np.ndarray:
    return np.random.default_rng(request.seed).choice(request.candidates, size=request.k, replace=False)


def stratum_quotas(sizes: np.ndarray, k: int) -> np.ndarray:
    """k split in proportion to ``sizes`` by largest remainders (ties: larger stratum, then earlier); when
    k ≥ len(sizes) a stratum left at 0 takes one pick from the stratum most above its exact share."""
    exact = k * sizes / sizes.sum()
    quotas = np.floor(exact).astype(int)
    order = np.lexsort((np.arange(len(sizes)), -sizes, -(exact - quotas)))
    quotas[order[: k - quotas.sum()]] += 1
    if k >= len(sizes):
        for empty in np.flatnonzero(quotas == 0):
            donor = int(np.argmax(np.where(quotas > 1, quotas - exact, -np.inf)))
            quotas[donor] -= 1
            quotas[empty] = 1
    return quotas


def _stratified(config: StratifiedConfig, request: SelectionRequest) -> np.ndarray:
    if request.strata is None:
        raise WeightwiseError(f"selector stratified needs each example's {config.field!r} value: pass strata")
    labels = np.array([request.strata[i] for i in request.candidates], dtype=object)
    if (labels == "").all():
        raise WeightwiseError(f"no candidate example has the field {config.field!r}: stratify by a field the records have")
    values = sorted(set(labels))
    groups = [request.candidates[labels == value] for value in values]
    quotas = stratum_quotas(np.array([len(g) for g in groups]), request.k)
    rng = np.random.default_rng(request.seed)
    picks = []
    for group, quota in zip(groups, quotas):
        if config.within == "top":
            picks.append(_ranked(group, request.combined, descending=True)[:quota])
        else:
            picks.append(rng.choice(group, size=quota, replace=False))
    return np.concatenate(picks)


def _unit_scale(values: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; NaN (no score) becomes 0, and all zeros when constant."""
    if np.isnan(values).all():
        return np.zeros_like(values)
    low, span = np.nanmin(values), np.nanmax(values) - np.nanmin(values)
    return np.nan_to_num((values - low) / span if span > 0 else np.zeros_like(values), nan=0.0)


def _candidate_vectors(request: SelectionRequest) -> np.ndarray:
    if request.embeddings is None:
        raise WeightwiseError("diversity selectors need sentence embeddings of the pool: pass embeddings")
    vectors = np.asarray(request.embeddings(), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(request.combined):
        raise WeightwiseError(f"embeddings must be one row per pool example ({len(request.combined)}): got shape {vectors.shape}")
    return vectors[request.candidates]


def kcenter(vectors: np.ndarray, quality_scores: np.ndarray, k: int, quality: float) -> np.ndarray:
    """Positions (rows of ``vectors``) chosen by greedy k-center: the best ``quality_scores`` row first, then
    the argmax of (1 − quality)·(distance to the chosen set / its max) + quality·quality_scores."""
    chosen = [int(np.argmax(quality_scores))]
    distance = 1.0 - vectors @ vectors[chosen[0]]
    available = np.ones(len(vectors), dtype=bool)
    available[chosen[0]] = False
    for _ in range(k - 1):
        far = distance.max(where=available, initial=0.0)
        spread = distance / far if far > 0 else np.zeros_like(distance)
        pick = int(np.argmax(np.where(available, (1 - quality) * spread + quality * quality_scores, -np.inf)))
        chosen.append(pick)
        available[pick] = False
        distance = np.minimum(distance, 1.0 - vectors @ vectors[pick])
    return np.array(chosen, dtype=int)


def facility_location(vectors: np.ndarray, quality_scores: np.ndarray, k: int, quality: float,
                      block: int = 256) -> np.ndarray:
    """Positions chosen by lazy-greedy facility location on sim = max(0, cosine); each pick maximises
    (1 − quality)·gain/largest gain + quality·quality_scores. Gains only shrink as the set grows
    (submodularity), so stale gains are upper bounds and only the most promising are recomputed."""
    n = len(vectors)
    covered = np.zeros(n, dtype=np.float32)

    def gains(columns: np.ndarray) -> np.ndarray:
        sim = np.maximum(vectors @ vectors[columns].T, 0.0)
        return np.maximum(sim - covered[:, None], 0.0).sum(axis=0)

    bound = np.concatenate([gains(np.arange(i, min(i + block, n))) for i in range(0, n, block)])
    fresh = np.ones(n, dtype=bool)
    available = np.ones(n, dtype=bool)

    def best(score: Callable[[np.ndarray], np.ndarray]) -> int:
        """The available position maximising score(gain) (non-decreasing in the gain): bounds are refreshed
        best-first, 4 then 8, 16, … at a time up to ``block``, until the best is fresh."""
        size = 4
        while True:
            scores = np.where(available, score(bound), -np.inf)
            top = int(np.argmax(scores))
            if fresh[top]:
                return top
            stale = np.flatnonzero(available & ~fresh)
            refresh = stale if len(stale) <= size else stale[np.argpartition(-scores[stale], size - 1)[:size]]
            bound[refresh] = gains(refresh)
            fresh[refresh] = True
            size = min(2 * size, block)

    chosen = []
    for _ in range(k):
        pick = best(lambda g: g)
        if quality > 0:
            largest = bound[pick] if bound[pick] > 0 else 1.0
            pick = best(lambda g: (1 - quality) * g / largest + quality * quality_scores)
        chosen.append(pick)
        available[pick] = False
        covered = np.maximum(covered, np.maximum(vectors @ vectors[pick], 0.0))
        fresh[:] = False
    return np.array(chosen, dtype=int)


def _kcenter(config: KCenterConfig, request: SelectionRequest) -> np.ndarray:
    positions = kcenter(_candidate_vectors(request), _unit_scale(request.combined[request.candidates]), request.k, config.quality)
    return request.candidates[positions]


def _facility(config: FacilityConfig, request: SelectionRequest) -> np.ndarray:
    positions = facility_location(_candidate_vectors(request), _unit_scale(request.combined[request.candidates]),
                                  request.k, config.quality)
    return request.candidates[positions]


SELECTORS: dict[type[BaseModel], Callable[[BaseModel, SelectionRequest], np.ndarray]] = {
    TopConfig: _top, BottomConfig: _bottom, RandomConfig: _random, StratifiedConfig: _stratified,
    KCenterConfig: _kcenter, FacilityConfig: _facility,
}
SELECTOR_NAMES: tuple[str, ...] = tuple(cls.model_fields["name"].default for cls in SELECTORS)


def run_selector(config: BaseModel, request: SelectionRequest) -> np.ndarray:
    """The k pool indices ``config`` chooses among ``request.candidates``, in the order chosen."""
    candidates = np.unique(np.asarray(request.candidates, dtype=int))
    if len(candidates) != len(request.candidates):
        raise WeightwiseError("candidates repeat a pool index: pass each eligible example once")
    if len(candidates) and (candidates[0] < 0 or candidates[-1] >= len(request.combined)):
        raise WeightwiseError(f"candidates must be pool indices in [0, {len(request.combined)}): pass indices into the pool")
    if not 1 <= request.k <= len(candidates):
        raise WeightwiseError(f"cannot choose {request.k} of {len(candidates)} candidates: give a budget between 1 and {len(candidates)}")
    try:
        handler = SELECTORS[type(config)]
    except KeyError:
        raise WeightwiseError(f"{type(config).__name__} is not a registered selector: use one of {', '.join(SELECTOR_NAMES)}") from None
    checked = SelectionRequest(candidates, request.k, np.asarray(request.combined, dtype=float), request.strata,
                               request.embeddings, request.seed)
    return np.asarray(handler(config, checked), dtype=int)
