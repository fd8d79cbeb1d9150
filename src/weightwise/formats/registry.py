"""Named number formats. Integer, minifloat (ExMy), NF4, IQ4_NL, ternary and OCP microscaling (MX) formats
are built from their definitions here; ``get_format`` also parses general names like ``fp5_e2m2``."""

from __future__ import annotations

import math
import re
from functools import cache

from scipy.stats import norm

from weightwise.errors import WeightwiseError
from weightwise.formats.base import NumberFormat

# llama.cpp's kvalues_iq4nl (gguf-py: gguf.quants.IQ4_NL.kvalues), in nibble order
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MinifloatSpecials = str  # "finite" (every code a number), "ocp_e4m3" (only S.1111.111 is NaN), "ieee" (top exponent is Inf/NaN)


def minifloat_values(exp_bits: int, man_bits: int, specials: MinifloatSpecials = "finite") -> tuple[float, ...]:
    """Value of every code of a sign + ``exp_bits`` exponent + ``man_bits`` mantissa float.

    Bias is 2^(E-1) - 1 and exponent 0 holds subnormals, as in IEEE 754 and the OCP specs.
    """
    bias = 2 ** (exp_bits - 1) - 1
    top_exp, top_man = 2**exp_bits - 1, 2**man_bits - 1
    values = []
    for code in range(2 ** (1 + exp_bits + man_bits)):
        sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
        e = (code >> man_bits) & top_exp
        m = code & top_man
        if specials == "ieee" and e == top_exp or specials == "ocp_e4m3" and e == top_exp and m == top_man:
            values.append(math.nan)
        elif e == 0:
            values.append(sign * m / 2**man_bits * 2.0 ** (1 - bias))
        else:
            values.append(sign * (1 + m / 2**man_bits) * 2.0 ** (e - bias))
    return tuple(values)


def nf4_values() -> tuple[float, ...]:
    """NormalFloat4 (QLoRA, arXiv 2305.14314): quantiles of N(0, 1) with an exact zero, scaled to [-1, 1].

    8 positive levels at the quantiles linspace(offset, 1/2, 9)[:-1], 7 negative at linspace(offset, 1/2, 8)[:-1],
    offset 0.9677 as in the paper's construction.
    """
    offset = 0.9677083
    pos = [float(norm.ppf(p)) for p in _linspace(offset, 0.5, 9)[:-1]]
    neg = [-float(norm.ppf(p)) for p in _linspace(offset, 0.5, 8)[:-1]]
    levels = sorted(pos + neg + [0.0])
    top = max(abs(v) for v in levels)
    return tuple(v / top for v in levels)


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def _integer(bits: int, asymmetric: bool) -> NumberFormat:
    if asymmetric:
        return NumberFormat(
            name=f"int{bits}_asym",
            family="integer",
            bits=bits,
            values=tuple(float(c) for c in range(2**bits)),
            scaling="minmax",
            description=f"{bits}-bit unsigned integer with per-group scale and offset (x = s·q + min), like GGUF Q4_1",
        )
    half = 2 ** (bits - 1)
    return NumberFormat(
        name=f"int{bits}",
        family="integer",
        bits=bits,
        values=tuple(float(c - half) for c in range(2**bits)),
        scaling="signed_absmax",
        description=f"{bits}-bit signed integer [-{half}, {half - 1}], the largest-magnitude entry on code -{half} (like GGUF Q4_0)",
    )


def _minifloat(name: str, exp_bits: int, man_bits: int, specials: str, note: str, aliases=()) -> NumberFormat:
    return NumberFormat(
        name=name,
        family="minifloat",
        bits=1 + exp_bits + man_bits,
        values=minifloat_values(exp_bits, man_bits, specials),
        scaling="absmax",
        description=f"E{exp_bits}M{man_bits} minifloat{note}",
        default_group_size=32 if exp_bits + man_bits <= 5 else 64,
        aliases=aliases,
    )


def _mx(name: str, element: NumberFormat, aliases=()) -> NumberFormat:
    """OCP Microscaling v1.0: blocks of 32 share a power-of-two E8M0 scale 2^(floor(log2 amax) - emax)."""
    return NumberFormat(
        name=name,
        family="mx",
        bits=element.bits,
        values=element.values,
        scaling="mx",
        description=f"OCP MX: {element.description.split(' (')[0]} elements, 32-entry blocks, E8M0 scale",
        block_size=32,
        scale_dtype="e8m0",
        emax=math.floor(math.log2(element.max_value)),  # largest power of two ≤ the largest positive element
        aliases=aliases,
    )


