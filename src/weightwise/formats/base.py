"""The two data types every format shares: a number format (a table of code values plus a scaling
rule) and a quantization spec (which format, at which granularity, with which scale dtype)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

Scaling = Literal["absmax", "signed_absmax", "minmax", "absmean", "mx"]
ScaleDtype = Literal["fp32", "fp16", "bf16", "e8m0"]
Granularity = Literal["tensor", "channel", "group"]
Pow2Scales = Literal["none", "all", "ratio"]

SCALE_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8}
SHIFT_BITS = 4  # pow2_scales="ratio": bits of each group's shift k, so 0 ≤ k ≤ 2^SHIFT_BITS - 1


@dataclass(frozen=True)
class NumberFormat:
    """A finite set of values indexed by b-bit codes, and the rule that scales a group onto it.

    ``values[c]`` is the value of code ``c`` before scaling (NaN marks a code that is never used,
    e.g. FP8 E4M3's NaN pattern or ternary's fourth code). A weight group ``x`` is stored as codes
    and a scale ``s`` (and, for ``minmax``, an offset ``m``): ``x ≈ s * values[code] + m``.
    """

    name: str
    family: str
    bits: int
    values: tuple[float, ...]
    scaling: Scaling
    description: str
    block_size: int | None = None  # fixed group size (MX formats: 32)
    scale_dtype: ScaleDtype | None = None  # fixed scale dtype (MX formats: e8m0)
    emax: int | None = None  # MX: exponent of the element format's largest value
    default_group_size: int = 64
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.values) != 2**self.bits:
            raise ValueError(f"{self.name}: {len(self.values)} values for {self.bits}-bit codes")

    @cached_property
    def grid(self) -> torch.Tensor:
        """Sorted distinct representable values (float64)."""
        return torch.tensor(sorted({v for v in self.values if not math.isnan(v)}), dtype=torch.float64)

    @cached_property
    def _grid_codes(self) -> torch.Tensor:
        """Code of each grid value (the lowest code when two codes share a value, e.g. ±0)."""
        first: dict[float, int] = {}
        for code, v in enumerate(self.values):
            if not math.isnan(v) and v not in first:
                first[v] = code
        return torch.tensor([first[float(v)] for v in self.grid.tolist()], dtype=torch.uint8)

    @cached_property
    def _midpoints(self) -> torch.Tensor:
        g = self.grid.to(torch.float32)
        return (g[1:] + g[:-1]) / 2

    @cached_property
    def value_table(self) -> torch.Tensor:
        """float32 value of each code, unused codes mapped to 0 (for dequantization by indexing)."""
        return torch.tensor([0.0 if math.isnan(v) else v for v in self.values], dtype=torch.float32)

    @cached_property
    def code_offset(self) -> float | None:
        """k when every code's value is ``code + k`` (integer formats: dequantize by arithmetic), else None."""
        k = self.values[0]
        return k if all(v == c + k for c, v in enumerate(self.values)) else None

    @cached_property
    def grid_code_offset(self) -> float | None:
        """k when every representable code's value is ``code + k`` and the unused (NaN) codes come after them, as in
        integer formats and ternary ({-1, 0, +1} and one unused code): the nearest code is then arithmetic."""
        finite = [v for v in self.values if not math.isnan(v)]
        k = self.values[0]
        uniform = all(v == c + k for c, v in enumerate(finite))
        return k if uniform and all(math.isnan(v) for v in self.values[len(finite):]) else None

    def code_values(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 value of each code."""
        if self.code_offset is not None:
            return codes.to(torch.float32) + self.code_offset
        return torch.take(self.value_table.to(codes.device), codes.long())

    @property
    def max_value(self) -> float:
        return float(self.grid[-1])

    @property
    def min_value(self) -> float:
        return float(self.grid[0])

    @property
    def max_abs(self) -> float:
        return float(self.grid.abs().max())

    @property
    def asymmetric(self) -> bool:
        return self.scaling == "minmax"

    def nearest_codes(self, y: torch.Tensor) -> torch.Tensor:
        """Code of the grid value nearest to each entry of ``y`` (already divided by the scale).

        Values beyond the grid saturate to its ends; an exact tie goes to the lower value.
        """
        if self.grid_code_offset is not None:  # uniform integer grid: arithmetic is ~6x faster than a search
            q = torch.ceil(y.to(torch.float32) - 0.5).clamp_(self.min_value, self.max_value)
            return (q - self.grid_code_offset).to(torch.uint8)
        idx = torch.bucketize(y.to(torch.float32), self._midpoints.to(y.device), right=False)
        return self._grid_codes.to(y.device)[idx]


class QuantSpec(BaseModel):
    """How one weight matrix is quantized: format, granularity and scale storage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = Field(description="Number format name (see `weightwise formats`), e.g. int4, nf4, fp4_e2m1, mxfp4.")
    granularity: Granularity = Field(
        "group",
        description="Scale per whole tensor, per output channel (row), or per group of input-dimension entries.",
    )
    group_size: int | None = Field(
        None,
        description="Entries per group along the input dimension (granularity=group). "
        "Default: the format's block size (MX: 32) or its default group (64; small minifloats 32).",
    )
    scale_dtype: ScaleDtype | None = Field(
        None, description="Storage dtype of scales (and offsets): fp32, fp16, bf16 or e8m0. Default: fp16 (MX: e8m0)."
    )
    pad: bool = Field(
        False,
        description="Allow a group size that does not divide the row: the last group of each row is then "
        "shorter and its scale uses its real entries only. Without it such a group size is an error.",
    )
    pow2_scales: Pow2Scales = Field(
        "none",
        description="Power-of-two scale constraint (ZeroQuant-FP): 'all' rounds every group scale up to a power "
        "of two; 'ratio' keeps one real scale per row (its largest group scale) and gives each group that scale "
        "times 2^-k, k = 0..15 stored in 4 bits, the smallest such scale that does not clip. Offsets of "
        "asymmetric formats stay unconstrained. MX scales are powers of two already ('all' changes nothing).",
    )

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        from weightwise.formats.registry import get_format  # registry imports this module

        fmt = get_format(self.format)
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size}")
        if fmt.block_size is not None:
            if self.granularity != "group" or self.group_size not in (None, fmt.block_size):
                raise ValueError(f"{fmt.name} uses blocks of {fmt.block_size}: leave group_size unset or {fmt.block_size}")
            if self.scale_dtype not in (None, fmt.scale_dtype):
                raise ValueError(f"{fmt.name} stores its scales as {fmt.scale_dtype}")
        if fmt.asymmetric and self.scale_dtype == "e8m0":
            raise ValueError(f"{fmt.name} stores an offset per group, which e8m0 cannot hold: use fp16, bf16 or fp32")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size applies only to granularity 'group', not '{self.granularity}'")
        if self.pow2_scales == "ratio":
            if fmt.block_size is not None:
                raise ValueError(f"{fmt.name} already shares one power-of-two scale per block: use pow2_scales 'none' or 'all'")
            if self.granularity != "group":
                raise ValueError("pow2_scales 'ratio' relates the group scales of a row: it needs granularity 'group'")
        return self

    @property
    def number_format(self) -> NumberFormat:
        from weightwise.formats.registry import get_format

        return get_format(self.format)

    @property
    def resolved_group_size(self) -> int | None:
        if self.granularity != "group":
            return None
        fmt = self.number_format
        return self.group_size or fmt.block_size or fmt.default_group_size

    @property
    def resolved_scale_dtype(self) -> ScaleDtype:
        return self.scale_dtype or self.number_format.scale_dtype or "fp16"


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight: packed codes, per-group scales (and offsets), its shape and spec.

    With ``spec.pow2_scales == "ratio"`` the scale of group (r, j) is ``scales[r, 0] · 2^-k[r, j]``:
    ``scales`` then holds one real scale per row and ``scale_shifts`` the shifts k.
    """

    packed_codes: torch.Tensor  # uint8, codes of the real entries, row-major, bit-packed
    scales: torch.Tensor  # (row groups, column groups) in the storage dtype (e8m0: uint8 exponent); ratio: (rows, 1)
    offsets: torch.Tensor | None  # (row groups, column groups) in the storage dtype, asymmetric formats only
    shape: tuple[int, int]
    spec: QuantSpec
    scale_shifts: torch.Tensor | None = None  # ratio only: uint8, the (rows, groups) shifts k bit-packed in SHIFT_BITS
