"""Architecture knowledge as data: per model family, which modules are the decoder blocks and which
linear layers are quantization/fine-tuning targets (regexes over module names)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightwise.errors import WeightwiseError


@dataclass(frozen=True)
class Family:
    """Module-name patterns for one model family (matched with ``re.search``)."""

    blocks: str  # one decoder block, e.g. model.layers.7
    linears: str  # the linear layers inside the blocks that are targets by default
    keep: tuple[str, ...] = ()  # never targets by default (embeddings, lm_head)


_LLAMA_LIKE = Family(
    blocks=r"^model\.layers\.\d+$",
    linears=r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
    keep=(r"embed_tokens", r"^lm_head$"),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": Family(
        blocks=r"^model\.layers\.\d+$",
        linears=r"^model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)$",
        keep=(r"embed_tokens", r"^lm_head$"),
    ),
}


def family_of(model_type: str) -> Family:
    """The family of a transformers ``config.model_type``; a clear error for unknown ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise WeightwiseError(
            f"architecture '{model_type}' is not supported (supported: {', '.join(sorted(FAMILIES))}); "
            "name the target layers with --targets PATTERN to quantize it anyway"
        ) from None


def matches(name: str, patterns) -> bool:
    """True when ``name`` matches any of the regex ``patterns`` (``re.search``)."""
    return any(re.search(p, name) for p in patterns)
