"""Round-to-nearest quantization of a 2-D weight to any registered format, as pure tensor math.

A weight (rows, cols) is viewed as groups (R, G, g): per-tensor (1, 1, rows·cols), per-channel
(rows, 1, cols) or per-group (rows, ceil(cols / g), g). Each group gets a scale (and, for
asymmetric formats, an offset) rounded to the storage dtype *before* codes are chosen, so the codes
are the nearest ones for the scales actually stored.
"""

from __future__ import annotations

import math

import torch

from weightwise.errors import WeightwiseError
from weightwise.formats.base import SCALE_BITS, NumberFormat, QuantizedTensor, QuantSpec
from weightwise.formats.packing import pack_codes, packed_nbytes, unpack_codes

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Refuse NaN or Inf entries with a message naming the tensor."""
    if not torch.isfinite(w).all():
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


def compute_scales(
    groups: torch.Tensor, fmt: NumberFormat, scale_dtype: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored (scale, offset) per group by the format's scaling rule; offset is None unless asymmetric."""
    lo, hi, absmax, absmean = _group_stats(groups.to(torch.float32))
    offset = None
    if fmt.scaling == "mx":
        exp = torch.floor(torch.log2(absmax.clamp_min(2.0**-127))) - fmt.emax
        scale = (exp.clamp(-127, 127) + 127).to(torch.uint8)
        return scale, None
    if fmt.scaling == "minmax":
        s = (hi - lo) / (fmt.max_value - fmt.min_value)
        offset = encode_scale(lo - s * fmt.min_value, scale_dtype)
    elif fmt.scaling == "signed_absmax":
        if scale_dtype == "e8m0":  # a power-of-two scale cannot carry the sign: never clip instead
            s = absmax / fmt.max_value
        else:
            idx = torch.where(torch.isnan(groups), 0.0, groups.abs()).argmax(dim=-1, keepdim=True)
            s = torch.gather(torch.nan_to_num(groups.to(torch.float32)), -1, idx).squeeze(-1) / fmt.min_value
    elif fmt.scaling == "absmean":
        s = absmean
    else:
        s = absmax / fmt.max_abs
    s = torch.where(s == 0, torch.ones_like(s), s)
    return encode_scale(s, scale_dtype), offset


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
    scale, offset = compute_scales(groups, fmt, dtype)
    codes = to_codes(groups, decode_scale(scale, dtype), None if offset is None else decode_scale(offset, dtype), fmt)
    codes = from_groups(codes, tuple(w.shape))
    return QuantizedTensor(pack_codes(codes, fmt.bits), scale, offset, tuple(w.shape), spec)


def unpacked_codes(qt: QuantizedTensor) -> torch.Tensor:
    """The (rows, cols) code matrix of a quantized tensor."""
    rows, cols = qt.shape
    return unpack_codes(qt.packed_codes, qt.spec.number_format.bits, rows * cols).reshape(rows, cols)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """float32 weight of ``shape`` from a :class:`QuantizedTensor`."""
    spec, fmt, dtype = qt.spec, qt.spec.number_format, qt.spec.resolved_scale_dtype
    codes = unpacked_codes(qt)
    if spec.granularity == "group" and qt.shape[1] % spec.resolved_group_size:
        codes = torch.nn.functional.pad(codes, (0, (-qt.shape[1]) % spec.resolved_group_size))
    R, G, _ = group_layout(qt.shape, spec)
    grouped = codes.reshape(R, G, -1)
    offset = None if qt.offsets is None else decode_scale(qt.offsets, dtype)
    return from_groups(from_codes(grouped, decode_scale(qt.scales, dtype), offset, fmt), qt.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize (same dtype as ``w``)."""
    return dequantize(quantize_tensor(w, spec)).to(w.dtype)


def storage_bits(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Exact stored bits of a quantized weight: packed codes plus scales (plus offsets)."""
    fmt = spec.number_format
    R, G, _ = group_layout(shape, spec)
    per_group = SCALE_BITS[spec.resolved_scale_dtype] * (2 if fmt.asymmetric else 1)
    return 8 * packed_nbytes(shape[0] * shape[1], fmt.bits) + R * G * per_group
