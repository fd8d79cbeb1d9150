"""Scale migration as pure tensor math: AWQ (Lin et al. 2023, arXiv 2306.00978) and SmoothQuant
(Xiao et al. 2022, arXiv 2211.10438).

Linear layers that read the same input x can have their input channels rescaled: W → W·diag(s)
while the module producing x divides its output channel j by s_j, so x·Wᵀ = (x/s)·(W·diag(s))ᵀ and
the float network is unchanged. Quantization is not scale-invariant, though: AWQ searches s so that
the salient input channels (large |x|) get finer weight grids; SmoothQuant picks s to move activation
outliers into the weights before activations are quantized. AWQ also shrinks each group's range
("clip search") where rounding the outliers coarsely costs less output error than a coarser grid.

Every error here is the layer-output error tr(ΔW H ΔWᵀ) with H = XᵀX / n (see ``gptq.output_error``),
so the search needs only calibration statistics, not forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.formats.base import QuantSpec
from weightwise.formats.quantizer import (
    compute_ratio_scales,
    compute_scales,
    decode_scale,
    from_codes,
    from_groups,
    group_layout,
    ratio_group_scales,
    to_codes,
    to_groups,
)
from weightwise.quantize.methods.gptq import output_error

_REL_FLOOR = 1e-5  # statistics below this fraction of their maximum are raised to it (dead channels)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float32 ``dequantize(quantize_tensor(weight, spec))`` without packing the codes: the searches'
    inner loop, about twice as fast (``weight`` is assumed finite)."""
    fmt, dtype = spec.number_format, spec.resolved_scale_dtype
    groups = to_groups(weight.detach().to(torch.float32), spec)
    if spec.pow2_scales == "ratio":
        scale, shifts, offset = compute_ratio_scales(groups, fmt, dtype)
        scale = ratio_group_scales(scale, shifts, dtype)
    else:
        scale, offset = compute_scales(groups, fmt, dtype, spec.pow2_scales)
        scale = decode_scale(scale, dtype)
    offset = None if offset is None else decode_scale(offset, dtype)
    return from_groups(from_codes(to_codes(groups, scale, offset, fmt), scale, offset, fmt), tuple(weight.shape))


