"""Round-to-nearest quantization of a 2-D weight to any registered format, as pure tensor math.

A weight (rows, cols) is viewed as groups (R, G, g): per-tensor (1, 1, rows·cols), per-channel
(rows, 1, cols) or per-group (rows, ceil(cols / g), g). Each group gets a scale (and, for
asymmetric formats, an offset) rounded to the storage dtype *before* codes are chosen, so the codes
are the nearest ones for the scales actually stored.

Power-of-two scales (ZeroQuant-FP, arXiv 2307.09782) make the rescaling a shift: ``pow2_scales="all"``
rounds each group scale up to a power of two; ``"ratio"`` keeps one real scale per row and stores
each group's scale as that row scale times 2^-k (k in SHIFT_BITS bits).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from weightwise.errors import WeightwiseError
from weightwise.formats.base import SHIFT_BITS, NumberFormat, QuantizedTensor, QuantSpec
from weightwise.formats.packing import pack_codes, packed_nbytes, unpack_codes

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STORAGE_DTYPES = {**_TORCH_DTYPES, "e8m0": torch.uint8}  # torch dtype holding each scale dtype
MAX_SHIFT = 2**SHIFT_BITS - 1


STRIP_ROWS = 1024  # rows per strip when a large matrix is checked, copied or converted piecewise


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` has no NaN or Inf. A finite sum proves it at once; otherwise (or for float8, which has no CPU
    sum) the check runs STRIP_ROWS rows at a time: ``torch.isfinite`` of a whole matrix allocates temporaries larger
    than the matrix itself (0.7 GB for a 0.5 GB float64 one)."""
    if not t.is_floating_point() or t.is_meta:
        return True
    one_byte = t.element_size() == 1
    if not one_byte and bool(torch.isfinite(t.sum())):
        return True
    parts = t.split(STRIP_ROWS) if t.ndim > 1 else (t,)
    return all(bool(torch.isfinite(part.float() if one_byte else part).all()) for part in parts)


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Refuse NaN or Inf entries with a message naming the tensor."""
    if not all_finite(w):
        bad = int((~torch.isfinite(w)).sum())
        raise WeightwiseError(f"{name} has {bad} NaN/Inf entries; fix or re-export the source model before quantizing")


def group_layout(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int, int]:
    """(row groups R, column groups G, group length g) for a weight of ``shape`` under ``spec``."""
    rows, cols = shape
    if spec.granularity == "tensor":
        return 1, 1, rows * cols
    if spec.granularity == "channel":
        return rows, 1, cols
    g = spec.resolved_group_size
    assert g is not None
    if cols % g and not spec.pad:
        divisors = [d for d in (32, 64, 128, 256) if cols % d == 0]
        hint = f"use a divisor of {cols} (e.g. {divisors[-1]})" if divisors else f"use a divisor of {cols}"
        raise WeightwiseError(f"group size {g} does not divide the row length {cols}: {hint}, or allow padding (--pad)")
    return rows, math.ceil(cols / g), g


def to_groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` as (R, G, g) groups; a partial last group is padded with NaN (ignored by the statistics)."""
    R, G, g = group_layout(tuple(w.shape), spec)
    if spec.granularity != "group":
        return w.reshape(R, G, g)
    pad = G * g - w.shape[1]
    if pad:
        w = torch.nn.functional.pad(w, (0, pad), value=math.nan)
    return w.reshape(R, G, g)


