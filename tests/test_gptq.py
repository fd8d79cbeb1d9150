"""GPTQ: beats round-to-nearest on the layer-output error, stays on the format's grid, handles bad Hessians."""

import pytest
import torch

from weightwise.errors import WeightwiseError
from weightwise.formats import QuantSpec, dequantize, quantize_tensor
from weightwise.formats.quantizer import all_finite, decode_scale, from_codes, from_groups, to_codes, to_groups, unpacked_codes
from weightwise.quantize.methods.gptq import _inverse_cholesky, _reversed_hessian, gptq, output_error


def _layer(rows: int = 32, cols: int = 128, n: int = 512, seed: int = 0):
    """Weight, calibration inputs with strongly correlated columns (a shared component, mixing,
    uneven channel scales) and their Hessian XᵀX / n."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols, generator=gen)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols**0.5
    x = (z @ mix + 0.8 * torch.randn(n, 1, generator=gen)) * torch.linspace(0.5, 2.0, cols)
    return torch.randn(rows, cols, generator=gen), x, x.T @ x / n


def _ratio(w, h, spec, **options) -> float:
    """GPTQ's output error over RTN's."""
    qt, _ = gptq(w, spec, h, **options)
    return output_error(w, dequantize(qt), h) / output_error(w, dequantize(quantize_tensor(w, spec)), h)


SPECS = {
    "int4_g32": QuantSpec(format="int4", group_size=32),
    "int3_asym_g32": QuantSpec(format="int3_asym", group_size=32),
    "nf4_channel": QuantSpec(format="nf4", granularity="channel"),
    "fp4_e2m1_g16": QuantSpec(format="fp4_e2m1", group_size=16),
    "mxfp4": QuantSpec(format="mxfp4"),
}


def test_output_error_is_the_summed_squared_output_error():
    w, x, h = _layer()
    approx = w + 0.01 * torch.randn(w.shape)
    direct = float(((x @ w.T - x @ approx.T) ** 2).sum()) / x.shape[0]
    assert output_error(w, approx, h) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("name", SPECS)
def test_gptq_beats_rtn_on_correlated_inputs(name):
    # observed ratios 0.51-0.68; the bound leaves room for BLAS differences
    w, _, h = _layer()
    assert _ratio(w, h, SPECS[name]) < 0.8


@pytest.mark.parametrize("options", [{"act_order": True}, {"static_groups": False}], ids=["act_order", "dynamic"])
@pytest.mark.parametrize("name", ["int3_asym_g32", "mxfp4"])
def test_act_order_and_dynamic_groups_beat_rtn(name, options):
    w, _, h = _layer()
    assert _ratio(w, h, SPECS[name], **options) < 0.8


GRID_CASES = [
    (QuantSpec(format="int4", group_size=48, pad=True), {}),
    (QuantSpec(format="int4", group_size=48, pad=True), {"static_groups": False}),
    (QuantSpec(format="int3_asym", group_size=32, pad=True), {"act_order": True}),
    (QuantSpec(format="mxfp4", pad=True), {"static_groups": False}),
    (QuantSpec(format="ternary", group_size=32, scale_dtype="bf16", pad=True), {"static_groups": False}),
    (QuantSpec(format="fp8_e4m3", granularity="tensor"), {"act_order": True}),
    (QuantSpec(format="nf4", granularity="channel", scale_dtype="fp32"), {}),
]


@pytest.mark.parametrize("spec,options", GRID_CASES, ids=lambda v: str(v) if isinstance(v, dict) else v.format)
def test_result_lies_on_the_grid_of_its_stored_scales(spec, options):
    w, _, h = _layer(rows=8, cols=80)  # 80 = 48 + 32 and 2·32 + 16: partial last groups
    qt, diagnostics = gptq(w, spec, h, **options)
    rtn = quantize_tensor(w, spec)
    assert qt.shape == (8, 80) and qt.scales.shape == rtn.scales.shape and qt.scales.dtype == rtn.scales.dtype
    deq = dequantize(qt)
    fmt, dtype = spec.number_format, spec.resolved_scale_dtype
    scale = decode_scale(qt.scales, dtype)
    offset = None if qt.offsets is None else decode_scale(qt.offsets, dtype)
    groups = to_groups(deq, spec)
    again = from_groups(from_codes(to_codes(groups, scale, offset, fmt), scale, offset, fmt), qt.shape)
    assert torch.equal(again, deq)
    # GPTQ's per-column losses add up to the output error under the dampened Hessian: the codes
    # stored are the ones the error feedback was computed from.
    damped = h + diagnostics["damp"] * h.diagonal().mean() * torch.eye(80)
    assert diagnostics["proxy_loss"] == pytest.approx(output_error(w, deq, damped), rel=1e-3)


@pytest.mark.parametrize("options", [{}, {"static_groups": False}, {"act_order": True}], ids=["static", "dynamic", "act_order"])
@pytest.mark.parametrize("name", SPECS)
def test_diagonal_hessian_gives_rtn_exactly(name, options):
    # No correlation between inputs: the error feedback has nothing to move.
    spec = SPECS[name]
    w, _, _ = _layer(rows=8, cols=64)
    h = torch.diag(torch.linspace(0.5, 3.0, 64)) if options.get("act_order") else torch.eye(64)
    qt, _ = gptq(w, spec, h, **options)
    rtn = quantize_tensor(w, spec)
    assert torch.equal(unpacked_codes(qt), unpacked_codes(rtn))
    assert torch.equal(qt.scales, rtn.scales)
    assert (qt.offsets is None) == (rtn.offsets is None) and (qt.offsets is None or torch.equal(qt.offsets, rtn.offsets))


def test_dynamic_groups_refit_from_updated_columns():
    spec = SPECS["int3_asym_g32"]
    w, _, h = _layer()
    rtn = quantize_tensor(w, spec)
    qt, _ = gptq(w, spec, h, static_groups=False)
    assert torch.equal(qt.scales[:, 0], rtn.scales[:, 0])  # the first group has received no error yet
    assert not torch.equal(qt.scales[:, 1:], rtn.scales[:, 1:])
    static, _ = gptq(w, spec, h, act_order=True, static_groups=False)  # act_order keeps contiguous static groups
    assert torch.equal(static.scales, rtn.scales)


@pytest.mark.parametrize("static_groups", [True, False])
def test_block_size_only_regroups_the_updates(static_groups):
    spec = QuantSpec(format="int4", group_size=48, pad=True)
    w, _, h = _layer(cols=80)
    ref, _ = gptq(w, spec, h, static_groups=static_groups)
    for block_size in (1, 20, 1000):
        qt, _ = gptq(w, spec, h, block_size=block_size, static_groups=static_groups)
        assert (unpacked_codes(qt) != unpacked_codes(ref)).float().mean() < 0.01
        assert output_error(w, dequantize(qt), h) == pytest.approx(output_error(w, dequantize(ref), h), rel=1e-2)


def _indefinite_hessian(cols: int = 64) -> torch.Tensor:
    """Eigenvalues 1..2 plus one at -0.05 (mean diagonal ≈ 1.5): damp 0.01 fails, 0.1 succeeds."""
    q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=torch.Generator().manual_seed(1)))
    eig = torch.linspace(1.0, 2.0, cols)
    eig[0] = -0.05
    h = q @ torch.diag(eig) @ q.T
    return (h + h.T) / 2


def test_indefinite_hessian_is_fixed_by_more_dampening():
    w, _, _ = _layer(rows=8, cols=64)
    qt, diagnostics = gptq(w, SPECS["int4_g32"], _indefinite_hessian())
    assert diagnostics["retries"] == 1 and diagnostics["damp"] == pytest.approx(0.1)
    assert torch.isfinite(dequantize(qt)).all()


def test_unfixable_hessian_raises():
    w, _, h = _layer(rows=8, cols=64)
    with pytest.raises(WeightwiseError, match="not positive definite"):
        gptq(w, SPECS["int4_g32"], -h)
    with pytest.raises(WeightwiseError, match="after 0 retries"):
        gptq(w, SPECS["int4_g32"], _indefinite_hessian(), max_damp_retries=0)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse():
    """Built and converted strip by strip (1,100 columns: two strips of rows), in the processing order of act order."""
    _, _, h = _layer(cols=1100, n=1500)
    diagonal = h.diagonal().to(torch.float64)
    perm = torch.argsort(diagonal, descending=True, stable=True)
    reversed_h = _reversed_hessian(h, perm.flip(0), diagonal)
    assert torch.equal(reversed_h, h.to(torch.float64)[perm.flip(0)][:, perm.flip(0)])
    u, damp, retries = _inverse_cholesky(reversed_h, 0.01, 0)
    assert (damp, retries, u.dtype) == (0.01, 0, torch.float32)
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    dampened = h.to(torch.float64)[perm][:, perm] + 0.01 * diagonal.mean() * torch.eye(1100, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(dampened), upper=True)
    assert torch.allclose(u.to(torch.float64), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_looks_at_every_strip(bad):
    t = torch.zeros(2500, 3, dtype=torch.float64)
    assert all_finite(t) and all_finite(t[0]) and all_finite(torch.zeros(0, 3))
    t[2400, 1] = bad  # in the third strip of 1,024 rows
    assert not all_finite(t) and not all_finite(t[2400]) and all_finite(t[:2048])


def test_all_finite_past_an_overflowing_sum_and_for_float8():
    big = torch.full((3000, 2), 3e38)
    assert not torch.isfinite(big.sum()) and all_finite(big)  # the fast path fails; every entry is still finite
    big[2900, 0] = float("inf")
    assert not all_finite(big)
    small = torch.zeros(2000, 4).to(torch.float8_e4m3fn)  # torch has no CPU sum for float8
    assert all_finite(small)
    small[1500, 2] = float("nan")
    assert not all_finite(small) and all_finite(torch.arange(5))


def test_dead_input_channel_is_zeroed():
    w, x, _ = _layer()
    x[:, 5] = 0
    h = x.T @ x / x.shape[0]
    spec = SPECS["int4_g32"]
    qt, diagnostics = gptq(w, spec, h)
    deq = dequantize(qt)
    assert diagnostics["retries"] == 0 and torch.isfinite(deq).all()
    assert torch.equal(deq[:, 5], torch.zeros(32))
    assert output_error(w, deq, h) < output_error(w, dequantize(quantize_tensor(w, spec)), h)


def test_bad_inputs_are_refused():
    w, _, h = _layer(rows=8, cols=64)
    with pytest.raises(WeightwiseError, match="does not match"):
        gptq(w, SPECS["int4_g32"], h[:32, :32])
    h = h.clone()
    h[0, 0] = float("nan")
    with pytest.raises(WeightwiseError, match="hessian"):
        gptq(w, SPECS["int4_g32"], h)


@pytest.mark.parametrize("mode", ["all", "ratio"])
def test_gptq_respects_power_of_two_scales(mode):
    from weightwise.formats.quantizer import group_scales

    torch.manual_seed(5)
    x = torch.randn(512, 64) @ torch.randn(64, 64)
    h = x.T @ x / x.shape[0]
    w = torch.randn(16, 64)
    spec = QuantSpec(format="int4", group_size=16, pow2_scales=mode)
    qt, _ = gptq(w, spec, h)
    exps = torch.log2(group_scales(qt).abs())
    assert torch.equal(exps, exps.round()) if mode == "all" else qt.scale_shifts is not None
    assert output_error(w, dequantize(qt), h) <= output_error(w, dequantize(quantize_tensor(w, spec)), h)


@pytest.mark.parametrize("name", ["int4", "int4_asym", "int3", "nf4", "fp4_e2m1"])
def test_least_squares_scales_never_raise_the_output_error(name):
    weight, _, hessian = _layer(seed=3)
    spec = QuantSpec(format=name, group_size=16)
    plain, _ = gptq(weight, spec, hessian)
    refit, diagnostics = gptq(weight, spec, hessian, least_squares_scales=True)
    assert torch.equal(unpacked_codes(plain), unpacked_codes(refit))  # same codes, new scales
    before, after = output_error(weight, dequantize(plain), hessian), output_error(weight, dequantize(refit), hessian)
    assert after <= before
    if diagnostics["refit_rows"]:
        assert after < before


def test_least_squares_scales_recover_the_true_scales_of_exact_codes():
    torch.manual_seed(0)
    spec = QuantSpec(format="int4_asym", group_size=8, scale_dtype="fp32")
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    codes[:, ::8], codes[:, 1::8] = 0, 15  # every group spans the whole code range
    true_scale, true_offset = torch.rand(4, 4) + 0.5, torch.randn(4, 4)
    weight = from_codes(to_groups(codes.float(), spec).to(torch.uint8), true_scale, true_offset, spec.number_format)
    weight = from_groups(weight, (4, 32))
    x = torch.randn(256, 32)
    from weightwise.quantize.methods.gptq import refit_scales

    scale, offset, changed = refit_scales(weight, codes, true_scale * 1.3, true_offset - 0.2, spec, x.T @ x / 256)
    assert changed == 4
    torch.testing.assert_close(scale, true_scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offset, true_offset, rtol=1e-5, atol=1e-5)


def test_least_squares_scales_skip_constrained_scales():
    from weightwise.quantize.methods.gptq import can_refit

    assert can_refit(QuantSpec(format="int4", group_size=16), (8, 64))
    assert not can_refit(QuantSpec(format="mxfp4"), (8, 64))
    assert not can_refit(QuantSpec(format="int4", group_size=16, pow2_scales="all"), (8, 64))
    assert not can_refit(QuantSpec(format="int4", group_size=48, pad=True), (8, 64))
    weight, _, hessian = _layer(seed=1)
    _, diagnostics = gptq(weight, QuantSpec(format="int4", group_size=16, pow2_scales="all"), hessian, least_squares_scales=True)
    assert "refit_rows" not in diagnostics


def test_initial_scales_equal_to_the_weights_own_reproduce_gptq():
    weight, _, hessian = _layer(seed=2)
    spec = QuantSpec(format="int4_asym", group_size=16)
    own = quantize_tensor(weight, spec)
    plain, _ = gptq(weight, spec, hessian)
    given, _ = gptq(weight, spec, hessian, initial_scales=(own.scales, own.offsets))
    assert torch.equal(dequantize(plain), dequantize(given))
    with pytest.raises(WeightwiseError, match="initial scales"):
        gptq(weight, spec, hessian, initial_scales=(own.scales[:, :2], own.offsets[:, :2]))
    with pytest.raises(WeightwiseError, match="initial scales"):
        gptq(weight, spec, hessian, initial_scales=(own.scales, None))


@pytest.mark.parametrize(("name", "granularity"), [("int4_asym", "group"), ("int3", "group"), ("int4", "channel")])
def test_refit_rounds_keep_the_pass_with_the_least_output_error(name, granularity):
    from weightwise.quantize.methods.gptq import gptq_rounds

    weight, _, hessian = _layer(seed=4)
    spec = QuantSpec(format=name, granularity=granularity, group_size=16 if granularity == "group" else None)
    first, _ = gptq(weight, spec, hessian, least_squares_scales=True)
    best, diagnostics = gptq_rounds(weight, spec, hessian, 3)
    errors = diagnostics["round_errors"]
    assert len(errors) == 4 and errors[0] == pytest.approx(output_error(weight, dequantize(first), hessian))
    assert output_error(weight, dequantize(best), hessian) == pytest.approx(min(errors))
    assert min(errors) < errors[0] and diagnostics["best_round"] > 0  # alternating codes and scales pays here
    with pytest.raises(WeightwiseError, match="rounds"):
        gptq_rounds(weight, spec, hessian, -1)


def test_clip_search_starts_gptq_from_shrunk_scales():
    from weightwise.quantize.methods import GPTQConfig, run_method

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 128, generator=gen) * torch.randn(32, 128, generator=gen).exp()  # heavy tails: clipping pays
    x = torch.randn(512, 128, generator=gen) * torch.linspace(0.5, 2.0, 128)
    hessian = x.T @ x / 512
    spec = QuantSpec(format="int3", group_size=32)
    plain, _ = run_method(GPTQConfig(), weight, spec, {"hessian": hessian})
    clipped, diagnostics = run_method(GPTQConfig(clip_search=True), weight, spec, {"hessian": hessian})
    assert 0 < diagnostics["clip"]["clipped_fraction"] and diagnostics["clip"]["min_ratio"] >= 0.7
    shrunk, own = clipped.scales.float().abs(), plain.scales.float().abs()
    assert (shrunk <= own).all() and (shrunk < own).any()
    assert output_error(weight, dequantize(clipped), hessian) < output_error(weight, dequantize(plain), hessian)


def test_refit_rounds_need_refit_scales():
    from pydantic import ValidationError

    from weightwise.quantize.methods import GPTQConfig

    with pytest.raises(ValidationError, match="refit_scales"):
        GPTQConfig(refit_rounds=2)
    assert GPTQConfig(refit_scales=True, refit_rounds=2).refit_rounds == 2
