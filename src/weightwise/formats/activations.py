"""Simulated (fake) quantization of activations, per token, to any registered format.

Activations are not stored, so they are quantized on the fly: each token's feature vector gets its
own fp32 scale by the format's scaling rule (INT8: the largest-magnitude entry lands on code −128;
FP8 E4M3: the absmax maps to 448; asymmetric formats: the token's min/max), is rounded to the
nearest grid value and dequantized again. Formats with a fixed block (MX) scale each run of 32
features of a token instead, with their own E8M0 scale. W8A8 and W4A8 simulations are this function
in front of a quantized weight's matmul.
"""

from __future__ import annotations

from functools import cache

import torch

from weightwise.errors import WeightwiseError
from weightwise.formats.base import NumberFormat, QuantSpec
from weightwise.formats.quantizer import (
    check_finite,
    compute_scales,
    decode_scale,
    from_codes,
    from_groups,
    to_codes,
    to_groups,
)
from weightwise.formats.registry import get_format


@cache
def activation_spec(format_name: str) -> QuantSpec:
    """The spec used for activations in ``format_name``: one fp32 scale per token (row of (tokens, features)),
    or the format's fixed blocks and scale dtype (MX), padded so any feature width works.

    Raises WeightwiseError for an unknown format name.
    """
    fmt = get_format(format_name)
    if fmt.block_size is not None:
        return QuantSpec(format=fmt.name, granularity="group", pad=True)
    return QuantSpec(format=fmt.name, granularity="channel", scale_dtype="fp32")


def token_scales(tokens: torch.Tensor, fmt: NumberFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (scale, offset or None), shape (tokens, 1), by ``fmt``'s scaling rule, as ``compute_scales``
    gives for granularity "channel" with fp32 scales, but from only the statistic the rule needs: one or
    two passes over the activations instead of every group statistic. A non-finite entry raises."""
    offset = None
    if fmt.scaling == "minmax":
        lo, hi = torch.aminmax(tokens, dim=-1, keepdim=True)
        stat, scale = hi - lo, (hi - lo) / (fmt.max_value - fmt.min_value)
    elif fmt.scaling == "signed_absmax":  # the largest-magnitude entry lands on the most negative code
        stat, idx = tokens.abs().max(dim=-1, keepdim=True)
        scale = tokens.gather(-1, idx) / fmt.min_value
    elif fmt.scaling == "absmean":
        stat = scale = tokens.abs().mean(dim=-1, keepdim=True)
    else:
        stat = tokens.abs().amax(dim=-1, keepdim=True)
        scale = stat / fmt.max_abs
    if not torch.isfinite(stat).all():  # NaN and Inf propagate into every statistic above
        bad = int((~torch.isfinite(tokens)).sum())
        raise WeightwiseError(f"activations has {bad} NaN/Inf entries; fix the model or inputs before simulating activation quantization")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if fmt.scaling == "minmax":
        offset = lo - scale * fmt.min_value
    return scale, offset


def fake_quantize_activations(x: torch.Tensor, format_name: str) -> torch.Tensor:
    """Quantize-dequantize ``x`` (..., features) per token in ``format_name``; same shape and dtype as ``x``.

    Under the absmax and min/max rules each token's error is at most half a grid step of its own scale
    (the scale covers the token's range, so nothing saturates; absmean formats do saturate). NaN/Inf entries raise a WeightwiseError. Gradients
    pass straight through (the rounding counts as the identity), so layers before it stay trainable.
    Rounding is the format's own (``nearest_codes``: ties to the lower value, saturation at the ends).
    """
    spec = activation_spec(format_name)
    fmt = spec.number_format
    tokens = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    if fmt.block_size is None:
        scale, offset = token_scales(tokens, fmt)
        y = tokens if offset is None else tokens - offset
        out = fmt.code_values(fmt.nearest_codes(y / scale)) * scale
        out = out if offset is None else out + offset
    else:  # MX: the shared block path (E8M0 scale per 32 entries)
        check_finite(tokens, "activations")
        groups = to_groups(tokens, spec)
        scale, _ = compute_scales(groups, fmt, spec.resolved_scale_dtype)
        scale_f = decode_scale(scale, spec.resolved_scale_dtype)
        out = from_groups(from_codes(to_codes(groups, scale_f, None, fmt), scale_f, None, fmt), tuple(tokens.shape))
    out = out.reshape(x.shape).to(x.dtype)
    return x + (out - x).detach() if x.requires_grad else out
