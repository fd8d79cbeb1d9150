"""Round-to-nearest: every weight to its nearest grid point under per-group scales from the weights."""

from __future__ import annotations

import torch

from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.formats.quantizer import quantize_tensor


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest quantization; needs no calibration statistics."""
    return quantize_tensor(weight, spec)
