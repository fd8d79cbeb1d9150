"""``select``: read a pool, drop duplicates and contaminated examples, score the rest, keep a budget.

Steps, each recorded in the output: invalid lines (reported with line numbers), filters (exact / near
duplicates, contamination with evaluation files), scorers (batch scorers cached and resumable, then pool
scorers), weighted rank averaging, the selector. Every example of the input gets a line in
``scored.jsonl`` with its scores, keep/drop and the reason it was dropped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import state_dict_fingerprint
from weightwise.select.batch import ScoringContext
from weightwise.select.cache import ScoreCache
from weightwise.select.combine import rank_average
from weightwise.select.config import SelectConfig
from weightwise.select.engine import PreparedScorer, ScoringStats, pending_work, score_local
from weightwise.select.filters import contaminated, exact_duplicates, near_duplicates
from weightwise.select.pool import Pool, PoolExample, read_pool
from weightwise.select.report import Selection, write_selection
from weightwise.select.scorers import scorer_handler
from weightwise.select.selectors import SelectionRequest, budget_count, run_selector

logger = logging.getLogger(__name__)


def select(
    pool_path: str | Path,
    out: str | Path,
    config: SelectConfig,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Selection:
    """Select examples from the JSONL file ``pool_path`` into the folder ``out`` (scored.jsonl, selected.jsonl,
    report.md, manifest.json). ``model``/``tokenizer`` replace loading ``config.model`` (for the API and tests).

    A killed run resumes from its score cache (``.OUT.score-cache`` beside ``out``) when rerun with the same
    settings; the cache is removed once ``out`` is complete.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise WeightwiseError(f"output {out} already exists: choose another folder or pass overwrite")
    pool = read_pool(pool_path, config.on_error)
    targets = read_pool(config.target, config.on_error, what="target").examples if config.target else []
    reasons = filter_pool(pool, config)
    eligible = [ex for ex in pool.examples if ex.index not in reasons]
    if not eligible:
        raise WeightwiseError(f"the filters dropped all {len(pool)} examples: relax dedup or contamination")
    budget_count(len(eligible), config.budget, config.fraction)  # a budget larger than the pool fails before scoring

    cache_folder = out.with_name(f".{out.name}.score-cache")
    context = ScoringContext(None, None, targets, eligible, config.max_length, config.batch_size)
    if config.needs_model:
        if model is None:
            from weightwise.io.models import load_model

            model, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code)
        if tokenizer is None:
            raise WeightwiseError(f"model {config.model} has no tokenizer: model-based scorers need one")
        context.model, context.tokenizer = model, tokenizer
    fingerprint = state_dict_fingerprint(model) if config.needs_model else None  # guards the score cache
    embeddings = _LazyEmbeddings(pool, eligible)
    context.embed = embeddings.embed

    scores, stats = score_pool(pool, eligible, config, context, cache_folder, fingerprint)
    no_score = {ex.index for ex in eligible for label, values in scores.items() if np.isnan(values[ex.index])}
    for ex in eligible:
        if ex.index in no_score:
            missing = [label for label, values in scores.items() if np.isnan(values[ex.index])]
            reasons[ex.index] = f"no {', '.join(missing)} score (longer than max_length, or not defined for it)"
    candidates = np.array([ex.index for ex in eligible if ex.index not in no_score], dtype=int)
    if len(candidates) == 0:
        raise WeightwiseError("no example received every score: raise max_length or check the scorers' requirements")
    k = budget_count(len(candidates), config.budget, config.fraction)

    combined = np.full(len(pool), np.nan)
    if scores:
        weights = {s_label: s.weight for s_label, s in zip(scores, config.scorers)}
        prefer = {s_label: s.prefer for s_label, s in zip(scores, config.scorers)}
        combined[candidates] = rank_average({lbl: v[candidates] for lbl, v in scores.items()}, weights, prefer)
    strata = None
    if getattr(config.selector, "needs_strata", False):
        field_name = config.selector.field
        strata = [str(ex.record.get(field_name, "")) for ex in pool.examples]
    request = SelectionRequest(candidates=candidates, k=k, combined=np.nan_to_num(combined, nan=-1.0), strata=strata,
                               embeddings=embeddings.all if getattr(config.selector, "needs_embeddings", False) else None,
                               seed=config.seed)
    chosen = run_selector(config.selector, request)
    selection = Selection(pool=pool, config=config, scores=scores, combined=combined, chosen=chosen, reasons=reasons,
                          candidates=candidates, stats=stats, seconds=time.perf_counter() - started,
                          model_fingerprint=fingerprint)
    write_selection(selection, out, overwrite=overwrite)
    shutil.rmtree(cache_folder, ignore_errors=True)
    return selection


