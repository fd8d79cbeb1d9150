"""Scores of likeness to the target set: RDS (hidden-state cosine) and DSIR (hashed n-gram importance weights).

DSIR is written here rather than taken from the ``data-selection`` package (the paper's code): its
``HashedNgramDSIR`` reads datasets from file paths, makes a cache directory when constructed, writes the
importance weights as ``.npy`` shards, fits and scores through a joblib process pool and needs nltk's
tokenizer, while the estimator itself is a bincount and a dot product over examples already in memory.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F

from weightwise.errors import WeightwiseError
from weightwise.evaluate.embeddings import mean_pool
from weightwise.select.pool import PoolExample

_WORD = re.compile(r"\w+|[^\w\s]+")  # words and runs of punctuation, as nltk's WordPunctTokenizer splits them


# --- RDS ------------------------------------------------------------------------------------------


def prepare_rds(config, ctx) -> torch.Tensor:
    """The unit mean of the target examples' mean-pooled last hidden states (prompt and response tokens)."""
    if not ctx.targets:
        raise WeightwiseError("rds needs a target set: pass target examples of the task the selection is for")
    pooled = [mean_pool(b.conditioned.hidden, b.conditioned.attention_mask) for b in ctx.batches(ctx.targets) if b.fits.any()]
    if not pooled:
        raise WeightwiseError(f"rds: every target example is longer than max_length={ctx.max_length} tokens: raise max_length")
    return F.normalize(torch.cat(pooled).mean(0), dim=0)


def rds_scores(config, batch, state: torch.Tensor) -> np.ndarray:
    """Cosine of each example's mean-pooled last hidden state to the target direction (Ivison et al. 2025)."""
    forward = batch.conditioned
    return batch.scatter(mean_pool(forward.hidden, forward.attention_mask) @ state.to(forward.hidden.device))


# --- DSIR -----------------------------------------------------------------------------------------


def ngram_buckets(text: str, ngrams: int, buckets: int) -> np.ndarray:
    """The hash bucket of every 1- to ``ngrams``-gram of the lowercased words of ``text``, one per occurrence.

    The hash is an unkeyed BLAKE2b of the n-gram, so buckets are the same in every process and run
    (Python's ``hash`` of a string is salted per process).
    """
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    return np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % buckets
                     for g in grams], dtype=np.int64)


def log_multinomial(bucket_lists: list[np.ndarray], buckets: int) -> np.ndarray:
    """Log-probabilities of the hashed n-gram multinomial of a set of texts, add-one smoothed: ``(buckets,)``.

    Add-one rather than the reference code's 1e-8 floor on the probabilities, under which each n-gram that a
    small target set lacks costs about 18 nats, so that the count of unseen n-grams alone decides the rank.
    """
    counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *bucket_lists]), minlength=buckets) + 1.0
    return np.log(counts / counts.sum())


def importance(bucket_lists: list[np.ndarray], log_target: np.ndarray, log_pool: np.ndarray) -> np.ndarray:
    """log p_target(x) − log p_pool(x) = Σ counts · (log p_target − log p_pool) for each example."""
    diff = log_target - log_pool
    return np.array([diff[b].sum() for b in bucket_lists], dtype=float)


def dsir_scores(config, examples: list[PoolExample], ctx) -> np.ndarray:
    """DSIR importance weights (Xie et al. 2023) of the pool's texts, the target and pool models fitted on
    the target set's and the pool's texts."""
    if not ctx.targets:
        raise WeightwiseError("dsir needs a target set: pass target examples of the task the selection is for")
    pool = [ngram_buckets(ex.text, config.ngrams, config.buckets) for ex in examples]
    target = [ngram_buckets(ex.text, config.ngrams, config.buckets) for ex in ctx.targets]
    return importance(pool, log_multinomial(target, config.buckets), log_multinomial(pool, config.buckets))
