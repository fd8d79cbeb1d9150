"""Scoring engines: run the prepared batch scorers over the pool's batches and fill their caches.

``local`` scores in this process. ``ray`` (:mod:`weightwise.select.ray_engine`) sends the same batches to
Ray Data actors that each receive the model once; both call :func:`score_batch`, so their scores are equal.
A batch whose examples are all longer than ``max_length`` scores NaN (no score) without running the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightwise.select.batch import ScoringContext
from weightwise.select.cache import ScoreCache
from weightwise.select.pool import PoolExample
from weightwise.select.scorers import ScorerHandler

logger = logging.getLogger(__name__)


@dataclass
class PreparedScorer:
    """A batch scorer ready to run: its config, handler, prepared state, cache and time spent."""

    label: str
    config: Any
    handler: ScorerHandler
    state: Any
    cache: ScoreCache
    seconds: float = 0.0
    scored: int = 0


@dataclass
class ScoringStats:
    """Wall-clock seconds and examples scored per scorer (model loading and preparation counted apart)."""

    seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    prepare_seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoringWork:
    """What an engine runs: the scorers and the batches (each a list of pool examples) still missing a score."""

    scorers: list[PreparedScorer]
    batches: list[list[PoolExample]] = field(default_factory=list)


def pending_work(scorers: list[PreparedScorer], examples: list[PoolExample], batch_size: int) -> ScoringWork:
    """Cut ``examples`` into batches (by text length, then pool order: less padding, and the same cut on every
    run) and keep those that some scorer has not cached yet."""
    ordered = sorted(examples, key=lambda ex: (len(ex.text), ex.index))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    pending = [b for b in batches if any(s.cache.missing([ex.key for ex in b]) for s in scorers)]
    return ScoringWork(scorers, pending)


def score_batch(scorers: list[PreparedScorer], context: ScoringContext, examples: list[PoolExample]) -> dict[str, tuple[np.ndarray, float]]:
    """Scores and seconds of each scorer that still misses some of ``examples``; the batch's model forwards are shared."""
    keys = [ex.key for ex in examples]
    batch = context.batch(examples)
    out = {}
    for scorer in scorers:
        if scorer.cache.missing(keys):
            start = time.perf_counter()
            scores = scorer.handler.score_batch(scorer.config, batch, scorer.state) if batch.fits.any() else batch.scatter([])
            out[scorer.label] = (scores, time.perf_counter() - start)
    return out


def record(scorers: list[PreparedScorer], examples: list[PoolExample], results: dict[str, tuple[np.ndarray, float]]) -> None:
    """Write one batch's results into the scorers' caches (durably) and their timers."""
    keys = [ex.key for ex in examples]
    for scorer in scorers:
        if scorer.label in results:
            scores, seconds = results[scorer.label]
            scorer.cache.add(keys, scores)
            scorer.seconds += seconds
            scorer.scored += len(keys)


def score_local(work: ScoringWork, context: ScoringContext) -> None:
    """Score every pending batch in this process."""
    for done, examples in enumerate(work.batches, start=1):
        record(work.scorers, examples, score_batch(work.scorers, context, examples))
        if done % 10 == 0 or done == len(work.batches):
            logger.info("scored %d of %d batches", done, len(work.batches))
