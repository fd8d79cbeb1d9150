"""Sentence-embedding fidelity of an encoder: how close a quantized copy's embeddings stay to the source's.

The recipe is all-MiniLM-L6-v2's (sentence-transformers): the last hidden states averaged over the
attention mask, then L2-normalised. Any module with the BERT forward signature
(``model(input_ids=..., attention_mask=..., ...)`` returning the hidden states first) works, so the
same harness measures weightwise's and other tools' quantized copies.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from weightwise.errors import WeightwiseError

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraphs(text: str, max_chars: int = 1000) -> list[str]:
    """The non-empty paragraphs of ``text`` (split on blank lines, stripped), each cut to ``max_chars``.

    The cut keeps most paragraphs within MiniLM's 256-token window, so truncation rarely decides a result.
    """
    return [part.strip()[:max_chars] for part in _BLANK_LINE.split(text) if part.strip()]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` (batch, tokens, dim) over the positions where ``attention_mask`` is 1, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    return F.normalize(summed / mask.sum(dim=1).clamp(min=1e-9), dim=-1)


def sentence_embeddings(
    model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256
) -> torch.Tensor:
    """(len(texts), dim) float32 unit vectors: mean-pooled last hidden states, in the order of ``texts``.

    Texts are batched by length (less padding) and truncated to ``max_length`` tokens, [CLS]/[SEP] included.
    """
    if not texts:
        raise WeightwiseError("no texts to embed: pass at least one non-empty text")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            output = model(**encoded)
            rows.append(mean_pool(output[0], encoded["attention_mask"]))
    embeddings = torch.empty(len(texts), rows[0].shape[-1])
    embeddings[torch.tensor(order)] = torch.cat(rows)
    return embeddings


def embedding_cosine(reference_emb: torch.Tensor, candidate_emb: torch.Tensor) -> dict[str, float]:
    """Row-wise cosine similarity of two (n, dim) embedding matrices: its mean, minimum and 5th percentile."""
    if reference_emb.shape != candidate_emb.shape or reference_emb.ndim != 2:
        raise WeightwiseError(f"embeddings must be two (n, dim) matrices of one shape, got "
                              f"{tuple(reference_emb.shape)} and {tuple(candidate_emb.shape)}")
    cosine = F.cosine_similarity(reference_emb.to(torch.float64), candidate_emb.to(torch.float64), dim=-1)
    return {"mean": cosine.mean().item(), "min": cosine.min().item(), "p05": torch.quantile(cosine, 0.05).item()}
