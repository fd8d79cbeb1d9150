"""Architecture knowledge as data: per model family, which modules are the decoder blocks, which
linear layers are quantization/fine-tuning targets (regexes over module names) and which module
feeds which projections (scaling groups, for AWQ / SmoothQuant scale migration)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightwise.errors import WeightwiseError


@dataclass(frozen=True)
class ScalingGroup:
    """A module whose output reaches only ``linears`` (not the residual stream), with nothing between
    that mixes channels or is nonlinear, so its channel j may be divided by s_j and the linears' input
    column j multiplied by s_j. Names are module paths relative to the block. A group is used only when the linears' input
    width equals the module's output width (so v_proj → o_proj is skipped under grouped-query attention)."""

    previous: str  # a norm (1-D weight) or a linear layer (its output rows)
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """Module-name patterns for one model family (matched with ``re.search``)."""

    blocks: str  # one decoder block, e.g. model.layers.7
    linears: str  # the linear layers inside the blocks that are targets by default
    keep: tuple[str, ...] = ()  # never targets by default (embeddings, lm_head)
    # Encoders see every input framed by the tokenizer's special tokens ([CLS] … [SEP]): calibration windows are too.
    frame_calibration: bool = False
    scaling_groups: tuple[ScalingGroup, ...] = ()  # in the order scales are migrated
    norm_offset: float = 0.0  # the norms compute x̂·(norm_offset + w): Gemma's RMSNorm uses 1 + w


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LIKE = Family(
    blocks=r"^model\.layers\.\d+$",
    linears=r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
    keep=(r"embed_tokens", r"^lm_head$"),
    scaling_groups=(
        ScalingGroup("input_layernorm", _QKV),
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
        ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ),
)
# Gemma 2/3: post_attention_layernorm normalizes the attention *output*; the MLP reads pre_feedforward_layernorm.
_GEMMA_LIKE = Family(
    blocks=_LLAMA_LIKE.blocks,
    linears=_LLAMA_LIKE.linears,
    keep=_LLAMA_LIKE.keep,
    scaling_groups=(
        ScalingGroup("input_layernorm", _QKV),
        ScalingGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
        ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ),
    norm_offset=1.0,
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _GEMMA_LIKE,
    "gemma2": _GEMMA_LIKE,
    "phi3": Family(  # fused projections: no up → down or v → o group
        blocks=r"^model\.layers\.\d+$",
        linears=r"^model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)$",
        keep=(r"embed_tokens", r"^lm_head$"),
        scaling_groups=(
            ScalingGroup("input_layernorm", ("self_attn.qkv_proj",)),
            ScalingGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
    ),
    "bert": Family(  # BertModel (e.g. all-MiniLM-L6-v2); task heads put the encoder under "bert."
        blocks=r"^(bert\.)?encoder\.layer\.\d+$",
        linears=r"^(bert\.)?encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$",
        keep=(r"embeddings\.", r"pooler\."),
        frame_calibration=True,
        # post-norm: each LayerNorm's output is also the residual stream, so only value → output.dense folds
        scaling_groups=(ScalingGroup("attention.self.value", ("attention.output.dense",)),),
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
