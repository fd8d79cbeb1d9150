"""QuantizedLinear: a drop-in nn.Module that stores packed codes and scales and dequantizes in forward.

Only the packed form is kept in memory, so a quantized model's weight bytes really shrink; the cost
is one dequantization per forward call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.formats.packing import packed_nbytes
from weightwise.formats.quantizer import dequantize, group_layout, storage_bits

_STORAGE_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.uint8}


class QuantizedLinear(nn.Module):
    """y = x · dequant(codes, scales[, offsets])ᵀ + bias."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        shape = (out_features, in_features)
        R, G, _ = group_layout(shape, spec)
        nbytes = packed_nbytes(out_features * in_features, spec.number_format.bits)
        scale_dtype = _STORAGE_TORCH_DTYPES[spec.resolved_scale_dtype]
        self.register_buffer("packed_codes", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(R, G, dtype=scale_dtype, device=device))
        offsets = torch.zeros(R, G, dtype=scale_dtype, device=device) if spec.number_format.asymmetric else None
        self.register_buffer("offsets", offsets)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        out_features, in_features = qt.shape
        module = cls(in_features, out_features, qt.spec, bias=bias is not None, device=qt.packed_codes.device)
        module.packed_codes.copy_(qt.packed_codes)
        module.scales.copy_(qt.scales)
        if qt.offsets is not None:
            module.offsets.copy_(qt.offsets)
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(torch.float32))
        return module

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed_codes, self.scales, self.offsets, (self.out_features, self.in_features), self.spec)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.quantized_tensor())

    def stored_bits(self) -> int:
        """Bits of the stored weight (codes + scales + offsets), excluding the bias."""
        return storage_bits((self.out_features, self.in_features), self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        s = self.spec
        where = f"g{s.resolved_group_size}" if s.granularity == "group" else s.granularity
        return f"in={self.in_features}, out={self.out_features}, format={s.format}, {where}, scales={s.resolved_scale_dtype}"
