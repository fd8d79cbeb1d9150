"""Number formats as pure tensor math: grids, quantize-to-codes, dequantize, packing, storage cost."""

from weightwise.formats.base import NumberFormat, QuantizedTensor, QuantSpec
from weightwise.formats.packing import pack_codes, unpack_codes
from weightwise.formats.quantizer import (
    compute_scales,
    dequantize,
    fake_quantize,
    quantize_tensor,
    storage_bits,
    to_codes,
)
from weightwise.formats.registry import FORMAT_NAMES, get_format

__all__ = [
    "FORMAT_NAMES",
    "NumberFormat",
    "QuantSpec",
    "QuantizedTensor",
    "compute_scales",
    "dequantize",
    "fake_quantize",
    "get_format",
    "pack_codes",
    "quantize_tensor",
    "storage_bits",
    "to_codes",
    "unpack_codes",
]
