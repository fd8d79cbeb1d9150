"""Minifloat format search (LLM-FP4, Liu et al. 2023, arXiv 2310.16836) as pure tensor math.

For a bit width N, every minifloat split fpN_eEmM (E ≥ 1 exponent bits, M = N − 1 − E ≥ 0
mantissa bits) spends the same N bits differently: more exponent bits resolve small values finely
and reach far (suits heavy-tailed weights), more mantissa bits space the values evenly (suits
flat ones; E1 is an integer grid). A clipping ratio r < 1 trades the largest entries of a group for
a finer grid everywhere else. The search tries every (split, r) on a layer with round-to-nearest
and keeps the pair whose layer-output error tr(ΔW H ΔWᵀ) under the calibration Hessian H is least.
The exponent bias of the paper is absorbed by the per-group scale here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from weightwise.errors import WeightwiseError
from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.formats.quantizer import check_finite, dequantize, from_groups, quantize_tensor, to_groups
from weightwise.formats.registry import get_format
from weightwise.quantize.methods.gptq import output_error


class FPSearchResult(NamedTuple):
    """The winning spec and clipping ratio, every tried pair's output error, and the winner's tensor."""

    spec: QuantSpec
    clip_ratio: float
    errors: dict[str, dict[float, float]]  # format name → clip ratio → tr(ΔW H ΔWᵀ)
    quantized: QuantizedTensor


def minifloat_splits(bits: int) -> list[str]:
    """Registry names of every N-bit minifloat split, fewest exponent bits first (fp4: e1m2, e2m1, e3m0)."""
    if not 2 <= bits <= 8:
        raise WeightwiseError(f"a minifloat search needs 2 to 8 bits, got {bits}")
    return [get_format(f"fp{bits}_e{e}m{bits - 1 - e}").name for e in range(1, bits)]


def clip_groups(weight: torch.Tensor, spec: QuantSpec, ratio: float) -> torch.Tensor:
    """``weight`` with every group (of ``spec``'s layout) clamped to ±ratio × the group's absmax.

    Quantizing the result makes the absmax scale rule store the clipped scale (ratio × absmax / max).
    """
    groups = to_groups(weight.to(torch.float32), spec)
    bound = ratio * torch.nan_to_num(groups, nan=0.0).abs().amax(dim=-1, keepdim=True)
    return from_groups(torch.clamp(groups, -bound, bound), tuple(weight.shape))


def search_fp_format(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    spec_fields: dict,
    clip_grid: Iterable[float],
) -> FPSearchResult:
    """The N-bit minifloat split and clipping ratio with the least output error for ``weight`` (out, in).

    ``spec_fields`` are the QuantSpec fields other than ``format`` (granularity, group_size,
    scale_dtype, pad, pow2_scales), shared by every candidate. The unclipped ratio 1.0 is always
    tried besides ``clip_grid``. Ties go to fewer exponent bits, then to the larger ratio.
    """
    ratios = sorted({float(r) for r in clip_grid} | {1.0}, reverse=True)
    if ratios[-1] <= 0:
        raise WeightwiseError(f"clip ratios must be positive, got {ratios[-1]:g}")
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise WeightwiseError(f"Hessian shape {tuple(hessian.shape)} does not match {weight.shape[1]} input features")
    check_finite(weight)
    w = weight.detach().to(torch.float32)
    errors: dict[str, dict[float, float]] = {}
    best: tuple[float, QuantSpec, float, QuantizedTensor] | None = None
    for name in minifloat_splits(bits):
        spec = QuantSpec(**{**spec_fields, "format": name})
        errors[name] = {}
        for ratio in ratios:
            qt = quantize_tensor(w if ratio == 1.0 else clip_groups(w, spec, ratio), spec)
            error = output_error(w, dequantize(qt), hessian)
            errors[name][ratio] = error
            if best is None or error < best[0]:
                best = (error, spec, ratio, qt)
    _, spec, ratio, qt = best
    return FPSearchResult(spec, ratio, errors, qt)
