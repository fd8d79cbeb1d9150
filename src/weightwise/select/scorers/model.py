"""Model-based scores from one forward pass: loss, EL2N and IFD (pure functions of logits and labels,
plus the batch adapters the registry calls)."""

from __future__ import annotations

import numpy as np
import torch

from weightwise.data.tasks import IGNORE_INDEX
from weightwise.evaluate.perplexity import example_nll, log_probs


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean NLL of the labelled next tokens: ``(B,)``."""
    total, count = example_nll(logits, labels)
    return total / count.clamp(min=1)


def mean_el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean over labelled positions of ‖softmax(logits) − onehot(label)‖₂: ``(B,)``.

    ‖p − e_y‖² = ‖p‖² − 2 p_y + 1, so the one-hot matrix is never built.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    probs = log_probs(logits[:, :-1]).exp()
    p_y = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    norm = ((probs * probs).sum(-1) - 2 * p_y + 1).clamp(min=0).sqrt()
    return (norm * scored).sum(1) / scored.sum(1).clamp(min=1)


def ifd(conditioned_nll: torch.Tensor, unconditioned_nll: torch.Tensor, drop_above_one: bool = True) -> torch.Tensor:
    """NLL(response | prompt) / NLL(response); with ``drop_above_one`` a ratio above 1 becomes NaN, no score
    (Cherry-LLM discards those: the prompt makes the response less likely)."""
    ratio = conditioned_nll / unconditioned_nll.clamp(min=1e-8)
    return torch.where(ratio > 1, torch.full_like(ratio, torch.nan), ratio) if drop_above_one else ratio


def loss_scores(config, batch, state=None) -> np.ndarray:
    forward = batch.conditioned
    return batch.scatter(mean_nll(forward.logits, forward.labels))


def el2n_scores(config, batch, state=None) -> np.ndarray:
    forward = batch.conditioned
    return batch.scatter(mean_el2n(forward.logits, forward.labels))


def ifd_scores(config, batch, state=None) -> np.ndarray:
    conditioned = mean_nll(batch.conditioned.logits, batch.conditioned.labels)
    unconditioned = mean_nll(batch.unconditioned.logits, batch.unconditioned.labels)
    return batch.scatter(ifd(conditioned, unconditioned, config.drop_above_one))
