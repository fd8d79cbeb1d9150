"""IQ4_NL: llama.cpp's non-uniform 4-bit grid as a weightwise format (codes = GGUF nibbles)."""

import torch
from gguf.quants import IQ4_NL

from weightwise.formats import QuantSpec, dequantize, get_format, quantize_tensor
from weightwise.formats.quantizer import group_scales, unpacked_codes
from weightwise.quantize.methods import GPTQConfig, run_method
from weightwise.quantize.methods.gptq import output_error

SPEC = QuantSpec(format="iq4_nl")


def _gaussian(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _sqnr_db(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10((w**2).sum() / ((w - approx) ** 2).sum()))


def test_levels_are_gguf_iq4_nl_kvalues_in_nibble_order():
    fmt = get_format("iq4_nl")
    assert fmt.values == tuple(float(v) for v in IQ4_NL.kvalues)
    assert fmt.bits == 4 and fmt.scaling == "signed_absmax" and SPEC.resolved_group_size == 32


def test_rtn_lands_on_the_grid_with_the_largest_entry_on_minus_127():
    w = _gaussian()
    qt = quantize_tensor(w, SPEC)
    codes, scales = unpacked_codes(qt), group_scales(qt)
    assert scales.shape == (64, 16) and qt.scales.dtype == torch.float16
    levels = dequantize(qt).reshape(64, 16, 32) / scales.unsqueeze(-1)
    assert torch.allclose(levels, get_format("iq4_nl").value_table[codes.long()].reshape(64, 16, 32))
    # the largest-magnitude entry of each group is code 0 (-127): exact up to rounding its scale to fp16
    groups = w.reshape(64, 16, 32)
    top = groups.abs().argmax(dim=-1, keepdim=True)
    assert (torch.gather(codes.reshape(64, 16, 32), -1, top) == 0).all()
    expected = (torch.gather(groups, -1, top).squeeze(-1) / -127).half().float() * -127
    assert torch.equal(torch.gather(dequantize(qt).reshape(64, 16, 32), -1, top).squeeze(-1), expected)


def test_rtn_on_gaussian_weights_beats_int4_at_the_same_group_size():
    w = _gaussian()
    iq4 = _sqnr_db(w, dequantize(quantize_tensor(w, SPEC)))
    int4 = _sqnr_db(w, dequantize(quantize_tensor(w, QuantSpec(format="int4", group_size=32))))
    assert iq4 > int4 + 0.3  # observed 21.9 vs 21.3 dB


def test_gptq_stays_on_the_grid_and_beats_rtn():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen) / 128**0.5)
    hessian = x.T @ x / 512
    qt, _ = run_method(GPTQConfig(), w, SPEC, {"hessian": hessian})
    levels = dequantize(qt).reshape(32, 4, 32) / group_scales(qt).unsqueeze(-1)
    assert torch.allclose(levels, get_format("iq4_nl").value_table[unpacked_codes(qt).long()].reshape(32, 4, 32))
    rtn = quantize_tensor(w, SPEC)
    assert output_error(w, dequantize(qt), hessian) < 0.9 * output_error(w, dequantize(rtn), hessian)
