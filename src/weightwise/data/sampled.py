"""Text sampled from a model itself, for data-free training (LLM-QAT, Liu et al. 2023, arXiv 2305.17888): each
sequence starts with a token drawn uniformly from the vocabulary (after the tokenizer's BOS when it adds one) and
goes on by sampling the model's next-token distribution at a temperature. Every draw comes from one explicit
generator seeded by the caller, so the same model and settings give the same text.

tune's task ``"sampled"`` (tune/api.py) writes these texts as ``{"text"}`` records into its run folder and reads them
back like any text task, so a resumed run trains on the very same text.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

SAMPLED_TASK = "sampled"


@torch.no_grad()
def sample_token_ids(model: nn.Module, prefix: list[int], first_tokens: torch.Tensor, n: int, length: int, *,
                     temperature: float, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, length) int64 ids: ``prefix``, a token drawn uniformly from ``first_tokens``, then ids sampled from
    softmax(logits / ``temperature``) with the key/value cache, ``batch_size`` sequences at a time (eval mode)."""
    device = next(model.parameters()).device
    first_tokens = first_tokens.to(device)
    cache = cache_keyword(model)
    training = model.training
    model.eval()
    try:
        rows = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            first = first_tokens[torch.randint(len(first_tokens), (b, 1), generator=generator, device=device)]
            ids = torch.cat([torch.tensor([prefix], dtype=torch.long, device=device).expand(b, -1), first], dim=1)
            output = model(input_ids=ids, use_cache=True)
            while ids.shape[1] < length:
                probs = torch.softmax(output.logits[:, -1].float() / temperature, dim=-1)
                step = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, step], dim=1)
                if ids.shape[1] < length:
                    output = model(input_ids=step, use_cache=True, **{cache: getattr(output, cache)})
            rows.append(ids[:, :length].cpu())
        return torch.cat(rows)
    finally:
        model.train(training)


def cache_keyword(model: nn.Module) -> str:
    """The name of the key/value cache in the model's forward arguments and outputs: ``cache`` from transformers
    5.24, ``past_key_values`` before (deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_texts(model: nn.Module, tokenizer, n: int, length: int, *, temperature: float, batch_size: int,
                 seed: int) -> list[str]:
    """``n`` texts of about ``length`` tokens sampled from ``model`` (see :func:`sample_token_ids`), each cut at its
    first end-of-sequence token and decoded without special tokens."""
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    special = set(tokenizer.all_special_ids)
    first_tokens = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = sample_token_ids(model, prefix, first_tokens, n, max(length, len(prefix) + 1), temperature=temperature,
                           batch_size=batch_size, generator=generator)
    texts = []
    for row in ids.tolist():
        row = row[len(prefix):]
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
