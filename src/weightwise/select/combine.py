"""Weighted rank averaging: several scorers' per-example scores → one combined score in [0, 1].

Scores of different scorers live on unrelated scales (nats, norms, cosines, characters), so each is
replaced by its percentile rank before averaging: only the order within a scorer matters.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from weightwise.errors import WeightwiseError


def percentile_ranks(values: np.ndarray, prefer: str) -> np.ndarray:
    """Rank / (number of scored examples), in (0, 1] with 1 the most preferred end ("high": largest; "low":
    smallest); ties share their average rank; NaN (no score) gets 0, below every scored example."""
    if prefer not in ("high", "low"):
        raise WeightwiseError(f"unknown prefer {prefer!r}: use 'high' or 'low'")
    scored = ~np.isnan(values)
    ranks = np.zeros(len(values))
    if scored.any():
        oriented = values[scored] if prefer == "high" else -values[scored]
        ranks[scored] = rankdata(oriented, method="average") / scored.sum()
    return ranks


def rank_average(scores: dict[str, np.ndarray], weights: dict[str, float], prefer: dict[str, str]) -> np.ndarray:
    """Σ weight·percentile rank / Σ weight over the scorers in ``scores`` (each an (n,) array, NaN = no score).

    One scorer gives its own percentile ranks; the result lies in [0, 1], 1 the most preferred example.
    """
    if not scores:
        raise WeightwiseError("no scores to combine: give at least one scorer")
    if set(weights) != set(scores) or set(prefer) != set(scores):
        raise WeightwiseError(f"weights and prefer must name exactly the scorers {sorted(scores)}: "
                              f"got weights for {sorted(weights)} and prefer for {sorted(prefer)}")
    arrays = {label: np.asarray(values, dtype=float) for label, values in scores.items()}
    shapes = {label: values.shape for label, values in arrays.items()}
    if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        raise WeightwiseError(f"every scorer needs one score per example (equal-length 1-D arrays): got shapes {shapes}")
    bad = [label for label, w in weights.items() if not (np.isfinite(w) and w > 0)]
    if bad:
        raise WeightwiseError(f"scorer {bad[0]} has weight {weights[bad[0]]}: give every scorer a positive weight")
    total = sum(weights.values())
    return sum(weights[label] * percentile_ranks(values, prefer[label]) for label, values in arrays.items()) / total