def _ranking_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) as ``gptq.output_error`` but in float32: ~3× faster, enough to rank candidates."""
    e = weight.to(torch.float32) - approx.to(torch.float32)
    return float(((e @ hessian.to(torch.float32)) * e).sum())


def _floored(x: torch.Tensor) -> torch.Tensor:
    """``x`` (non-negative) with entries raised to a small fraction of its max, so powers and quotients stay finite."""
    x = x.to(torch.float32)
    return x.clamp_min(max(float(x.max()) * _REL_FLOOR, torch.finfo(torch.float32).tiny))


def weight_magnitude(weights: Sequence[torch.Tensor], specs: Sequence[QuantSpec]) -> torch.Tensor:
    """Per input channel: mean over the output rows of all ``weights`` of |W| relative to the absmax of
    its scale group (AWQ's weight statistic: how large a channel is on its group's grid)."""
    total = torch.zeros(weights[0].shape[1], device=weights[0].device)
    rows = 0
    for weight, spec in zip(weights, specs):
        groups = torch.nan_to_num(to_groups(weight.detach().abs().to(torch.float32), spec), nan=0.0)
        relative = groups / groups.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        total += from_groups(relative, tuple(weight.shape)).sum(dim=0)
        rows += weight.shape[0]
    return total / rows


def _specs(spec: QuantSpec | Sequence[QuantSpec], n: int) -> list[QuantSpec]:
    specs = [spec] * n if isinstance(spec, QuantSpec) else list(spec)
    if len(specs) != n:
        raise WeightwiseError(f"AWQ: {len(specs)} specs for {n} weights")
    return specs


def scaled_error(weights: Sequence[torch.Tensor], hessian: torch.Tensor, specs: Sequence[QuantSpec], scales: torch.Tensor) -> float:
    """Σ_layers tr(ΔW H ΔWᵀ) with ΔW = W − RTN(W·diag(s))·diag(1/s): the output error after migrating ``scales``."""
    return sum(_ranking_error(w, fake_quantize(w * scales, spec) / scales, hessian) for w, spec in zip(weights, specs))


def search_scales(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    act_abs_mean: torch.Tensor,
    spec: QuantSpec | Sequence[QuantSpec],
    grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[torch.Tensor, dict]:
    """AWQ's per-input-channel scales for linears sharing one input (H, mean |x| per channel).

    Candidates: s = 1 (plain RTN) and, for α = 0, 1/grid, …, (grid−1)/grid, s = mean|x|^α, or with
    ``duo_scaling`` s = mean|x|^α / w^(1−α) with w from :func:`weight_magnitude`; each normalised to
    s / sqrt(max s · min s). The candidate with the least :func:`scaled_error` (float32) wins, ties
    keeping s = 1, so the result is never worse than RTN on this objective. ``spec`` may be one per weight.

    Returns (scales, diagnostics {"alpha": the chosen α or None for s = 1, "error", "rtn_error"}).
    """
    if grid < 1:
        raise WeightwiseError(f"AWQ: grid must be a positive integer, got {grid}")
    specs = _specs(spec, len(weights))
    weights = [w.detach().to(torch.float32) for w in weights]
    x_mag = _floored(act_abs_mean)
    w_mag = _floored(weight_magnitude(weights, specs)) if duo_scaling else None
    best_scales = torch.ones_like(x_mag)
    rtn_error = best_error = scaled_error(weights, hessian, specs, best_scales)
    best_alpha = None
    for i in range(grid):
        alpha = i / grid
        if alpha == 0 and not duo_scaling:
            continue  # s = 1, already measured
        s = x_mag.pow(alpha) / w_mag.pow(1 - alpha) if duo_scaling else x_mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = scaled_error(weights, hessian, specs, s)
        if error < best_error:
            best_alpha, best_error, best_scales = alpha, error, s
    return best_scales, {"alpha": best_alpha, "error": best_error, "rtn_error": rtn_error}


def group_errors(error: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Output error of each scale group (R, G) of a weight error ΔW (rows, cols).

    Per group: Δw_g H_gg Δw_gᵀ with H_gg the block of H on the group's columns (the block-diagonal of
    H: cross-group terms are left out). Per-channel groups use the whole H (exact per row); the
    per-tensor group sums every row. Computed in float32 (it ranks candidates).
    """
    rows, cols = error.shape
    e, h = error.to(torch.float32), hessian.to(torch.float32)
    if spec.granularity != "group":
        per_row = ((e @ h) * e).sum(dim=1, keepdim=True)
        return per_row.sum().reshape(1, 1) if spec.granularity == "tensor" else per_row
    _, G, g = group_layout((rows, cols), spec)
    pad = G * g - cols
    e = torch.nn.functional.pad(e, (0, pad)).reshape(rows, G, g)
    h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    blocks = h.reshape(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, g, g)
    return torch.einsum("rgi,gij,rgj->rg", e, blocks, e)


def clamp_groups(weight: torch.Tensor, spec: QuantSpec, ratios: torch.Tensor | float) -> torch.Tensor:
    """``weight`` with each scale group clamped to ``ratios`` (R, G) times its range: [r·min, r·max] for
    asymmetric formats, ±r·absmax otherwise (rounding the clamped weight then uses the shrunk scale)."""
    w = weight.detach().to(torch.float32)
    groups = to_groups(w, spec)
    valid = ~torch.isnan(groups)
    lo = torch.where(valid, groups, torch.inf).amin(dim=-1)
    hi = torch.where(valid, groups, -torch.inf).amax(dim=-1)
    if not spec.number_format.asymmetric:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    ratios = torch.as_tensor(ratios, dtype=torch.float32, device=groups.device)
    clamped = groups.clamp((lo * ratios).unsqueeze(-1), (hi * ratios).unsqueeze(-1))
    return from_groups(clamped, tuple(w.shape))


