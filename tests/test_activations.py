"""Simulated activation quantization: per-token fake quantization, QuantizedLinear(act_format), save/load, recipe and CLI."""

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from conftest import tiny_model
from test_cli import assert_user_error, run_cli
from weightwise.errors import WeightwiseError
from weightwise.formats import QuantSpec, dequantize, get_format, quantize_tensor
from weightwise.formats.activations import activation_spec, fake_quantize_activations
from weightwise.quantize import QuantizedLinear, QuantRecipe, quantization_record, quantize
from weightwise.quantize.recipe import validated
from weightwise.io.folders import load_quantized, save


def _tokens(seed=0, shape=(4, 6, 48)):
    """Activations whose tokens differ in magnitude by orders of magnitude (each needs its own scale)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float())


def test_int8_error_is_at_most_half_a_step_of_each_tokens_scale():
    x = _tokens(1)
    xq = fake_quantize_activations(x, "int8")
    step = x.abs().amax(dim=-1, keepdim=True) / 128  # the largest-magnitude entry lands on code -128
    assert ((xq - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert ((xq - x).abs() > 0).any()
    # a small-magnitude token is not flattened by a large one beside it
    assert torch.allclose(xq.abs().amax(dim=-1), x.abs().amax(dim=-1), rtol=1e-6)


@pytest.mark.parametrize("name", ["fp8_e4m3", "int8_asym", "fp4_e2m1"])
def test_error_is_at_most_half_the_grid_gap_around_each_entry(name):
    x = _tokens(2).reshape(-1, 48)
    xq = fake_quantize_activations(x, name)
    fmt = get_format(name)
    if fmt.asymmetric:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        scale, offset = (hi - lo) / fmt.max_value, lo
    else:
        scale, offset = x.abs().amax(dim=-1, keepdim=True) / fmt.max_abs, 0.0
    y = ((x - offset) / scale).to(torch.float64)
    grid = fmt.grid
    idx = torch.searchsorted(grid, y).clamp(1, len(grid) - 1)
    half_gap = (grid[idx] - grid[idx - 1]) / 2 * scale.double()
    assert ((xq - x).abs().double() <= half_gap * (1 + 1e-5) + 1e-7 * scale.double()).all()
    if name == "fp8_e4m3":  # the token's absmax maps to 448, which is on the grid
        assert torch.allclose(xq.abs().amax(dim=-1), x.abs().amax(dim=-1), rtol=1e-6)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp4_e2m1"])
def test_values_on_each_tokens_grid_come_back_exactly(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(3)
    grid = fmt.grid.to(torch.float32)
    codes = torch.randint(0, len(grid), (10, 32), generator=g)
    y = grid[codes]
    y[:, 0] = fmt.min_value if fmt.scaling == "signed_absmax" else fmt.max_abs  # sets each token's scale
    scale = torch.exp2(torch.randint(-8, 8, (10, 1), generator=g).float())  # powers of two: exact products
    x = y * scale
    assert torch.equal(fake_quantize_activations(x, name), x)


@pytest.mark.parametrize("name", ["int8", "int8_asym", "fp8_e4m3", "fp8_e5m2", "nf4", "ternary", "mxfp4"])
def test_same_values_as_quantizing_the_tokens_as_a_weight_with_per_row_fp32_scales(name):
    x = _tokens(10, shape=(40, 64))
    weight_path = dequantize(quantize_tensor(x, activation_spec(name)))
    assert torch.equal(fake_quantize_activations(x, name), weight_path)


def test_shape_dtype_and_mx_blocks():
    x = _tokens(4, shape=(2, 3, 64)).to(torch.bfloat16)
    xq = fake_quantize_activations(x, "fp8_e4m3")
    assert xq.shape == x.shape and xq.dtype == torch.bfloat16
    assert activation_spec("int8").resolved_scale_dtype == "fp32" and activation_spec("int8").granularity == "channel"
    # MX: every 32-entry block of a token has its own power-of-two scale, so a width of 40 is padded
    y = _tokens(5, shape=(3, 40))
    yq = fake_quantize_activations(y, "mxfp8")
    assert yq.shape == y.shape and not torch.equal(yq, y)
    assert ((yq - y).abs() <= y.abs().amax() * 2.0**-3).all()


def test_non_finite_activations_and_unknown_formats_are_refused():
    x = _tokens(6)
    x[0, 1, 2] = float("nan")
    with pytest.raises(WeightwiseError, match="activations has 1 NaN/Inf"):
        fake_quantize_activations(x, "int8")
    with pytest.raises(WeightwiseError, match="unknown format 'int9'"):
        fake_quantize_activations(_tokens(6), "int9")


def test_straight_through_gradient():
    x = _tokens(7).requires_grad_()
    fake_quantize_activations(x, "int8").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_quantized_linear_with_act_format_is_close_but_not_equal():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    qt = quantize_tensor(linear.weight.detach(), QuantSpec(format="int8", granularity="channel"))
    w8 = QuantizedLinear.from_quantized(qt, linear.bias)
    w8a8 = QuantizedLinear.from_quantized(qt, linear.bias, act_format="int8")
    x = _tokens(8, shape=(5, 64))
    with torch.no_grad():
        y, y_act = w8(x), w8a8(x)
        expected = nn.functional.linear(fake_quantize_activations(x, "int8"), w8.dequantized_weight(), linear.bias)
    assert not torch.equal(y, y_act)
    assert torch.allclose(y_act, expected, atol=1e-5)
    assert (y_act - y).norm() / y.norm() < 1e-2
    assert w8a8.stored_bits() == w8.stored_bits()  # activations store nothing
    assert "act=int8" in repr(w8a8) and "act=" not in repr(w8)
    with pytest.raises(WeightwiseError, match="unknown format"):
        QuantizedLinear.from_quantized(qt, act_format="int9")


def test_save_load_round_trip_keeps_act_format(tmp_path):
    model = tiny_model()
    tokens = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(9))
    w4a8 = quantize(model, {"format": "int4", "group_size": 32, "act_format": "fp8"})
    w4 = quantize(model, {"format": "int4", "group_size": 32})
    record = quantization_record(w4a8)
    assert record.recipe["act_format"] == "fp8_e4m3"  # the alias is stored by its name
    assert all(layer.act_format == "fp8_e4m3" for layer in record.layers.values())
    save(w4a8, tmp_path / "w4a8")
    manifest = json.loads((tmp_path / "w4a8" / "manifest.json").read_text())
    assert {layer["act_format"] for layer in manifest["layers"].values()} == {"fp8_e4m3"}
    loaded, _ = load_quantized(tmp_path / "w4a8")
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.act_format == "fp8_e4m3" for m in layers)
    with torch.no_grad():
        logits = w4a8(tokens).logits
        assert torch.equal(loaded(tokens).logits, logits)
        assert not torch.equal(w4(tokens).logits, logits)
    assert record.layers.keys() == quantization_record(w4).layers.keys()
    assert [r.stored_bits for r in record.layers.values()] == [r.stored_bits for r in quantization_record(w4).layers.values()]


def test_recipe_rejects_an_unknown_act_format():
    with pytest.raises(ValidationError, match="unknown format 'int9'"):
        QuantRecipe(act_format="int9")
    with pytest.raises(WeightwiseError, match="^invalid options: act_format: unknown format 'fp9'"):
        validated(QuantRecipe, {"act_format": "fp9"})
    assert QuantRecipe(format="int8", granularity="channel", act_format="int8").act_format == "int8"


def test_cli_act_format(capsys, monkeypatch, tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--act-format", "int9", "-o", bad), "act_format", bad)
    run = tmp_path / "w8a8"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--format", "int8", "--granularity", "channel",
                             "--act-format", "int8", "-o", run)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["act_format"] == "int8" and "int8 per token" in out
