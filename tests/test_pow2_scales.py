"""Power-of-two scale constraints (ZeroQuant-FP): every scale a power of two, or power-of-two ratios per row."""

import math

import pytest
import torch

from weightwise.formats import QuantSpec, dequantize, quantize_tensor, storage_bits
from weightwise.formats.quantizer import decode_scale, group_scales, stored_layout, to_groups

FORMATS = ["int4", "int4_asym", "int3", "nf4", "fp4_e2m1", "fp6_e2m3", "int8"]


def _weight(rows: int = 8, cols: int = 128, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, cols) * torch.logspace(-2, 0, cols)


def _is_pow2(x: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(x)
    return bool((mantissa.abs() == 0.5).all())


def _needed_scales(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The smallest positive scale per group at which no entry clips."""
    fmt, groups = spec.number_format, to_groups(w, spec)
    if fmt.asymmetric:
        return (groups.amax(-1) - groups.amin(-1)) / (fmt.max_value - fmt.min_value)
    return groups.abs().amax(-1) / fmt.max_value


def _group_max_error(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return (dequantize(quantize_tensor(w, spec)) - w).abs().reshape(to_groups(w, spec).shape).amax(-1)


@pytest.mark.parametrize("name", FORMATS + ["ternary"])
@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16", "fp32"])
def test_all_makes_every_scale_a_power_of_two(name, scale_dtype):
    w = _weight()
    spec = QuantSpec(format=name, group_size=32, scale_dtype=scale_dtype, pow2_scales="all")
    qt = quantize_tensor(w, spec)
    assert _is_pow2(group_scales(qt))
    if qt.offsets is not None:  # offsets are not constrained
        assert not _is_pow2(qt.offsets.float())


@pytest.mark.parametrize("name", FORMATS)
def test_all_costs_accuracy_but_at_most_twice_the_worst_case_error(name):
    w = _weight(16, 256)
    free = QuantSpec(format=name, group_size=32, scale_dtype="fp32")
    pow2 = QuantSpec(format=name, group_size=32, scale_dtype="fp32", pow2_scales="all")
    fmt = free.number_format
    err_free = (dequantize(quantize_tensor(w, free)) - w).square().sum()
    err_pow2 = (dequantize(quantize_tensor(w, pow2)) - w).square().sum()
    assert err_pow2 >= err_free
    # unconstrained worst case per group: half the widest step, or one step where signed-absmax clips
    steps = (fmt.grid[1:] - fmt.grid[:-1]).max().item() * (1.0 if fmt.scaling == "signed_absmax" else 0.5)
    bound = group_scales(quantize_tensor(w, free)).abs() * steps
    assert (_group_max_error(w, pow2) <= 2 * bound * (1 + 1e-6)).all()
    ratio = group_scales(quantize_tensor(w, pow2)).abs() / group_scales(quantize_tensor(w, free)).abs()
    assert ((ratio >= 1) & (ratio < 2)).all()  # rounded up, by less than a factor 2


@pytest.mark.parametrize("spec", [QuantSpec(format="mxfp4"), QuantSpec(format="int4", group_size=32, scale_dtype="e8m0")], ids=["mxfp4", "int4-e8m0"])
def test_all_changes_nothing_where_scales_are_powers_of_two_already(spec):
    w = _weight()
    none, pow2 = quantize_tensor(w, spec), quantize_tensor(w, spec.model_copy(update={"pow2_scales": "all"}))
    assert torch.equal(none.scales, pow2.scales) and torch.equal(none.packed_codes, pow2.packed_codes)


@pytest.mark.parametrize(
    "name,scale_dtype", [(n, d) for n in FORMATS for d in ("fp16", "fp32", "e8m0") if not (n == "int4_asym" and d == "e8m0")]
)
def test_ratio_scales_are_row_scale_times_the_largest_safe_power_of_two(name, scale_dtype):
    w = _weight()
    w[3, 32:64] *= 1e-6  # forces a large shift
    spec = QuantSpec(format=name, group_size=32, scale_dtype=scale_dtype, pow2_scales="ratio")
    qt = quantize_tensor(w, spec)
    scales, row = group_scales(qt), decode_scale(qt.scales, scale_dtype)
    shift = torch.log2(row / scales)
    assert torch.equal(shift, shift.round()) and shift.min() == 0 and shift.max() <= 15
    assert (shift.amin(-1) == 0).all()  # the row scale is one of the group scales
    needed = _needed_scales(w, spec)
    assert (scales >= needed * (1 - 2**-10)).all()  # no group clips (up to the row scale's rounding)
    assert ((shift == 15) | (scales / 2 < needed)).all()  # k is the largest that does not clip
    assert shift[3, 1] == 15


@pytest.mark.parametrize("name", FORMATS)
def test_ratio_error_is_at_least_the_unconstrained_and_within_half_a_step(name):
    w = _weight(16, 256)
    free = QuantSpec(format=name, group_size=32, scale_dtype="fp32")
    ratio = free.model_copy(update={"pow2_scales": "ratio"})
    qt = quantize_tensor(w, ratio)
    assert (dequantize(qt) - w).square().sum() >= (dequantize(quantize_tensor(w, free)) - w).square().sum()
    fmt = free.number_format
    half_step = group_scales(qt) * (fmt.grid[1:] - fmt.grid[:-1]).max().item() / 2
    assert (_group_max_error(w, ratio) <= half_step * (1 + 1e-6)).all()


def test_ratio_handles_zero_groups_rows_and_padding():
    w = _weight(4, 80)
    w[1] = 0
    w[2, :32] = 0
    spec = QuantSpec(format="int4", group_size=32, pad=True, pow2_scales="ratio")
    qt = quantize_tensor(w, spec)
    deq = dequantize(qt)
    assert torch.isfinite(deq).all() and (deq[1] == 0).all() and (deq[2, :32] == 0).all()
    assert qt.scales.shape == (4, 1) and group_scales(qt).shape == (4, 3)
    assert group_scales(qt)[2, 0] == qt.scales[2, 0].float() * 2**-15


@pytest.mark.parametrize("mode", ["none", "all", "ratio"])
@pytest.mark.parametrize("name,scale_dtype", [("int4", "fp16"), ("int4_asym", "bf16"), ("nf4", "fp32"), ("int3", "e8m0")])
def test_storage_bits_are_the_bytes_of_the_stored_tensors(mode, name, scale_dtype):
    w = _weight(6, 96)
    spec = QuantSpec(format=name, group_size=32, scale_dtype=scale_dtype, pow2_scales=mode)
    qt = quantize_tensor(w, spec)
    layout = stored_layout(tuple(w.shape), spec)
    for field, (shape, dtype) in layout.items():
        tensor = getattr(qt, field)
        assert tuple(tensor.shape) == shape and tensor.dtype == dtype
    held = [t for t in (qt.packed_codes, qt.scales, qt.offsets, qt.scale_shifts) if t is not None]
    assert len(held) == len(layout)
    assert storage_bits(tuple(w.shape), spec) == sum(t.numel() * t.element_size() * 8 for t in held)


def test_ratio_storage_formula():
    """6×96 int4, groups of 32, fp16: codes + one fp16 scale per row + 18 four-bit shifts (in 8-shift words)."""
    spec = QuantSpec(format="int4", group_size=32, pow2_scales="ratio")
    assert storage_bits((6, 96), spec) == 6 * 96 * 4 + 6 * 16 + math.ceil(18 / 8) * 8 * 4
    asym = QuantSpec(format="int4_asym", group_size=32, pow2_scales="ratio")
    assert storage_bits((6, 96), asym) == storage_bits((6, 96), spec) + 18 * 16  # offsets stay fp16 per group
    assert storage_bits((6, 96), spec.model_copy(update={"pow2_scales": "all"})) == 6 * 96 * 4 + 18 * 16


def test_spec_validation():
    with pytest.raises(ValueError, match="power-of-two scale per block"):
        QuantSpec(format="mxfp4", pow2_scales="ratio")
    with pytest.raises(ValueError, match="needs granularity 'group'"):
        QuantSpec(format="int4", granularity="channel", pow2_scales="ratio")
    with pytest.raises(ValueError):
        QuantSpec(format="int4", pow2_scales="some")
    assert QuantSpec(format="int4").pow2_scales == "none"
    spec = QuantSpec(format="int4", granularity="channel", pow2_scales="all")
    assert QuantSpec(**spec.model_dump()) == spec
    assert _is_pow2(group_scales(quantize_tensor(_weight(), spec)))