def search_clip(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's clip search: per scale group, the range ratio r in ``grid`` steps from 1 down to
    1 − ``max_shrink`` whose round-to-nearest has the least output error (:func:`group_errors`, the
    block-diagonal of H), for any format and granularity.

    Returns (``weight`` clamped to the chosen ranges, ratios (R, G)). When the chosen clamps are not
    better on the full objective tr(ΔW H ΔWᵀ) than no clipping (possible through the cross-group terms
    or scales shared across groups), ``weight`` is returned unchanged with ratios 1.
    """
    if grid < 1 or not 0 <= max_shrink < 1:
        raise WeightwiseError(f"clip search: need grid ≥ 1 and 0 ≤ max_shrink < 1, got {grid} and {max_shrink}")
    w = weight.detach().to(torch.float32)
    R, G, _ = group_layout(tuple(w.shape), spec)
    best_ratio = torch.ones(R, G, device=w.device)
    best_error = torch.full((R, G), torch.inf, device=w.device)
    for ratio in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        error = group_errors(w - fake_quantize(clamp_groups(w, spec, ratio), spec), hessian, spec)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, ratio, best_ratio)
    clipped = clamp_groups(w, spec, best_ratio)
    if output_error(w, fake_quantize(clipped, spec), hessian) > output_error(w, fake_quantize(w, spec), hessian):
        return w, torch.ones(R, G, device=w.device)
    return clipped, best_ratio


def clip_summary(ratios: torch.Tensor) -> dict:
    """Mean and minimum clip ratio and the fraction of groups clipped (ratio < 1), for the layer record."""
    return {"mean_ratio": float(ratios.mean()), "min_ratio": float(ratios.min()),
            "clipped_fraction": float((ratios < 1).to(torch.float32).mean())}


def smoothquant_scales(act_abs_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_:,j|^(1−α), the weight max taken over every linear reading x."""
    if not 0 <= alpha <= 1:
        raise WeightwiseError(f"SmoothQuant: alpha must lie in [0, 1], got {alpha}")
    w_max = torch.stack([w.detach().abs().to(torch.float32).amax(dim=0) for w in weights]).amax(dim=0)
    return _floored(act_abs_max).pow(alpha) / _floored(w_max).pow(1 - alpha)


def fold_scales(previous: nn.Module, linears: Sequence[nn.Module], scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Migrate ``scales`` in place: divide ``previous``'s output channel j by s_j, multiply the
    ``linears``' input column j by s_j; the composed float function is unchanged.

    ``previous`` is a norm (1-D weight computing x̂·(norm_offset + w), and an optional bias) or a
    linear layer (its weight rows and bias).
    """
    s = scales.detach().to(torch.float32)
    with torch.no_grad():
        w = previous.weight
        if w.shape[0] != s.numel() or any(lin.weight.shape[1] != s.numel() for lin in linears):
            raise WeightwiseError(f"cannot fold {s.numel()} scales into weights of shapes "
                                  f"{[tuple(w.shape)] + [tuple(lin.weight.shape) for lin in linears]}")
        if w.ndim == 1:
            w.copy_((w.to(torch.float32) + norm_offset) / s - norm_offset)
        else:
            w.copy_(w.to(torch.float32) / s.unsqueeze(1))
        if getattr(previous, "bias", None) is not None:
            previous.bias.copy_(previous.bias.to(torch.float32) / s)
        for lin in linears:
            lin.weight.copy_(lin.weight.to(torch.float32) * s)


def scale_stats(stats: dict, scales: torch.Tensor) -> dict:
    """Input statistics of a linear after its inputs became x / s: H → diag(1/s) H diag(1/s),
    mean |x| and max |x| → divided by s; other entries are kept."""
    inv = 1.0 / scales.to(torch.float32)
    out = dict(stats)
    out["hessian"] = stats["hessian"] * inv.unsqueeze(0) * inv.unsqueeze(1)
    for key in ("act_abs_mean", "act_abs_max"):
        if key in stats:
            out[key] = stats[key] * inv
    return out
