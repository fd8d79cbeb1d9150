"""Number formats: grids, rounding, scaling and packing, property-tested."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightwise.errors import WeightwiseError
from weightwise.formats import FORMAT_NAMES, QuantSpec, dequantize, get_format, pack_codes, quantize_tensor, storage_bits, unpack_codes
from weightwise.formats.quantizer import from_codes, to_codes, to_groups

ALL_FORMATS = list(FORMAT_NAMES) + ["fp5_e2m2", "fp3_e1m1"]
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


def _round_trip_unit(fmt, y: torch.Tensor) -> torch.Tensor:
    """Quantize values already divided by the scale (scale 1, no offset), return the grid values."""
    one = torch.ones(y.shape[:-1])
    return from_codes(to_codes(y, one, None, fmt), one, None, fmt)


@pytest.mark.parametrize("name", ALL_FORMATS)
@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=64))
def test_dequantized_values_lie_on_the_grid(name, values):
    fmt = get_format(name)
    q = _round_trip_unit(fmt, torch.tensor([values]))
    grid = fmt.grid.to(torch.float32)
    assert torch.isin(q, grid).all()


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_grid_points_quantize_exactly(name):
    fmt = get_format(name)
    grid = fmt.grid.to(torch.float32).unsqueeze(0)
    assert torch.equal(_round_trip_unit(fmt, grid), grid)
    scale = torch.tensor([0.0625])  # a power of two keeps grid·scale exact
    codes = to_codes(grid * scale, scale, None, fmt)
    assert torch.equal(from_codes(codes, scale, None, fmt), grid * scale)


@pytest.mark.parametrize("name", ALL_FORMATS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_rounding_error_at_most_half_a_step_inside_range(name, data):
    fmt = get_format(name)
    lo, hi = fmt.min_value, fmt.max_value
    y = data.draw(st.lists(st.floats(lo, hi, allow_nan=False, width=32), min_size=1, max_size=32))
    y = torch.tensor([y])
    q = _round_trip_unit(fmt, y)
    grid = fmt.grid.to(torch.float32)
    nearest = (grid.unsqueeze(0) - y.reshape(-1, 1)).abs().min(dim=1).values
    assert torch.allclose((q - y).abs().reshape(-1), nearest, atol=1e-6, rtol=1e-6)
    idx = torch.bucketize(y.reshape(-1), grid).clamp(1, len(grid) - 1)
    step = grid[idx] - grid[idx - 1]
    assert ((q - y).abs().reshape(-1) <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("name", ALL_FORMATS)
@settings(max_examples=60, deadline=None)
@given(a=finite, b=finite)
def test_rounding_is_monotone(name, a, b):
    fmt = get_format(name)
    lo, hi = min(a, b), max(a, b)
    q = _round_trip_unit(fmt, torch.tensor([[lo, hi]]))
    assert q[0, 0] <= q[0, 1]


ARITHMETIC_FORMATS = [n for n in ALL_FORMATS if get_format(n).grid_code_offset is not None]


def test_integer_and_ternary_grids_round_by_arithmetic():
    assert {"int2", "int4_asym", "int8", "ternary"} <= set(ARITHMETIC_FORMATS)
    assert get_format("ternary").code_offset is None  # its unused fourth code still dequantizes through the table


@pytest.mark.parametrize("name", ARITHMETIC_FORMATS)
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(finite, st.integers(-130, 130).map(lambda i: i / 2)), min_size=1, max_size=64))
def test_arithmetic_rounding_picks_the_nearest_code_ties_low(name, values):
    """The arithmetic nearest code equals a plain search of the grid (nearest value, an exact tie to the lower)."""
    fmt = get_format(name)
    y = torch.tensor(values, dtype=torch.float32)
    grid = fmt.grid.to(torch.float32)
    distance = (y.unsqueeze(-1) - grid).abs()
    nearest = grid[distance.argmin(-1)]  # argmin takes the first, i.e. the lower, of two equal distances
    assert torch.equal(fmt.code_values(fmt.nearest_codes(y)), nearest)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_rejected(bad):
    w = torch.randn(4, 32)
    w[1, 3] = bad
    with pytest.raises(WeightwiseError, match="NaN/Inf"):
        quantize_tensor(w, QuantSpec(format="int4", group_size=32))


def test_named_minifloat_grids_match_their_specs():
    e2m1 = get_format("fp4_e2m1").grid.tolist()
    assert [v for v in e2m1 if v >= 0] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert get_format("fp8_e4m3").max_value == 448 and len(get_format("fp8_e4m3").grid) == 253
    assert get_format("fp8_e5m2").max_value == 57344
    assert get_format("fp6_e3m2").max_value == 28 and get_format("fp6_e2m3").max_value == 7.5
    assert get_format("fp8_e4m3").grid[get_format("fp8_e4m3").grid > 0].min() == 2.0**-9  # smallest subnormal


def test_nf4_matches_published_levels():
    published = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    assert torch.allclose(get_format("nf4").grid.float(), torch.tensor(published), atol=1e-4)


def test_integer_grids():
    assert get_format("int4").grid.tolist() == list(range(-8, 8))
    assert get_format("int3_asym").grid.tolist() == list(range(8))
    assert get_format("ternary").grid.tolist() == [-1, 0, 1]


def test_unknown_format_is_a_clear_error():
    with pytest.raises(WeightwiseError, match="unknown format 'int9'"):
        get_format("int9")


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_packing_round_trips(bits, data):
    n = data.draw(st.integers(0, 200))
    codes = torch.tensor(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n if bits == 8 else -(-n // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packing_layout_is_little_endian():
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21, 0, 0, 0]
    assert pack_codes(torch.tensor([7] + [0] * 7), 3).tolist() == [7, 0, 0]


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="int4", group_size=32),
        QuantSpec(format="int3_asym", group_size=64),
        QuantSpec(format="nf4", granularity="channel"),
        QuantSpec(format="fp4_e2m1", group_size=16, scale_dtype="bf16"),
        QuantSpec(format="fp8_e4m3", granularity="tensor", scale_dtype="fp32"),
        QuantSpec(format="mxfp4"),
        QuantSpec(format="mxint8"),
        QuantSpec(format="ternary", granularity="channel"),
        QuantSpec(format="int6", group_size=32, scale_dtype="e8m0"),
    ],
    ids=lambda s: f"{s.format}-{s.granularity}-{s.group_size}",
)
def test_quantize_tensor_round_trip_and_storage(spec):
    torch.manual_seed(0)
    w = torch.randn(6, 64) * torch.logspace(-2, 1, 64)
    qt = quantize_tensor(w, spec)
    deq = dequantize(qt)
    assert deq.shape == w.shape and torch.isfinite(deq).all()
    bits = qt.packed_codes.numel() * 8 + sum(t.numel() * t.element_size() * 8 for t in (qt.scales, qt.offsets) if t is not None)
    assert storage_bits(tuple(w.shape), spec) == bits
    # dequantizing the dequantized weight again changes nothing (it is on the grid of the same scales)
    again = dequantize(quantize_tensor(deq, spec))
    if spec.number_format.scaling in ("absmax", "signed_absmax", "minmax"):
        assert torch.allclose(again, deq, atol=1e-5 * w.abs().max())


@pytest.mark.parametrize("name", ["int4", "int4_asym", "int8", "nf4", "fp4_e2m1", "fp6_e2m3", "fp8_e4m3"])
def test_per_element_error_within_half_step_of_scaled_grid(name):
    torch.manual_seed(1)
    spec = QuantSpec(format=name, group_size=32, scale_dtype="fp32")
    w = torch.randn(8, 96)
    qt = quantize_tensor(w, spec)
    fmt = spec.number_format
    groups = to_groups(w, spec)
    scale = qt.scales.float().unsqueeze(-1)
    offset = 0 if qt.offsets is None else qt.offsets.float().unsqueeze(-1)
    ends = torch.stack([scale * fmt.min_value, scale * fmt.max_value]) + offset
    inside = (groups >= ends.amin(0) - 1e-6) & (groups <= ends.amax(0) + 1e-6)
    max_step = (fmt.grid[1:] - fmt.grid[:-1]).max().item()
    err = (dequantize(qt) - w).abs().reshape(groups.shape)
    half_step = scale.abs() * max_step / 2 + 1e-6
    assert (err <= half_step)[inside].all()
    # outside the range only the signed-absmax integer clips, by at most one step (as GGUF Q4_0 does)
    assert (err <= 2 * half_step).all()


def test_group_size_must_divide_unless_padding():
    w = torch.randn(3, 40)
    with pytest.raises(WeightwiseError, match="does not divide the row length 40"):
        quantize_tensor(w, QuantSpec(format="int4", group_size=32))
    w[:, 32:] *= 1e-3  # a tiny partial last group: its scale must come from its own 8 entries
    qt = quantize_tensor(w, QuantSpec(format="int4", group_size=32, pad=True))
    assert qt.scales.shape == (3, 2)
    assert (qt.scales[:, 1].float().abs() < qt.scales[:, 0].float().abs() / 100).all()
    deq = dequantize(qt)
    assert deq.shape == w.shape
    assert (deq[:, 32:] - w[:, 32:]).abs().max() <= w[:, 32:].abs().max() / 8  # within one int4 step of its own scale


def test_mx_scale_follows_the_ocp_rule():
    w = torch.zeros(1, 32)
    w[0, 0] = 6.0
    w[0, 1] = 1.3
    qt = quantize_tensor(w, QuantSpec(format="mxfp4"))
    assert qt.scales.dtype == torch.uint8 and int(qt.scales) == 127  # 2^(floor(log2 6) - 2) = 1
    assert dequantize(qt)[0, :2].tolist() == [6.0, 1.5]
    w[0, 0] = 7.9  # floor(log2 7.9) = 2 as well: 7.9 saturates to 6
    assert dequantize(quantize_tensor(w, QuantSpec(format="mxfp4")))[0, 0] == 6.0


def test_q4_1_style_weights_are_reproduced_exactly():
    """Weights built like GGUF Q4_1 (fp16 d and m, codes 0..15 with both ends present) come back bit-exact."""
    torch.manual_seed(2)
    rows, groups = 5, 4
    d = (torch.rand(rows, groups) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(rows, groups) * 0.05).half().float()
    q = torch.randint(0, 16, (rows, groups, 32))
    q[..., 0], q[..., 1] = 0, 15
    w = (q * d.unsqueeze(-1) + m.unsqueeze(-1)).reshape(rows, -1)
    spec = QuantSpec(format="int4_asym", group_size=32, scale_dtype="fp16")
    assert torch.equal(dequantize(quantize_tensor(w, spec)), w)


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="blocks of 32"):
        QuantSpec(format="mxfp4", group_size=64)
    with pytest.raises(ValueError, match="e8m0 cannot hold"):
        QuantSpec(format="int4_asym", scale_dtype="e8m0")
    with pytest.raises(ValueError, match="only to granularity"):
        QuantSpec(format="int4", granularity="channel", group_size=32)


@pytest.mark.parametrize("name,emax", [("mxfp4", 2), ("mxfp6_e3m2", 4), ("mxfp6_e2m3", 2), ("mxfp8_e4m3", 8), ("mxfp8_e5m2", 15), ("mxint8", 0)])
def test_mx_emax_matches_the_ocp_table(name, emax):
    assert get_format(name).emax == emax


def test_mxint8_is_near_lossless():
    torch.manual_seed(3)
    w = torch.randn(16, 128)
    err = dequantize(quantize_tensor(w, QuantSpec(format="mxint8"))) - w
    assert 10 * torch.log10(w.pow(2).mean() / err.pow(2).mean()) > 35
