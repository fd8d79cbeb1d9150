"""The math of quantization-aware training (qat.py wires it), as pure tensor functions on weight groups (R, G, g).

- Fake quantization with a straight-through estimator: the forward value is exactly what dequantizing the
  nearest codes gives (``code · s + o``), the backward pass treats rounding as the identity inside the grid and
  cuts the gradient of clipped entries; scales and offsets get LSQ/LSQ+'s gradients (Esser et al. 2019,
  Bhalgat et al. 2020), scaled by g = 1/√(group size · largest code).
- Oscillations (Nagel et al. 2022, arXiv 2203.11086): a weight oscillates at a step when its code changes in the
  direction opposite to its previous change; its frequency is a moving average of that event. Weights whose
  frequency passes a threshold are frozen at their moving-average code, and a dampening loss pulls latent
  weights towards their bin centre.
"""

from __future__ import annotations

import math

import torch

from weightwise.formats.base import NumberFormat, QuantSpec
from weightwise.formats.quantizer import decode_scale, encode_scale, group_layout, to_codes


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
               frozen: torch.Tensor, frozen_codes: torch.Tensor) -> torch.Tensor:
    """The codes (uint8, like ``groups``) of the latent weights: the nearest ones under ``scales``/``offsets`` (R, G),
    the frozen code where ``frozen``."""
    codes = to_codes(groups.detach(), scales.detach(), None if offsets is None else offsets.detach(), fmt)
    return torch.where(frozen, frozen_codes, codes)


def fake_quantize(groups: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: NumberFormat,
                  codes: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """The weight groups dequantized from ``codes`` (``code · s + o``, the very operations of dequantization), with
    straight-through gradients: into a latent weight inside the grid's range (not a clipped or frozen one), and LSQ's
    into the scales and offsets (round(y) − y inside the range, the grid's end outside; offsets 0 inside, 1 outside)."""
    y = groups if offsets is None else groups - offsets.unsqueeze(-1)
    inside = (y / scales.unsqueeze(-1)).clamp(fmt.min_value, fmt.max_value).masked_fill(frozen, 0.0)
    x = straight_through(inside, fmt.code_values(codes)) * scales.unsqueeze(-1)
    return x if offsets is None else x + offsets.unsqueeze(-1)


def dampening_loss(groups: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: NumberFormat,
                   codes: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Σ over the unfrozen weights of (clip(w) − its bin centre)², in units of the group's scale: zero at the bin
    centres; its gradient moves the latent weights only (scales, offsets and centres are constants)."""
    y = groups if offsets is None else groups - offsets.detach().unsqueeze(-1)
    y = (y / scales.detach().unsqueeze(-1)).clamp(fmt.min_value, fmt.max_value)
    return (y - fmt.code_values(codes)).masked_fill(frozen, 0.0).square().sum()


def track_oscillations(previous: torch.Tensor, direction: torch.Tensor, frequency: torch.Tensor, codes: torch.Tensor,
                       momentum: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of oscillation tracking from the ``previous`` codes to ``codes``: (the direction of each weight's last
    change (int8: −1, 0 never changed, +1), its oscillation frequency (moving average with ``momentum``), which
    weights oscillated now (changed against their last change))."""
    change = torch.sign(codes.to(torch.int16) - previous.to(torch.int16)).to(torch.int8)
    oscillated = (change != 0) & (change == -direction)
    direction = torch.where(change != 0, change, direction)
    return direction, torch.lerp(frequency, oscillated.to(frequency.dtype), momentum), oscillated


def freeze_oscillating(frequency: torch.Tensor, threshold: float, frozen: torch.Tensor, frozen_codes: torch.Tensor,
                       average_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frozen, frozen codes) after freezing the weights whose oscillation ``frequency`` exceeds ``threshold`` at their
    rounded moving-average code; frozen weights stay frozen at their code."""
    newly = ~frozen & (frequency > threshold)
    return frozen | newly, torch.where(newly, average_codes.round().to(frozen_codes.dtype), frozen_codes)
