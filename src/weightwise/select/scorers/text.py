"""Pool scorers of the text alone: response length and distance to the nearest k-means prototype."""

from __future__ import annotations

import numpy as np
from scipy.cluster.vq import kmeans2

from weightwise.errors import WeightwiseError
from weightwise.select.pool import PoolExample


def length_scores(config, examples: list[PoolExample], ctx=None) -> np.ndarray:
    """Characters of each response (of the whole text for ``{"text"}`` records)."""
    return np.array([len(ex.response) for ex in examples], dtype=float)


def prototype_distances(embeddings: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """1 − cosine of each row to its nearest k-means centroid (Sorscher et al. 2022), ≥ 0.

    k-means++ then Lloyd (scipy's ``kmeans2``, seeded); k is capped at the number of distinct rows, since
    k-means++ cannot place more centres than there are distinct points.
    """
    data = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    k = min(clusters, len(np.unique(data, axis=0)))
    centroids, _ = kmeans2(data, k, minit="++", seed=np.random.default_rng(seed))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
    return (1 - (data @ centroids.T).max(axis=1)).clip(min=0)


def prototype_scores(config, examples: list[PoolExample], ctx) -> np.ndarray:
    """Distance of each example's sentence embedding (all-MiniLM-L6-v2) to the nearest of ``config.clusters`` prototypes."""
    if ctx.embed is None:
        raise WeightwiseError("prototype needs a sentence embedder: give the scoring context an embed function "
                              "(all-MiniLM-L6-v2, load_model('minilm'))")
    embeddings = np.asarray(ctx.embed([ex.text for ex in examples]), dtype=np.float64)
    return prototype_distances(embeddings, config.clusters, config.seed)
