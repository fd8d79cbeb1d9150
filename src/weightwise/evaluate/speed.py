"""Running a model for evaluation, and timing its forward pass."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn

from weightwise.errors import WeightwiseError


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


def forward_tokens_per_second(model: nn.Module, input_ids: torch.Tensor, repeats: int = 3) -> dict:
    """Median wall time of a no-grad forward on ``input_ids`` after one warm-up call, and tokens/s."""
    if repeats < 1:
        raise WeightwiseError(f"repeats {repeats} is not positive: time at least one forward pass")
    times = []
    with eval_mode(model):
        forward_logits(model, input_ids)
        for _ in range(repeats):
            start = time.perf_counter()
            forward_logits(model, input_ids)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "tokens": input_ids.numel(),
        "repeats": repeats,
        "seconds": seconds,
        "tokens_per_second": input_ids.numel() / seconds,
    }
