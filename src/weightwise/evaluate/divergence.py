"""How far a candidate's next-token distributions are from a reference's, position by position."""

from __future__ import annotations

import torch

from weightwise.evaluate.perplexity import log_probs


def kl_from_log_probs(reference_log_probs: torch.Tensor, candidate_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ candidate) per position from log-probabilities ``(..., V)`` → ``(...)``.

    Vocabulary entries the reference gives probability 0 contribute 0 (not NaN).
    """
    p = reference_log_probs.exp()
    terms = torch.where(p > 0, p * (reference_log_probs - candidate_log_probs), torch.zeros_like(p))
    return terms.sum(-1)


def kl_divergence(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ candidate) per position from two logit tensors, log-softmax in float32."""
    return kl_from_log_probs(log_probs(reference_logits), log_probs(candidate_logits))


def top1_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """Whether both put their highest logit on the same token, per position (bool)."""
    return reference_logits.argmax(-1) == candidate_logits.argmax(-1)
