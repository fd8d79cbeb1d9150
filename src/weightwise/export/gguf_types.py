"""Exact GGUF block types for weightwise quantized tensors: which GGML type stores a tensor's codes and
scales as they are (never re-quantizing), and the raw bytes of its blocks.

Every type used here cuts a row into 32-entry blocks holding a scale d (Q4_1/Q5_1 also a minimum m) and one
quant q per entry; llama.cpp reconstructs ``d · level(q) (+ m)``. A weightwise group ``s · value(code) (+ offset)``
maps onto it when the type has the level ``k · value(code)`` for every code and ``d = s / k`` (and
``m = offset``) are exact in the block's scale encoding (fp16; MXFP4: E8M0). Both sides then compute one
float32 product of the same real numbers, so GGUF's dequantization equals weightwise's (the sign of a zero aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import IQ4_NL, MXFP4

from weightwise.errors import WeightwiseError
from weightwise.formats.base import SHIFT_BITS, QuantizedTensor, QuantSpec, ScaleDtype
from weightwise.formats.packing import pack_codes, unpack_codes
from weightwise.formats.quantizer import decode_scale, group_layout, group_scales, unpacked_codes
from weightwise.formats.registry import get_format
from weightwise.io.gguf_families import llama_qk_row_order

GGUF_BLOCK = 32  # entries per block of every type below
T = GGMLQuantizationType


class InexactGGUFError(WeightwiseError):
    """No GGUF block type stores this quantized tensor exactly (the message says why)."""


@dataclass(frozen=True)
class GGUFBlockLayout:
    """One GGUF type's 32-entry block: the level of each quant q, how d is stored, whether a minimum m
    follows it, and the bits per quant. Bytes in order: d, [m], [qh: bit 4 of quant j at bit j], qs."""

    levels: tuple[int, ...]
    scale_encoding: Literal["fp16", "e8m0"]  # e8m0 as ggml's "half" convention: d = 2^(e - 128)
    has_min: bool
    quant_bits: Literal[4, 5, 8]


BLOCK_LAYOUTS: dict[GGMLQuantizationType, GGUFBlockLayout] = {
    T.Q4_0: GGUFBlockLayout(tuple(range(-8, 8)), "fp16", False, 4),
    T.Q4_1: GGUFBlockLayout(tuple(range(16)), "fp16", True, 4),
    T.Q5_0: GGUFBlockLayout(tuple(range(-16, 16)), "fp16", False, 5),
    T.Q5_1: GGUFBlockLayout(tuple(range(32)), "fp16", True, 5),
    T.Q8_0: GGUFBlockLayout(tuple(range(128)) + tuple(range(-128, 0)), "fp16", False, 8),  # byte → int8
    T.MXFP4: GGUFBlockLayout(tuple(MXFP4.kvalues), "e8m0", False, 4),  # E2M1 values doubled
    T.IQ4_NL: GGUFBlockLayout(tuple(IQ4_NL.kvalues), "fp16", False, 4),
}


@dataclass(frozen=True)
class GGUFTypeRule:
    """A weightwise format stored exactly as a GGUF type: level(q) = multiplier · value(code), d = s / multiplier,
    m = offset. ``scale_dtypes``, when set, limits the rule to specs storing their scales in one of them."""

    format: str
    gguf_type: GGMLQuantizationType
    multiplier: int = 1
    scale_dtypes: tuple[ScaleDtype, ...] | None = None

    @property
    def layout(self) -> GGUFBlockLayout:
        return BLOCK_LAYOUTS[self.gguf_type]

    @cached_property
    def quant_of_code(self) -> np.ndarray:
        """uint8 GGUF quant of each weightwise code: the one whose level is multiplier · value(code), the code
        itself when that fits (IQ4_NL and MXFP4 nibbles are weightwise codes). Unused (NaN) codes store 0."""
        levels = self.layout.levels
        quants = []
        for code, value in enumerate(get_format(self.format).value_table.tolist()):
            matches = [q for q, level in enumerate(levels) if level == self.multiplier * value]
            quants.append(code if code in matches else matches[0])
        return np.array(quants, dtype=np.uint8)

    def applies_to(self, spec: QuantSpec) -> bool:
        return spec.number_format.name == self.format and (
            self.scale_dtypes is None or spec.resolved_scale_dtype in self.scale_dtypes
        )


GGUF_TYPE_RULES: tuple[GGUFTypeRule, ...] = (
    *(GGUFTypeRule(f"int{bits}", T.Q4_0) for bits in (2, 3, 4)),
    GGUFTypeRule("int5", T.Q5_0),
    *(GGUFTypeRule(f"int{bits}", T.Q8_0) for bits in (6, 7, 8)),
    *(GGUFTypeRule(f"int{bits}_asym", T.Q4_1) for bits in (2, 3, 4)),
    GGUFTypeRule("int5_asym", T.Q5_1),
    GGUFTypeRule("ternary", T.Q4_0),
    GGUFTypeRule("iq4_nl", T.IQ4_NL),
    GGUFTypeRule("mxfp4", T.MXFP4, multiplier=2),
    GGUFTypeRule("fp4_e2m1", T.MXFP4, multiplier=2, scale_dtypes=("e8m0",)),
    GGUFTypeRule("fp4_e2m1", T.Q5_0, multiplier=2),
    GGUFTypeRule("fp6_e2m3", T.Q8_0, multiplier=8),
    GGUFTypeRule("mxfp6_e2m3", T.Q8_0, multiplier=8),
    GGUFTypeRule("mxint8", T.Q8_0, multiplier=64),
)


def _rule_or_reason(spec: QuantSpec, shape: tuple[int, int]) -> GGUFTypeRule | str:
    """The first rule for ``spec`` at ``shape``, or why there is none (from the spec alone)."""
    name, cols = spec.number_format.name, shape[1]
    rules = [rule for rule in GGUF_TYPE_RULES if rule.applies_to(spec)]
    if not rules:
        exportable = ", ".join(dict.fromkeys(rule.format for rule in GGUF_TYPE_RULES))
        return f"no GGUF block type has {name}'s levels with {spec.resolved_scale_dtype} scales (exact: {exportable})"
    if cols % GGUF_BLOCK:
        return f"rows of {cols} entries do not split into GGUF's {GGUF_BLOCK}-entry blocks"
    if spec.granularity == "group":
        group = spec.resolved_group_size
        if group % GGUF_BLOCK:
            return f"group size {group} is not a multiple of GGUF's {GGUF_BLOCK}-entry block"
        if cols % group:
            return f"group size {group} does not divide the row length {cols} (padded last group)"
    return rules[0]


def exact_gguf_type(spec: QuantSpec, shape: tuple[int, int]) -> GGUFTypeRule | None:
    """The rule storing tensors of ``spec`` and ``shape`` exactly, or None. Scales are checked by :func:`pack_gguf`."""
    rule = _rule_or_reason(spec, shape)
    return None if isinstance(rule, str) else rule


def gguf_storage_bits(shape: tuple[int, int], spec: QuantSpec) -> int | None:
    """Bits a tensor of ``spec`` and ``shape`` takes in a GGUF file (its exact type's blocks), None without one."""
    rule = exact_gguf_type(spec, shape)
    if rule is None:
        return None
    block, type_bytes = gguf.GGML_QUANT_SIZES[rule.gguf_type]
    return 8 * type_bytes * shape[0] * shape[1] // block


def why_not_exact(spec: QuantSpec, shape: tuple[int, int]) -> str | None:
    """Why no GGUF type stores tensors of ``spec`` and ``shape`` exactly; None when one may (see :func:`exact_gguf_type`)."""
    rule = _rule_or_reason(spec, shape)
    return rule if isinstance(rule, str) else None


def _require_equal(stored: np.ndarray, wanted: np.ndarray, what: str) -> None:
    bad = stored != wanted
    if bad.any():
        raise InexactGGUFError(
            f"{int(bad.sum())} of {bad.size} {what} are not exactly representable (first: {wanted[bad][0]!r})"
        )


def _encode_block_scales(values: np.ndarray, encoding: Literal["fp16", "e8m0"], what: str) -> np.ndarray:
    """(rows, blocks, bytes) little-endian storage of float32 block scales, refusing any that would round."""
    if encoding == "fp16":
        with np.errstate(over="ignore"):
            stored = values.astype("<f2")
        _require_equal(stored.astype(np.float32), values, f"{what} in fp16")
        return stored.view(np.uint8).reshape(*values.shape, 2)
    exponent = np.frexp(values)[1].astype(np.int32) + 127  # d = 2^(e - 128) = 0.5 · 2^exponent(d)
    stored = np.clip(exponent, 0, 255).astype(np.uint8)
    _require_equal(np.ldexp(np.float32(1), stored.astype(np.int32) - 128), values, f"{what} as E8M0 powers of two")
    return stored.reshape(*values.shape, 1)


def pack_gguf_rows(quants: np.ndarray, d: np.ndarray, m: np.ndarray | None, gguf_type: GGMLQuantizationType) -> np.ndarray:
    """Raw blocks (rows, bytes per row) of GGUF quants (rows, cols) uint8 with float32 block scales ``d`` and,
    for Q4_1/Q5_1, minima ``m`` (rows, cols / 32); raises InexactGGUFError when a scale would round."""
    layout = BLOCK_LAYOUTS[gguf_type]
    rows, cols = quants.shape
    if cols % GGUF_BLOCK or d.shape != (rows, cols // GGUF_BLOCK) or (m is None) == layout.has_min:
        raise WeightwiseError(f"{gguf_type.name}: need (rows, k·{GGUF_BLOCK}) quants, (rows, k) scales and minima iff the type has them")
    if quants.max(initial=0) >= len(layout.levels):
        raise WeightwiseError(f"{gguf_type.name} quants must lie in [0, {len(layout.levels)})")
    q = quants.reshape(rows, -1, GGUF_BLOCK)
    parts = [_encode_block_scales(d, layout.scale_encoding, "block scales d")]
    if m is not None:
        parts.append(_encode_block_scales(m, "fp16", "block minima m"))
    if layout.quant_bits == 5:
        parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
    if layout.quant_bits == 8:
        parts.append(q)
    else:  # entry j in the low nibble of byte j, entry j + 16 in its high nibble
        half = GGUF_BLOCK // 2
        parts.append((q[..., :half] & 0x0F) | ((q[..., half:] & 0x0F) << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _per_block(per_group: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> np.ndarray:
    """float32 (rows, cols / 32): each block's entry of a per-group tensor (R, G), repeated over its blocks."""
    rows, cols = shape
    if spec.granularity == "group":
        per_group = per_group.repeat_interleave(spec.resolved_group_size // GGUF_BLOCK, dim=1)
    return np.broadcast_to(per_group.detach().to(torch.float32).cpu().numpy(), (rows, cols // GGUF_BLOCK))


def pack_gguf(qt: QuantizedTensor) -> tuple[GGMLQuantizationType, np.ndarray]:
    """The GGUF type storing ``qt`` exactly and its raw blocks, uint8 (rows, bytes per row), as
    ``GGUFWriter.add_tensor(name, blocks, raw_dtype=type)`` takes them. Raises InexactGGUFError when the
    spec has no exact type or a scale (offset) is not exact in the type's encoding."""
    rule = _rule_or_reason(qt.spec, qt.shape)
    if isinstance(rule, str):
        raise InexactGGUFError(f"{qt.spec.format} {qt.shape}: {rule}")
    quants = rule.quant_of_code[unpacked_codes(qt).cpu().numpy()]
    scales = _per_block(group_scales(qt), qt.shape, qt.spec)
    d = scales / np.float32(rule.multiplier)
    _require_equal(d * np.float32(rule.multiplier), scales, f"scales divided by {rule.multiplier} in float32")
    m = None if qt.offsets is None else _per_block(decode_scale(qt.offsets, qt.spec.resolved_scale_dtype), qt.shape, qt.spec)
    return rule.gguf_type, pack_gguf_rows(quants, d, m, rule.gguf_type)


def permute_rows(qt: QuantizedTensor, order: torch.Tensor) -> QuantizedTensor:
    """``qt`` with row i taken from row order[i]: codes, scales, offsets and ratio shifts move together
    (every scale belongs to one row, or to the whole tensor), so dequantize commutes with the permutation."""
    spec = qt.spec

    def take(per_row: torch.Tensor | None) -> torch.Tensor | None:
        return per_row if per_row is None or spec.granularity == "tensor" else per_row[order.to(per_row.device)]

    shifts = qt.scale_shifts
    if shifts is not None:
        R, G, _ = group_layout(qt.shape, spec)
        shifts = pack_codes(take(unpack_codes(shifts, SHIFT_BITS, R * G).reshape(R, G)), SHIFT_BITS)
    codes = unpacked_codes(qt)[order.to(qt.packed_codes.device)]
    return QuantizedTensor(
        pack_codes(codes, spec.number_format.bits), take(qt.scales), take(qt.offsets), qt.shape, spec, shifts
    )


def permute_qk_for_gguf(qt: QuantizedTensor, n_head: int) -> QuantizedTensor:
    """A llama-family Q (or K, with its KV-head count) projection in the row order llama.cpp expects."""
    return permute_rows(qt, llama_qk_row_order(qt.shape[0], n_head))


def unpermute_qk_from_gguf(qt: QuantizedTensor, n_head: int) -> QuantizedTensor:
    """Inverse of :func:`permute_qk_for_gguf`: back to Hugging Face's row order."""
    return permute_rows(qt, torch.argsort(llama_qk_row_order(qt.shape[0], n_head)))
