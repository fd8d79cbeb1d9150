"""The math of quantization-aware training (qat.py wires it), as pure tensor functions on weight groups (R, G, g).

- Fake quantization with a straight-through estimator: the forward value is exactly what dequantizing the
  nearest codes gives (``code · s + o``), the backward pass treats rounding as the identity inside the grid and
  cuts the gradient of clipped entries; scales and offsets get LSQ/LSQ+'s gradients (Esser et al. 2019,
  Bhalgat et al. 2020), scaled by g = 1/√(group size · largest code).
- :func:`fake_quant_linear`: a Linear on the fake-quantized weight whose backward recomputes that weight and its
  straight-through graph from the latent weight (per layer, one at a time) instead of keeping them from the
  forward: a step holds the activations, not several float copies of every weight.
- Oscillations (Nagel et al. 2022, arXiv 2203.11086): a weight oscillates at a step when its code changes in the
  direction opposite to its previous change; its frequency is a moving average of that event. Weights whose
  frequency passes a threshold are frozen at their moving-average code, and a dampening loss pulls latent
  weights towards their bin centre.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weightwise.formats.base import NumberFormat, QuantSpec
from weightwise.formats.quantizer import (
    decode_scale,
    encode_scale,
    from_codes,
    from_groups,
    group_layout,
    to_codes,
    to_groups,
)


def lsq_gradient_scale(spec: QuantSpec, shape: tuple[int, int]) -> float:
    """LSQ's gradient scale of a group's scale and offset: 1/√(entries per group · largest code)."""
    entries = group_layout(shape, spec)[2]
    return 1.0 / math.sqrt(entries * max(spec.number_format.max_value, 1.0))


def straight_through(x: torch.Tensor, value: torch.Tensor, gradient_scale: float = 1.0) -> torch.Tensor:
    """Exactly ``value`` forward (``x − x`` adds an exact zero); backward, ``gradient_scale`` × the identity into ``x``."""
    return (x - x.detach()) * gradient_scale + value


def storage_rounded(x: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """float32 ``x`` as stored in ``scale_dtype`` and read back (what a saved run dequantizes with)."""
    return decode_scale(encode_scale(x, scale_dtype), scale_dtype)


def grid_codes(groups: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: NumberFormat,
               frozen: torch.Tensor | None, frozen_codes: torch.Tensor | None) -> torch.Tensor:
    """The codes (uint8, like ``groups``) of the latent weights: the nearest ones under ``scales``/``offsets`` (R, G),
    the frozen code where ``frozen`` (None: nothing is frozen)."""
    codes = to_codes(groups.detach(), scales.detach(), None if offsets is None else offsets.detach(), fmt)
    return codes if frozen is None else torch.where(frozen, frozen_codes, codes)


def fake_quantize(groups: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: NumberFormat,
                  codes: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
    """The weight groups dequantized from ``codes`` (``code · s + o``, the very operations of dequantization), with
    straight-through gradients: into a latent weight inside the grid's range (not a clipped or frozen one), and LSQ's
    into the scales and offsets (round(y) − y inside the range, the grid's end outside; offsets 0 inside, 1 outside)."""
    y = groups if offsets is None else groups - offsets.unsqueeze(-1)
    inside = (y / scales.unsqueeze(-1)).clamp(fmt.min_value, fmt.max_value)
    if frozen is not None:
        inside = inside.masked_fill(frozen, 0.0)
    x = straight_through(inside, fmt.code_values(codes)) * scales.unsqueeze(-1)
    return x if offsets is None else x + offsets.unsqueeze(-1)


def dampening_loss(groups: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: NumberFormat,
                   codes: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
    """Σ over the unfrozen weights of (clip(w) − its bin centre)², in units of the group's scale: zero at the bin
    centres; its gradient moves the latent weights only (scales, offsets and centres are constants)."""
    y = groups if offsets is None else groups - offsets.detach().unsqueeze(-1)
    y = (y / scales.detach().unsqueeze(-1)).clamp(fmt.min_value, fmt.max_value)
    distance = y - fmt.code_values(codes)
    return (distance if frozen is None else distance.masked_fill(frozen, 0.0)).square().sum()


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                      bias: torch.Tensor | None, spec: QuantSpec, frozen: torch.Tensor | None = None,
                      frozen_codes: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W_q, bias)`` with ``W_q`` the latent ``weight`` (out, in) dequantized from its codes under
    ``scales``/``offsets`` (R, G) exactly as a saved run dequantizes, and :func:`fake_quantize`'s gradients into
    ``weight``, ``scales`` and ``offsets``. Only ``x`` is kept for backward besides the inputs themselves: backward
    recomputes the codes, ``W_q`` and the straight-through graph (the latent weight does not change between the two)."""
    return _FakeQuantLinear.apply(x, weight, scales, offsets, bias, spec, frozen, frozen_codes)


class _FakeQuantLinear(torch.autograd.Function):
    """:func:`fake_quant_linear`: forward saves its inputs only; backward recomputes."""

    @staticmethod
    def forward(ctx, x, weight, scales, offsets, bias, spec, frozen, frozen_codes):
        ctx.spec = spec
        ctx.save_for_backward(x, weight, scales, offsets, bias, frozen, frozen_codes)
        quantized, _ = _dequantized(weight, scales, offsets, spec, frozen, frozen_codes)
        return F.linear(x, quantized.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scales, offsets, bias, frozen, frozen_codes = ctx.saved_tensors
        needs_x, needs_weight, needs_scales, needs_offsets, needs_bias = ctx.needs_input_grad[:5]
        spec = ctx.spec
        quantized, codes = _dequantized(weight, scales, offsets, spec, frozen, frozen_codes)
        grad_x = grad_out @ quantized.to(grad_out.dtype) if needs_x else None
        grad_bias = grad_out.flatten(0, -2).sum(0).to(bias.dtype) if needs_bias else None
        grads = [None, None, None]
        wanted = [needs_weight, needs_scales, offsets is not None and needs_offsets]
        if any(wanted):
            grad_quantized = (grad_out.flatten(0, -2).T @ x.flatten(0, -2)).to(torch.float32)
            inputs = [t.detach().requires_grad_(want) for t, want in zip((weight, scales, offsets), wanted) if t is not None]
            with torch.enable_grad():
                latent = inputs[0]
                graph = fake_quantize(to_groups(latent, spec), inputs[1], inputs[2] if offsets is not None else None,
                                      spec.number_format, codes, frozen)
                chosen = [t for t, want in zip(inputs, wanted) if want]
                found = iter(torch.autograd.grad(from_groups(graph, tuple(weight.shape)), chosen, grad_quantized))
            grads = [next(found) if want else None for want in wanted]
        return grad_x, *grads, grad_bias, None, None, None


def _dequantized(weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, spec: QuantSpec,
                 frozen: torch.Tensor | None, frozen_codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float32 weight dequantized from the latent weight's codes, those codes (R, G, g))."""
    fmt = spec.number_format
    codes = grid_codes(to_groups(weight.detach(), spec), scales, offsets, fmt, frozen, frozen_codes)
    return from_groups(from_codes(codes, scales.detach(), None if offsets is None else offsets.detach(), fmt),
                       tuple(weight.shape)), codes


def track_oscillations(previous: torch.Tensor, direction: torch.Tensor, frequency: torch.Tensor | None,
                       codes: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One step of oscillation tracking from the ``previous`` codes to ``codes``: (the direction of each weight's last
    change (int8: −1, 0 never changed, +1), its oscillation frequency (moving average with ``momentum``; None when
    ``frequency`` is None, as when nothing is frozen), which weights oscillated now (changed against their last change))."""
    change = torch.sign(codes.to(torch.int16) - previous.to(torch.int16)).to(torch.int8)
    oscillated = (change != 0) & (change == -direction)
    direction = torch.where(change != 0, change, direction)
    if frequency is None:
        return direction, None, oscillated
    return direction, torch.lerp(frequency, oscillated.to(frequency.dtype), momentum), oscillated


def freeze_oscillating(frequency: torch.Tensor, threshold: float, frozen: torch.Tensor, frozen_codes: torch.Tensor,
                       average_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frozen, frozen codes) after freezing the weights whose oscillation ``frequency`` exceeds ``threshold`` at their
    rounded moving-average code; frozen weights stay frozen at their code."""
    newly = ~frozen & (frequency > threshold)
    return frozen | newly, torch.where(newly, average_codes.round().to(frozen_codes.dtype), frozen_codes)
