"""The one optimisation loop, run by fine-tuning (loop.py: text examples, methods.py's hooks) and by block
tuning (quantize/blocktune.py: a block's output error on cached activations).

Callers own the data and the objective: an iterable of :class:`Step` (each step's micro-batches, as
the caller's own items) and a loss callable on one micro-batch, normalised so that the sum over a step's
micro-batches (and processes) is the step's loss. Hooks (:class:`StepHooks`) own what is trained and
the optimizer. The loop runs each micro-batch's backward, sums the gradients over processes, clips
them, sets the learning rate, steps, refreshes, records and stops on a non-finite loss.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from weightwise.errors import WeightwiseError
from weightwise.comm import Comm

StepCallback = Callable[[dict], None]


class Diverged(WeightwiseError):
    """The loss became NaN or infinite."""


class StepHooks(ABC):
    """What the loop calls on the trainer: its gradients, optimizer update and (optionally) periodic refresh."""

    @abstractmethod
    def gradients(self) -> list[torch.Tensor]:
        """This step's gradients, after the backward passes; the loop sums them over processes and clips them in place."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer update at learning rate ``lr``."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Clear the gradients for the next step."""

    @property
    def refresh_every(self) -> int:
        """Call :meth:`refresh` every this many optimizer steps; 0 = never."""
        return 0

    def refresh(self, index: int) -> dict | None:
        """Recompute what is trained (sparse masks); None when there is nothing to refresh."""
        return None

    def step_metrics(self) -> dict:
        """Numbers of the optimizer step just taken that its record carries (QAT: oscillating and frozen
        fractions); none by default."""
        return {}


class TorchOptimizerHooks(StepHooks):
    """The step hooks of a torch optimizer (``self.optimizer``) whose parameters are the trained tensors."""

    optimizer: torch.optim.Optimizer

    def gradients(self):
        grads = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        return grads

    def step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Step:
    """One optimizer step's data: this process's micro-batches (the loss callable's items), where the step is
    in the data (recorded, e.g. epoch and batch) and how many tokens its global batch holds (throughput)."""

    index: int
    micro_batches: Iterable[Any]
    position: dict
    tokens: int


def clip_(grads: list[torch.Tensor], max_norm: float | None) -> float:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``; returns the norm before."""
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
    if max_norm is not None and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_steps(
    hooks: StepHooks,
    steps: Iterable[Step],
    loss: Callable[[Any], torch.Tensor],
    *,
    total: int,
    learning_rate: Callable[[int], float],
    max_grad_norm: float | None = None,
    comm: Comm | None = None,
    on_step: StepCallback | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict:
    """Run one optimizer step per item of ``steps`` (of ``total`` in the whole run); returns a summary.

    ``loss(item)`` is one micro-batch's loss (backpropagated at once, so one micro-batch's activations live
    at a time). ``on_step(record)`` receives each step's metrics (step, total, loss, lr, grad_norm, the
    step's position, the hooks' :meth:`~StepHooks.step_metrics`, the refresh counts when something was refreshed,
    tokens, tokens_per_second,
    step_seconds, peak_rss_mb); ``after_step(done)`` follows it (checkpoints). A non-finite loss raises
    :class:`Diverged` after its step.
    """
    comm = comm or Comm()
    losses: list[float] = []
    step_seconds: list[float] = []
    total_tokens = 0
    for step in steps:
        started = time.perf_counter()
        step_loss = None
        for item in step.micro_batches:
            value = loss(item)
            value.backward()
            if step_loss is None:
                step_loss = torch.zeros(1, dtype=torch.float32, device=value.device)
            step_loss += value.detach()
        grads = hooks.gradients()
        comm.all_reduce_sum([*grads, step_loss])
        grad_norm = clip_(grads, max_grad_norm)
        lr = learning_rate(step.index)
        hooks.step(lr)
        hooks.zero_grad()
        done = step.index + 1
        record = {"step": done, "total": total, "loss": step_loss.item(), "lr": lr, "grad_norm": grad_norm, **step.position,
                  **hooks.step_metrics()}
        if hooks.refresh_every and done % hooks.refresh_every == 0 and done < total:
            refreshed = hooks.refresh(done // hooks.refresh_every)
            if refreshed is not None:
                record["refresh"] = refreshed
        seconds = time.perf_counter() - started
        total_tokens += step.tokens
        losses.append(record["loss"])
        step_seconds.append(seconds)
        record.update(tokens=step.tokens, tokens_per_second=step.tokens / seconds, step_seconds=seconds,
                      peak_rss_mb=peak_rss_mb())
        if not math.isfinite(record["loss"]):
            raise Diverged(f"the loss became {record['loss']} at step {done}: lower the learning rate or check the data")
        if on_step is not None:
            on_step(record)  # before after_step: a resumed run's log keeps every step up to its checkpoint
        if after_step is not None:
            after_step(done)
    seconds = sum(step_seconds)
    return {
        "steps_run": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "tokens": total_tokens,
        "seconds": seconds,
        "tokens_per_second": total_tokens / seconds if seconds else None,
        "step_seconds_median": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None,
        "peak_rss_mb": peak_rss_mb(),
    }
