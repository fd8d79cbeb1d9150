"""The ``ray`` scoring engine: the pending batches on Ray Data actors, each holding one copy of the model.

The driver puts the in-memory model (as its class, config and state dict: each actor rebuilds it exactly, through
its own ``__init__``), tokenizer, prepared scorer states and batches in the object store once; ``workers`` actors
fetch them once and score one batch per call with
:func:`~weightwise.select.engine.score_batch` (the local engine's code, so the scores are equal). The results
stream back and the driver records each one with :func:`~weightwise.select.engine.record`: the score caches
never leave the driver, are filled batch by batch, and a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.qlinear import QuantizedLinear
from weightwise.select.batch import ScoringContext
from weightwise.select.config import SelectConfig
from weightwise.select.engine import PreparedScorer, ScoringWork, record, score_batch
from weightwise.select.pool import PoolExample

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 300 * 2**20  # of a cluster started here: larger objects (the model) spill to disk


@dataclass(frozen=True)
class PortableModel:
    """What an actor needs to rebuild the driver's model exactly: its class, config, dtype and weights. (The module
    itself is not sent: transformers' forward hooks on a model that has run do not pickle.)"""

    cls: type
    config: Any
    dtype: torch.dtype
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> PortableModel:
        if any(isinstance(module, QuantizedLinear) for module in model.modules()):
            raise WeightwiseError("the ray engine scores float models: use the local engine for a quantized one")
        return cls(type(model), model.config, next(model.parameters()).dtype, model.state_dict())

    def build(self) -> nn.Module:
        model = self.cls(self.config).to(self.dtype)
        model.load_state_dict(self.state)
        return model.eval()


def score_on_ray(work: ScoringWork, context: ScoringContext, config: SelectConfig) -> None:
    """Score every pending batch of ``work`` on ``config.workers`` Ray Data actors, recording results here.

    Joins a running Ray cluster (``ray.init`` called by the caller) and leaves it running; otherwise starts a
    local one and shuts it down afterwards.
    """
    if not work.batches:
        return
    try:
        import ray
        import ray.data
    except ImportError:
        raise WeightwiseError("the ray engine needs Ray: pip install 'weightwise[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=False)
    try:
        _score(ray, work, context, config.workers)
    finally:
        if started:
            ray.shutdown()


def _score(ray, work: ScoringWork, context: ScoringContext, workers: int) -> None:
    """Run the batches on the actors and record each result as it arrives."""
    resources = ray.cluster_resources()
    cpus = _share(resources.get("CPU", 1.0), workers)
    remote_args = {"num_cpus": cpus}
    if context.model is not None and next(context.model.parameters()).is_cuda:
        if resources.get("GPU", 0) <= 0:
            raise WeightwiseError("the model is on a GPU but the Ray cluster has none: move it to the CPU or add GPUs")
        remote_args["num_gpus"] = min(1.0, _share(resources["GPU"], workers))

    jobs = []  # per pending batch: its examples (without the raw records) and the labels of the scorers it misses
    for examples in work.batches:
        keys = [ex.key for ex in examples]
        jobs.append(([dataclasses.replace(ex, record={}) for ex in examples],
                     [s.label for s in work.scorers if s.cache.missing(keys)]))
    scorers = [dataclasses.replace(s, cache=_Unscored(), seconds=0.0, scored=0) for s in work.scorers]
    model = PortableModel.of(context.model) if context.model is not None else None
    payload = ray.put((dataclasses.replace(context, model=None, embed=None, pool=[]), model, scorers, jobs))

    dataset = ray.data.from_items([{"batch": number} for number in range(len(jobs))], override_num_blocks=len(jobs))
    scored = dataset.map_batches(_BatchScorer, batch_size=1, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=workers),
                                 fn_constructor_args=(payload, max(1, int(cpus))), **remote_args)
    left = [len(labels) for _, labels in jobs]
    done = 0
    logger.info("scoring %d batches on %d Ray actors", len(jobs), workers)
    for row in scored.iter_rows():
        number = int(row["batch"])
        result = (np.asarray(row["scores"]), float(row["seconds"]))
        record(work.scorers, work.batches[number], {str(row["label"]): result})
        left[number] -= 1
        if left[number] == 0:
            done += 1
            if done % 10 == 0 or done == len(jobs):
                logger.info("scored %d of %d batches", done, len(jobs))


def _share(total: float, workers: int) -> float:
    """One actor's share of a resource: a fraction below one unit, whole units above (as Ray requires)."""
    share = total / workers
    return share if share < 1 else float(int(share))


class _Unscored:
    """An actor's stand-in for a score cache: the driver asks an actor only for the scores a batch misses."""

    def missing(self, keys: list[str]) -> bool:
        return True


class _BatchScorer:
    """A Ray Data actor: fetches the model, scorers and batches once, then scores one batch per call."""

    def __init__(self, payload, threads: int):
        import ray

        torch.set_num_threads(threads)
        context, model, scorers, jobs = ray.get(payload)
        self.context: ScoringContext = dataclasses.replace(context, model=model.build() if model is not None else None)
        self.scorers: dict[str, PreparedScorer] = {s.label: s for s in scorers}
        self.jobs: list[tuple[list[PoolExample], list[str]]] = jobs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per scorer: the batch number, the scorer's label, its seconds and its scores."""
        (number,) = batch["batch"]
        examples, labels = self.jobs[number]
        results = score_batch([self.scorers[label] for label in labels], self.context, examples)
        return {"batch": np.full(len(results), number), "label": np.array(list(results)),
                "seconds": np.array([seconds for _, seconds in results.values()]),
                "scores": np.stack([scores for scores, _ in results.values()])}
