"""Running a model for evaluation, and timing its forward pass."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn



@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients; every submodule's train/eval flag restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in flags:
            module.training = training


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, L, V)`` of a Hugging Face causal LM for ``input_ids``, without a KV cache."""
    parameter = next(model.parameters(), None)
    if parameter is not None:
        input_ids = input_ids.to(parameter.device)
    return model(input_ids=input_ids, use_cache=False).logits


class ForwardTimer:
    """Times the forward calls an evaluation makes anyway, so speed costs no extra passes.

    Throughput is the median over calls of tokens / seconds; the first call is left out when there
    are others, since it pays one-time costs (allocations, kernel selection).
    """

    def __init__(self) -> None:
        self.rates: list[float] = []

    @contextlib.contextmanager
    def measure(self, tokens: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.rates.append(tokens / max(time.perf_counter() - start, 1e-9))

    def tokens_per_second(self) -> float | None:
        rates = self.rates[1:] if len(self.rates) > 1 else self.rates
        return statistics.median(rates) if rates else None
