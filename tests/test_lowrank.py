"""Low-rank compensation (LoRC) of quantization errors."""

import pytest
import torch

from weightwise.errors import WeightwiseError
from weightwise.formats import QuantSpec, fake_quantize
from weightwise.formats.lowrank import low_rank_compensation


def _error(out: int = 24, inp: int = 64, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(out, inp) * torch.logspace(-1, 0, inp)
    return w - fake_quantize(w, QuantSpec(format="int3", group_size=32))


def _truncation_error(e: torch.Tensor, rank: int) -> float:
    """‖E − best rank-r approximation‖_F (Eckart–Young: the norm of the dropped singular values)."""
    return torch.linalg.svdvals(e.double())[rank:].norm().item()


@pytest.mark.parametrize("rank", [1, 4, 12, 24])
def test_fp16_factors_reach_the_best_rank_r_error(rank):
    e = _error()
    lr = low_rank_compensation(e, rank)
    assert lr.a.shape == (24, rank) and lr.b.shape == (rank, 64) and lr.a.dtype == torch.float16
    residual = (e - lr.delta()).norm().item()
    best = _truncation_error(e, rank)
    assert best - 1e-6 <= residual <= best + 2e-3 * e.norm().item()  # fp16 rounding of the factors only
    assert residual < e.norm().item()


@pytest.mark.parametrize("rank", [2, 8])
def test_int8_factors_close_to_fp16(rank):
    e = _error()
    fp16, int8 = low_rank_compensation(e, rank), low_rank_compensation(e, rank, "int8")
    assert int8.a.dtype == torch.int8 and int8.a_scales.shape == (24,) and int8.b_scales.shape == (rank,)
    assert (int8.delta() - fp16.delta()).norm() <= 0.02 * fp16.delta().norm()
    assert (e - int8.delta()).norm() <= _truncation_error(e, rank) + 0.01 * e.norm()


def test_randomized_matches_the_full_svd_on_a_decaying_spectrum():
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(96, 48))
    e = (u * 0.5 ** torch.arange(48.0)) @ v.T
    exact, fast = low_rank_compensation(e, 6), low_rank_compensation(e, 6, randomized=True)
    assert (fast.delta() - exact.delta()).norm() <= 1e-3 * e.norm()


def test_int8_handles_zero_rows():
    e = _error()
    e[5] = 0
    lr = low_rank_compensation(e, 3, "int8")
    assert torch.isfinite(lr.delta()).all() and lr.delta()[5].abs().max() < 1e-3


def test_stored_bits_are_exact():
    e = _error(24, 64)
    assert low_rank_compensation(e, 5).stored_bits() == (24 * 5 + 5 * 64) * 16
    assert low_rank_compensation(e, 5, "int8").stored_bits() == (24 * 5 + 5 * 64) * 8 + (24 + 5) * 16


@pytest.mark.parametrize("rank", [0, -1, 25])
def test_rank_out_of_range_is_a_clear_error(rank):
    with pytest.raises(WeightwiseError, match=r"rank must be between 1 and min\(out, in\) = 24"):
        low_rank_compensation(_error(24, 64), rank)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(WeightwiseError, match="2-D"):
        low_rank_compensation(torch.zeros(4), 1)
    with pytest.raises(WeightwiseError, match="factor_dtype"):
        low_rank_compensation(_error(), 1, "int4")
    e = _error()
    e[0, 0] = float("nan")
    with pytest.raises(WeightwiseError, match="NaN/Inf"):
        low_rank_compensation(e, 1)
