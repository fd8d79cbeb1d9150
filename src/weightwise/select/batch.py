"""What scorers read: the scoring context (model, tokenizer, target set, embedder) and one batch of
examples whose model forwards are computed once, on first use, and shared by every scorer of the batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import nn

from weightwise.data.tasks import IGNORE_INDEX, answer_split, collate, encode_example, pad_id
from weightwise.errors import WeightwiseError
from weightwise.select.pool import PoolExample


@dataclass
class Forward:
    """One padded forward pass: logits ``(B, L, V)``, labels ``(B, L)`` (-100 where unscored), the last
    hidden states ``(B, L, D)`` and the attention mask ``(B, L)``."""

    logits: torch.Tensor
    labels: torch.Tensor
    hidden: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class ScoringContext:
    """Everything a scorer may use besides the examples themselves."""

    model: nn.Module | None
    tokenizer: object | None
    targets: list[PoolExample] = field(default_factory=list)
    pool: list[PoolExample] = field(default_factory=list)  # the examples being scored (LESS warms up on a sample)
    max_length: int = 256
    batch_size: int = 16
    embed: Callable[[list[str]], np.ndarray] | None = None  # texts → (n, d) unit vectors (all-MiniLM-L6-v2)

    def batch(self, examples: list[PoolExample]) -> ModelBatch:
        if self.model is None or self.tokenizer is None:
            raise WeightwiseError("model-based scorers need a causal language model and its tokenizer")
        return ModelBatch(self.model, self.tokenizer, examples, self.max_length)

    def batches(self, examples: list[PoolExample]) -> list[ModelBatch]:
        """``examples`` cut into batches of ``batch_size``, in the given order."""
        return [self.batch(examples[i : i + self.batch_size]) for i in range(0, len(examples), self.batch_size)]


class ModelBatch:
    """A batch of examples, encoded as the tune loop encodes them (loss on the response only).

    Examples longer than ``max_length`` are not run; :meth:`scatter` gives them NaN scores.
    """

    def __init__(self, model: nn.Module, tokenizer, examples: list[PoolExample], max_length: int):
        self.model, self.tokenizer, self.examples = model, tokenizer, examples
        encoded = [encode_example(ex.example, tokenizer, max_length) for ex in examples]
        self.fits = np.array([item is not None for item in encoded], dtype=bool)
        self.encoded = [item for item in encoded if item is not None]

    def collated(self, items: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        return collate(self.encoded if items is None else items, pad_id(self.tokenizer))

    def run(self, batch: dict[str, torch.Tensor], grad: bool = False) -> Forward:
        """A forward pass of the model on a collated batch."""
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(grad):
            out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             output_hidden_states=True, use_cache=False)
        return Forward(out.logits, batch["labels"].to(device), out.hidden_states[-1], batch["attention_mask"].to(device))

    @cached_property
    def conditioned(self) -> Forward:
        """The response given its prompt (and history), as trained on."""
        return self.run(self.collated())

    @cached_property
    def unconditioned(self) -> Forward:
        """The response alone, after one start token: the same scored tokens as :attr:`conditioned`."""
        start = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else pad_id(self.tokenizer)]
        items = []
        for ex, fits in zip(self.examples, self.fits):
            if not fits:
                continue
            if isinstance(ex.example, str):
                ids = encode_example(ex.example, self.tokenizer, 10**9)["input_ids"].tolist()
                answer = ids[1:] if ids and ids[0] == start[0] else ids
            else:
                answer = answer_split(self.tokenizer, ex.example)[1]
            items.append({"input_ids": torch.tensor(start + answer), "labels": torch.tensor([IGNORE_INDEX] + answer)})
        return self.run(self.collated(items))

    def scatter(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        """Scores of the examples that fit, spread back to the whole batch (NaN for those that did not)."""
        out = np.full(len(self.examples), np.nan)
        out[self.fits] = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=float)
        return out