def filter_pool(pool: Pool, config: SelectConfig) -> dict[int, str]:
    """Pool index → why it is dropped, for duplicates and contaminated examples (before any scoring)."""
    texts = [ex.text for ex in pool.examples]
    lines = [ex.line for ex in pool.examples]
    reasons: dict[int, str] = {}
    if config.dedup != "none":
        for dropped, kept in exact_duplicates(texts).items():
            reasons[dropped] = f"exact duplicate of line {lines[kept]}"
    if config.dedup == "near":
        remaining = [i for i in range(len(texts)) if i not in reasons]
        near = near_duplicates([texts[i] for i in remaining], threshold=config.near_threshold)
        for dropped, (kept, jaccard) in near.items():
            reasons[remaining[dropped]] = f"near duplicate of line {lines[remaining[kept]]} (Jaccard ≈ {jaccard:.2f})"
    for path in config.contamination:
        eval_texts = [ex.text for ex in read_pool(path, config.on_error, what="contamination").examples]
        for index, why in contaminated(texts, eval_texts, n=config.contamination_ngram).items():
            reasons.setdefault(index, f"contaminated: {why} of {Path(path).name}")
    return reasons


def score_pool(pool: Pool, eligible: list[PoolExample], config: SelectConfig, context: ScoringContext,
               cache_folder: Path, fingerprint: str | None) -> tuple[dict[str, np.ndarray], ScoringStats]:
    """Per scorer label, the scores of every pool index (NaN where not scored); batch scorers run through the
    engine with their caches (keyed by the model's ``fingerprint``), pool scorers on the eligible examples."""
    labels = _labels(config)
    stats = ScoringStats()
    scores: dict[str, np.ndarray] = {}
    prepared: list[PreparedScorer] = []
    for label, scorer in zip(labels, config.scorers):
        handler = scorer_handler(scorer)
        start = time.perf_counter()
        if scorer.kind == "pool":
            values = handler.score_pool(scorer, eligible, context)
            stats.seconds[label] = time.perf_counter() - start
            stats.examples[label] = len(eligible)
            scores[label] = _spread(len(pool), eligible, values)
            continue
        state = handler.prepare(scorer, context) if handler.prepare else None
        stats.prepare_seconds[label] = time.perf_counter() - start
        settings = {"scorer": scorer.key(), "model": fingerprint, "max_length": config.max_length,
                    "targets": [ex.key for ex in context.targets] if scorer.needs_target else None,
                    "pool": _digest(ex.key for ex in eligible) if scorer.reads_pool else None}
        prepared.append(PreparedScorer(label, scorer, handler, state, ScoreCache(cache_folder, scorer.name, settings)))
    if prepared:
        work = pending_work(prepared, eligible, config.batch_size)
        for scorer in prepared:
            stats.reused[scorer.label] = sum(key in scorer.cache.scores for key in {ex.key for ex in eligible})
        if config.engine == "ray":
            from weightwise.select.ray_engine import score_on_ray

            score_on_ray(work, context, config)
        else:
            score_local(work, context)
        for scorer in prepared:
            stats.seconds[scorer.label] = scorer.seconds
            stats.examples[scorer.label] = scorer.scored
            scores[scorer.label] = _spread(len(pool), eligible, scorer.cache.lookup([ex.key for ex in eligible]))
    return {label: scores[label] for label in labels}, stats


def _labels(config: SelectConfig) -> list[str]:
    """A unique label per scorer: its name, with #2, #3… for repeats."""
    labels, seen = [], {}
    for scorer in config.scorers:
        seen[scorer.name] = seen.get(scorer.name, 0) + 1
        labels.append(scorer.name if seen[scorer.name] == 1 else f"{scorer.name}#{seen[scorer.name]}")
    return labels


def _digest(keys) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _spread(n: int, examples: list[PoolExample], values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[[ex.index for ex in examples]] = np.asarray(values, dtype=float)
    return out


class _LazyEmbeddings:
    """all-MiniLM-L6-v2 unit embeddings, computed on first use and once per text (the prototype scorer and the
    diversity selectors share them)."""

    def __init__(self, pool: Pool, eligible: list[PoolExample]):
        self.pool, self.eligible = pool, eligible
        self._encoder = None
        self._known: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        from weightwise.evaluate.embeddings import sentence_embeddings

        new = list(dict.fromkeys(t for t in texts if t not in self._known))
        if new:
            if self._encoder is None:
                from weightwise.io.models import load_model

                self._encoder = load_model("minilm")
            encoder, tokenizer = self._encoder
            self._known.update(zip(new, sentence_embeddings(encoder, tokenizer, new).numpy()))
        return np.stack([self._known[t] for t in texts])

    def all(self) -> np.ndarray:
        """(n_pool, d) embeddings indexed by pool index; rows of filtered-out examples are zero (never chosen)."""
        vectors = self.embed([ex.text for ex in self.eligible])
        out = np.zeros((len(self.pool), vectors.shape[1]), dtype=vectors.dtype)
        out[[ex.index for ex in self.eligible]] = vectors
        return out
