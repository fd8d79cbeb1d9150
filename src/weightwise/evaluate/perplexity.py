"""Perplexity under the benchmark protocol: the eval text (documents joined by a blank line) is
tokenized as one stream without special tokens (no BOS) and cut into non-overlapping windows (512
tokens by default), the last partial window dropped; every position but the first of each window is
scored, each predicted from its prefix within the window, and ``ppl = exp(mean NLL)`` over all
scored positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weightwise.data.tasks import IGNORE_INDEX
from weightwise.errors import WeightwiseError


def token_windows(tokenizer, text: str, window: int = 512, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` cut into ``(n_windows, window)`` non-overlapping windows.

    ``max_tokens`` caps the tokens used, rounded down to whole windows but never below one window.
    """
    if window < 2:
        raise WeightwiseError(f"window {window} is too small: use a window of at least 2 tokens")
    if max_tokens is not None and max_tokens < 1:
        raise WeightwiseError(f"max_tokens {max_tokens} is not positive: pass a positive count or leave it unset")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // window
    if n_windows == 0:
        raise WeightwiseError(
            f"the text has {len(ids)} tokens, fewer than one window of {window}: pass a longer text or a smaller window"
        )
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // window))
    return torch.tensor(ids[: n_windows * window], dtype=torch.long).view(n_windows, window)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary, computed in float32 whatever the logits' dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def target_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-probability of each target id: ``(..., V)`` and ``(...)`` → ``(...)``."""
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of next-token predictions: position t of ``(B, L, V)`` logits predicts ``labels[:, t+1]``.

    Returns ``(B, L-1)`` float32, 0 where the label is ``IGNORE_INDEX``. The one masked-NLL function: the
    tune loss (:func:`example_nll` summed), perplexity windows (:func:`window_nll`) and the data-selection
    scorers all use it.
    """
    targets = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.view(targets.shape)


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL of the labelled positions and their count: ``(B,)`` float32 and ``(B,)`` int64."""
    scored = labels[:, 1:].to(logits.device) != IGNORE_INDEX
    return token_nll(logits, labels).sum(dim=1), scored.sum(dim=1)


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of tokens 1..L-1, each predicted from its prefix: ``(B, L, V)`` → ``(B, L-1)``."""
    return token_nll(logits, input_ids)


def perplexity(mean_nll: float) -> float:
    """``exp(mean NLL)``; infinite rather than an overflow error for a hopeless model."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf
