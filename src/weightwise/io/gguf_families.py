"""Model families as llama.cpp architectures: which GGUF architecture a transformers ``model_type`` becomes, how
its tensors change on the way (Q/K row permutation, norm offsets), and the hyperparameters llama.cpp reads.

llama.cpp fixes some choices per architecture that transformers keeps in the config (Gemma's sliding-window
layer pattern, its local rotary base, its attention scale); a config that differs from them is refused rather
than written as a file that would run a different model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import torch
from gguf import GGUFWriter

from weightwise.errors import WeightwiseError


@dataclass(frozen=True)
class GGUFFamily:
    """How one transformers model family becomes a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's llama graph uses interleaved rotary halves: Q/K rows are permuted on conversion
    norm_shift: float = 0.0  # added to every RMSNorm weight: Gemma computes x·(1 + w), llama.cpp x·w
    swa_period: int | None = None  # llama.cpp's fixed pattern: layer i slides unless i % period == period − 1
    softcapping: bool = False  # llama.cpp applies attention and final-logit soft-capping from the config
    large_layers: int | None = None  # the size llama.cpp scales queries by 1/√(hidden/heads) (Gemma 27B), by layer count


GEMMA_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rotary base for Gemma 3's sliding-window layers (not read from the file)

GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GGUFFamily(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3, permute_qk=False),
    "phi3": GGUFFamily(gguf.MODEL_ARCH.PHI3, permute_qk=False),  # fused qkv and gate_up stay fused (attn_qkv, ffn_up)
    "gemma2": GGUFFamily(gguf.MODEL_ARCH.GEMMA2, permute_qk=False, norm_shift=1.0, swa_period=2, softcapping=True,
                         large_layers=46),
    "gemma3_text": GGUFFamily(gguf.MODEL_ARCH.GEMMA3, permute_qk=False, norm_shift=1.0, swa_period=6, large_layers=62),
}
# Not exported: bert (an encoder, not a causal LM for llama.cpp's generation).


def rope_settings(cfg, family: GGUFFamily) -> dict:
    """The rotary parameters llama.cpp reads from the file (of the full-attention layers where they differ)."""
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    if "full_attention" in rope:  # per layer type (Gemma 3): llama.cpp fixes the sliding layers' base
        local = rope.get("sliding_attention", {})
        if local.get("rope_type", "default") != "default" or float(local.get("rope_theta", GEMMA_LOCAL_ROPE_BASE)) != GEMMA_LOCAL_ROPE_BASE:
            raise WeightwiseError(f"the sliding-window layers' rotary settings {local} differ from llama.cpp's fixed "
                                  f"{GEMMA_LOCAL_ROPE_BASE:g} base: this model cannot be exported to GGUF faithfully")
        rope = rope["full_attention"]
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise WeightwiseError(f"rope scaling '{kind}' is not supported by the GGUF exporter yet")
    return {"theta": float(rope["rope_theta"]), "linear_factor": float(rope["factor"]) if kind == "linear" else None}


def write_family_metadata(writer: GGUFWriter, cfg, family: GGUFFamily, head_dim: int) -> None:
    """Write the keys beyond llama's that the family's llama.cpp graph reads, after checking its fixed choices."""
    rope = rope_settings(cfg, family)
    if rope["linear_factor"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["linear_factor"])
    if family.swa_period is None:
        return
    _check_gemma(cfg, family, head_dim)
    writer.add_sliding_window(int(cfg.sliding_window))
    if family.softcapping:
        if cfg.attn_logit_softcapping is not None:
            writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        if cfg.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _check_gemma(cfg, family: GGUFFamily, head_dim: int) -> None:
    """Gemma's choices that llama.cpp hard-codes: the layer pattern, the activation, the query scale, soft-capping."""
    period = family.swa_period
    expected = ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(cfg.num_hidden_layers)]
    layer_types = list(getattr(cfg, "layer_types", None) or expected)
    if layer_types != expected:
        raise WeightwiseError(f"layer_types {layer_types} differ from llama.cpp's fixed pattern (one full-attention layer "
                              f"every {period}): this model cannot be exported to GGUF faithfully")
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        raise WeightwiseError(f"activation '{cfg.hidden_activation}': llama.cpp's Gemma graph uses the tanh GELU only")
    large = cfg.num_hidden_layers == family.large_layers
    used = cfg.hidden_size / cfg.num_attention_heads if large else head_dim  # what llama.cpp scales queries by
    if not math.isclose(float(cfg.query_pre_attn_scalar), used):
        raise WeightwiseError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the {used:g} llama.cpp "
                              f"scales queries by for this size: this model cannot be exported to GGUF faithfully")
    if not family.softcapping and (getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None)):
        raise WeightwiseError("soft-capping is set, but llama.cpp's Gemma 3 graph does not apply it: this model cannot be "
                              "exported to GGUF faithfully")


def permuted_heads(family: GGUFFamily, cfg, name: str) -> int | None:
    """The number of heads whose rows llama.cpp's rotary layout reorders in tensor ``name`` (a Q or K projection's
    weight or bias in a family that permutes them: the attention heads for Q, the KV heads for K), else None."""
    parts = name.split(".")
    projection = parts[-2] if len(parts) >= 2 else ""
    if not family.permute_qk or projection not in ("q_proj", "k_proj"):
        return None
    if projection == "q_proj":
        return cfg.num_attention_heads
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def llama_qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order of convert_hf_to_gguf's Q/K permutation: GGUF row i is HF row order[i]. HF keeps each head's
    rotary pairs in two halves; llama.cpp's RoPE wants them adjacent, so rows (head, 2, dim/2) swap their
    inner axes. K of grouped-query attention uses the number of KV heads."""
    if rows % (2 * n_head):
        raise WeightwiseError(f"{rows} rows do not split into {n_head} heads of an even dimension")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)