def _build() -> dict[str, NumberFormat]:
    formats: list[NumberFormat] = []
    for bits in range(2, 9):
        formats += [_integer(bits, asymmetric=False), _integer(bits, asymmetric=True)]
    e4m3 = _minifloat("fp8_e4m3", 4, 3, "ocp_e4m3", " (OCP: max 448, no Inf)", aliases=("fp8",))
    e5m2 = _minifloat("fp8_e5m2", 5, 2, "ieee", " (IEEE-like: max 57344, Inf/NaN codes unused)")
    e3m2 = _minifloat("fp6_e3m2", 3, 2, "finite", " (OCP: max 28)")
    e2m3 = _minifloat("fp6_e2m3", 2, 3, "finite", " (OCP: max 7.5)")
    e2m1 = _minifloat("fp4_e2m1", 2, 1, "finite", " (OCP: max 6)", aliases=("fp4",))
    formats += [e4m3, e5m2, e3m2, e2m3, e2m1]
    formats.append(
        NumberFormat(
            name="nf4",
            family="normalfloat",
            bits=4,
            values=nf4_values(),
            scaling="absmax",
            description="NormalFloat4 (QLoRA): N(0,1) quantiles scaled to [-1, 1]",
            default_group_size=64,
        )
    )
    formats.append(
        NumberFormat(
            name="iq4_nl",
            family="nonuniform",
            bits=4,
            values=tuple(float(v) for v in IQ4_NL_LEVELS),
            scaling="signed_absmax",
            description="GGUF IQ4_NL's 16 non-uniform levels (-127..113), code = GGUF nibble; "
            "the largest-magnitude entry on -127 (llama.cpp: fp16 scale per 32-block)",
            default_group_size=32,
        )
    )
    formats.append(
        NumberFormat(
            name="ternary",
            family="ternary",
            bits=2,
            values=(-1.0, 0.0, 1.0, math.nan),
            scaling="absmean",
            description="ternary {-1, 0, +1} with absmean scale (BitNet b1.58), stored in 2 bits",
            default_group_size=64,
        )
    )
    int8_mx = NumberFormat(
        name="int8_mx_element",
        family="integer",
        bits=8,
        values=tuple((c - 128) / 64 for c in range(256)),
        scaling="absmax",
        description="8-bit two's complement with 6 fraction bits",
    )
    formats += [
        _mx("mxfp4", e2m1),
        _mx("mxfp6_e3m2", e3m2, aliases=("mxfp6",)),
        _mx("mxfp6_e2m3", e2m3),
        _mx("mxfp8_e4m3", e4m3, aliases=("mxfp8",)),
        _mx("mxfp8_e5m2", e5m2),
        _mx("mxint8", int8_mx),
    ]
    table = {f.name: f for f in formats}
    for f in formats:
        for alias in f.aliases:
            table[alias] = f
    return table


_FORMATS = _build()
FORMAT_NAMES: tuple[str, ...] = tuple(name for name, f in _FORMATS.items() if f.name == name)
_GENERAL_MINIFLOAT = re.compile(r"fp(\d)_e(\d)m(\d)")


@cache
def get_format(name: str) -> NumberFormat:
    """The format called ``name``; general minifloats parse as ``fp{bits}_e{E}m{M}`` (all codes finite)."""
    key = name.strip().lower()
    if key in _FORMATS:
        return _FORMATS[key]
    match = _GENERAL_MINIFLOAT.fullmatch(key)
    if match:
        bits, e, m = map(int, match.groups())
        if bits == 1 + e + m and e >= 1 and bits <= 8:
            return _minifloat(key, e, m, "finite", " (general, all codes finite)")
        raise WeightwiseError(f"format '{name}': need fp{{1+E+M}}_e{{E}}m{{M}} with E ≥ 1 and at most 8 bits")
    raise WeightwiseError(f"unknown format '{name}'; run `weightwise formats` to list them (e.g. {', '.join(FORMAT_NAMES[:4])}, nf4, mxfp4)")