def from_groups(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_groups` (drops the padding)."""
    rows, cols = shape
    return x.reshape(rows, -1)[:, :cols] if x.shape[0] == rows else x.reshape(rows, cols)


def encode_scale(s: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float32 scales to their storage dtype (e8m0: biased exponent as uint8, rounded up)."""
    if dtype == "e8m0":
        exp = torch.ceil(torch.log2(s.abs().clamp_min(2.0**-127))).clamp(-127, 127)
        return (exp + 127).to(torch.uint8)
    return s.to(_TORCH_DTYPES[dtype])


def decode_scale(stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored scales back to float32."""
    if dtype == "e8m0":
        return torch.exp2(stored.to(torch.float32) - 127)
    return stored.to(torch.float32)


def _group_stats(x: torch.Tensor):
    """(min, max, absmax, absmean) of each group over its real (non-NaN) entries."""
    if not x.isnan().any():
        absx = x.abs()
        return x.amin(dim=-1), x.amax(dim=-1), absx.amax(dim=-1), absx.mean(dim=-1)
    valid = ~torch.isnan(x)
    lo = torch.where(valid, x, math.inf).amin(dim=-1)
    hi = torch.where(valid, x, -math.inf).amax(dim=-1)
    absx = torch.where(valid, x.abs(), 0.0)
    return lo, hi, absx.amax(dim=-1), absx.sum(dim=-1) / valid.sum(dim=-1).clamp_min(1)


def _raw_scales(groups: torch.Tensor, fmt: NumberFormat, signed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 (scale, group minimum) by the format's scaling rule, before any rounding; the minimum
    is None unless asymmetric. An all-zero group gets scale 0. Without ``signed`` the
    signed-absmax rule (largest entry on the negative end) falls back to never clipping: absmax / max."""
    lo, hi, absmax, absmean = _group_stats(groups.to(torch.float32))
    if fmt.scaling == "minmax":
        return (hi - lo) / (fmt.max_value - fmt.min_value), lo
    if fmt.scaling == "signed_absmax" and signed:
        idx = torch.where(torch.isnan(groups), 0.0, groups.abs()).argmax(dim=-1, keepdim=True)
        return torch.gather(torch.nan_to_num(groups.to(torch.float32)), -1, idx).squeeze(-1) / fmt.min_value, None
    if fmt.scaling == "signed_absmax":
        return absmax / fmt.max_value, None
    if fmt.scaling == "absmean":
        return absmean, None
    return absmax / fmt.max_abs, None


def pow2_ceil(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """sign(s) · the smallest power of two ≥ |s|, at least the dtype's smallest normal (s ≠ 0).

    Rounding the magnitude up never shrinks the grid's range, so no entry clips that did not before.
    """
    mantissa, exp = torch.frexp(s)  # |s| = |mantissa| · 2^exp with |mantissa| in [0.5, 1)
    exp = torch.where(mantissa.abs() == 0.5, exp - 1, exp)
    lowest = -127 if scale_dtype == "e8m0" else math.log2(torch.finfo(_TORCH_DTYPES[scale_dtype]).smallest_normal)
    return torch.sign(s) * torch.exp2(exp.to(torch.float32).clamp_min(lowest))


def compute_scales(
    groups: torch.Tensor, fmt: NumberFormat, scale_dtype: str, pow2_scales: Literal["none", "all"] = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored (scale, offset) per group by the format's scaling rule; offset is None unless asymmetric.

    ``pow2_scales="all"`` rounds every scale up to a power of two (offsets stay unconstrained).
    """
    if fmt.scaling == "mx":
        absmax = _group_stats(groups.to(torch.float32))[2]
        exp = torch.floor(torch.log2(absmax.clamp_min(2.0**-127))) - fmt.emax
        scale = (exp.clamp(-127, 127) + 127).to(torch.uint8)
        return scale, None
    # a power-of-two (e8m0) scale cannot carry the sign: never clip instead
    s, lo = _raw_scales(groups, fmt, signed=scale_dtype != "e8m0")
    s = torch.where(s == 0, torch.ones_like(s), s)
    if pow2_scales == "all":
        s = pow2_ceil(s, scale_dtype)
    offset = None if lo is None else encode_scale(lo - s * fmt.min_value, scale_dtype)
    return encode_scale(s, scale_dtype), offset


def compute_ratio_scales(
    groups: torch.Tensor, fmt: NumberFormat, scale_dtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """pow2_scales="ratio": stored (row scale (R, 1), shifts k (R, G) uint8, offset or None).

    The row scale is the row's largest group scale; each group gets the largest k ≤ MAX_SHIFT whose
    scale row · 2^-k is still at least the group's own scale, so it clips no more than with its own
    (one group per row has k = 0). Scales are positive: signed-absmax formats never clip instead.
    """
    s, lo = _raw_scales(groups, fmt, signed=False)
    row_max = s.amax(dim=-1, keepdim=True)
    row = encode_scale(torch.where(row_max == 0, torch.ones_like(row_max), row_max), scale_dtype)
    row_f = decode_scale(row, scale_dtype)
    k = torch.floor(torch.log2(row_f / s)).clamp(0, MAX_SHIFT)  # all-zero group: log2(inf) → MAX_SHIFT
    # log2 of a quotient may round across an integer: settle k on exact products with powers of two
    k = torch.where(row_f * torch.exp2(-k) < s, k - 1, k).clamp_min(0)
    k = torch.where((k < MAX_SHIFT) & (row_f * torch.exp2(-k - 1) >= s), k + 1, k)
    shifts = k.to(torch.uint8)
    offset = None if lo is None else encode_scale(lo - ratio_group_scales(row, shifts, scale_dtype) * fmt.min_value, scale_dtype)
    return row, shifts, offset


def ratio_group_scales(row_scales: torch.Tensor, shifts: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """float32 group scales row · 2^-k from stored row scales (R, 1) and unpacked shifts (R, G)."""
    return decode_scale(row_scales, scale_dtype) * torch.exp2(-shifts.to(torch.float32))


def group_scales(qt: QuantizedTensor) -> torch.Tensor:
    """float32 scale of every group (R, G) of a quantized tensor, as stored."""
    spec, dtype = qt.spec, qt.spec.resolved_scale_dtype
    if spec.pow2_scales != "ratio":
        return decode_scale(qt.scales, dtype)
    if qt.scale_shifts is None:
        raise WeightwiseError("a pow2_scales='ratio' tensor needs its scale_shifts; the stored weight is incomplete")
    R, G, _ = group_layout(qt.shape, spec)
    shifts = unpack_codes(qt.scale_shifts, SHIFT_BITS, R * G).reshape(R, G)
    return ratio_group_scales(qt.scales, shifts, dtype)


def to_codes(groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: NumberFormat) -> torch.Tensor:
    """Nearest codes (uint8, same shape as ``groups``) for float32 ``scale``/``offset`` broadcast per group."""
    x = torch.nan_to_num(groups.to(torch.float32), nan=0.0)
    if offset is not None:
        x = x - offset.unsqueeze(-1)
    return fmt.nearest_codes(x / scale.unsqueeze(-1))


def from_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: NumberFormat) -> torch.Tensor:
    """Dequantized float32 groups from codes and float32 ``scale``/``offset``."""
    x = fmt.code_values(codes) * scale.unsqueeze(-1)
    return x + offset.unsqueeze(-1) if offset is not None else x


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight."""
    if w.ndim != 2:
        raise WeightwiseError(f"{name}: only 2-D weights can be quantized, got shape {tuple(w.shape)}")
    check_finite(w, name)
    fmt, dtype = spec.number_format, spec.resolved_scale_dtype
    groups = to_groups(w.detach().to(torch.float32), spec)
    packed_shifts = None
    if spec.pow2_scales == "ratio":
        scale, shifts, offset = compute_ratio_scales(groups, fmt, dtype)
        scale_f, packed_shifts = ratio_group_scales(scale, shifts, dtype), pack_codes(shifts, SHIFT_BITS)
    else:
        scale, offset = compute_scales(groups, fmt, dtype, spec.pow2_scales)
        scale_f = decode_scale(scale, dtype)
    codes = to_codes(groups, scale_f, None if offset is None else decode_scale(offset, dtype), fmt)
    codes = from_groups(codes, tuple(w.shape))
    return QuantizedTensor(pack_codes(codes, fmt.bits), scale, offset, tuple(w.shape), spec, packed_shifts)


def unpacked_codes(qt: QuantizedTensor) -> torch.Tensor:
    """The (rows, cols) code matrix of a quantized tensor."""
    rows, cols = qt.shape
    return unpack_codes(qt.packed_codes, qt.spec.number_format.bits, rows * cols).reshape(rows, cols)


def float_scales(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 group scales (R, G) and offsets (asymmetric formats; else None) of a quantized tensor, as stored."""
    return group_scales(qt), None if qt.offsets is None else decode_scale(qt.offsets, qt.spec.resolved_scale_dtype)


def dequantize_with(qt: QuantizedTensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """float32 weight of ``shape`` from the codes of ``qt`` with float32 group ``scales`` and ``offsets`` (R, G)
    in place of its stored ones: differentiable in them (the codes are constants)."""
    spec = qt.spec
    if (offsets is None) != (qt.offsets is None):
        raise ValueError(f"format {spec.format} {'needs' if qt.offsets is not None else 'has no'} offsets")
    codes = unpacked_codes(qt)
    if spec.granularity == "group" and qt.shape[1] % spec.resolved_group_size:
        codes = torch.nn.functional.pad(codes, (0, (-qt.shape[1]) % spec.resolved_group_size))
    R, G, _ = group_layout(qt.shape, spec)
    return from_groups(from_codes(codes.reshape(R, G, -1), scales, offsets, spec.number_format), qt.shape)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """float32 weight of ``shape`` from a :class:`QuantizedTensor`."""
    return dequantize_with(qt, *float_scales(qt))


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize (same dtype as ``w``)."""
    return dequantize(quantize_tensor(w, spec)).to(w.dtype)


def stored_layout(shape: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor a :class:`QuantizedTensor` of ``shape`` holds, by field name.

    packed_codes; scales (R, G), or under pow2_scales="ratio" one per row (R, 1); offsets (R, G) for
    asymmetric formats; scale_shifts under "ratio" (the R·G shifts bit-packed in SHIFT_BITS bits).
    """
    fmt, dtype = spec.number_format, STORAGE_DTYPES[spec.resolved_scale_dtype]
    R, G, _ = group_layout(shape, spec)
    ratio = spec.pow2_scales == "ratio"
    layout = {
        "packed_codes": ((packed_nbytes(shape[0] * shape[1], fmt.bits),), torch.uint8),
        "scales": ((R, 1) if ratio else (R, G), dtype),
    }
    if fmt.asymmetric:
        layout["offsets"] = ((R, G), dtype)
    if ratio:
        layout["scale_shifts"] = ((packed_nbytes(R * G, SHIFT_BITS),), torch.uint8)
    return layout


def storage_bits(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Exact stored bits of a quantized weight: the bytes of every tensor in :func:`stored_layout`."""
    return sum(8 * math.prod(size) * dtype.itemsize for size, dtype in stored_layout(shape, spec).values())
