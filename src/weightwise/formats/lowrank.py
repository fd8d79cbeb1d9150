"""Low-rank compensation (LoRC, ZeroQuant-V2/FP, arXiv 2307.09782) of a quantization error, as pure math.

The error E = W − dequant(W) is approximated by its best rank-r factorisation E ≈ A·B
(A = U_r·√S_r, B = √S_r·V_rᵀ, splitting the singular values evenly so both factors have the
same dynamic range), and A·B is added back at inference. The factors are stored in fp16, or in
int8 with one fp16 scale per row of each factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from weightwise.errors import WeightwiseError
from weightwise.formats.quantizer import check_finite

FactorDtype = Literal["fp16", "int8"]


@dataclass
class LowRankFactors:
    """A (out, r) and B (r, in) as stored; int8 factors carry fp16 scales per row of A and of B."""

    a: torch.Tensor  # float16, or int8 codes with a_scales
    b: torch.Tensor
    a_scales: torch.Tensor | None = None  # (out,) float16, int8 only
    b_scales: torch.Tensor | None = None  # (r,) float16, int8 only

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 A and B from the stored representation."""
        if self.a_scales is None:
            return self.a.to(torch.float32), self.b.to(torch.float32)
        a = self.a.to(torch.float32) * self.a_scales.to(torch.float32).unsqueeze(1)
        b = self.b.to(torch.float32) * self.b_scales.to(torch.float32).unsqueeze(1)
        return a, b

    def delta(self) -> torch.Tensor:
        """The compensation A·B (out, in) in float32, to add to the dequantized weight."""
        a, b = self.factors()
        return a @ b

    def stored_bits(self) -> int:
        """Exact bits of every stored tensor (factors and, for int8, their scales)."""
        tensors = (self.a, self.b, self.a_scales, self.b_scales)
        return sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes in [-127, 127] per row with the fp16 scale absmax/127 (rounded before coding)."""
    scale = (x.abs().amax(dim=1) / 127).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(x / scale.to(torch.float32).unsqueeze(1)).clamp(-127, 127)
    return codes.to(torch.int8), scale


def low_rank_compensation(
    error: torch.Tensor, rank: int, factor_dtype: FactorDtype = "fp16", *, randomized: bool = False, oversample: int = 8, niter: int = 4
) -> LowRankFactors:
    """Rank-``rank`` factors of ``error`` (out, in) = W − dequant(W), stored as ``factor_dtype``.

    ``randomized`` uses ``torch.svd_lowrank`` (rank + ``oversample`` columns, ``niter`` power
    iterations; draws from torch's default generator) instead of a full SVD: much faster for
    large matrices and small ranks, and near-optimal when the spectrum decays.
    """
    if error.ndim != 2:
        raise WeightwiseError(f"LoRC: the error must be a 2-D matrix, got shape {tuple(error.shape)}")
    full = min(error.shape)
    if not 1 <= rank <= full:
        raise WeightwiseError(f"LoRC: rank must be between 1 and min(out, in) = {full}, got {rank}")
    if factor_dtype not in ("fp16", "int8"):
        raise WeightwiseError(f"LoRC: factor_dtype must be 'fp16' or 'int8', got {factor_dtype!r}")
    check_finite(error, "LoRC error matrix")
    e = error.detach().to(torch.float32)
    if randomized:
        u, s, v = torch.svd_lowrank(e, q=min(rank + oversample, full), niter=niter)
        vh = v.mT
    else:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
    root = s[:rank].sqrt()
    a, b = u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]
    if factor_dtype == "fp16":
        return LowRankFactors(a.to(torch.float16), b.to(torch.float16))
    (a_codes, a_scales), (b_codes, b_scales) = _int8_rows(a), _int8_rows(b)
    return LowRankFactors(a_codes, b_codes, a_scales, b_scales)
