"""Minifloat format search (LLM-FP4): the pure search, its recipe/CLI wiring, and an end-to-end run on a tiny model."""

import json

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_model
from test_cli import assert_user_error, run_cli
from weightwise.errors import WeightwiseError
from weightwise.formats import QuantSpec, dequantize, quantize_tensor
from weightwise.formats.quantizer import decode_scale
from weightwise.quantize import QuantizedLinear, QuantRecipe, quantization_record, quantize
from weightwise.quantize.methods.fpsearch import clip_groups, minifloat_splits, search_fp_format
from weightwise.quantize.methods.gptq import output_error
from weightwise.quantize.recipe import validated
from weightwise.io.folders import load_quantized, save

GROUP = {"granularity": "group", "group_size": 32}


def _hessian(cols: int, seed: int) -> torch.Tensor:
    """H = XᵀX / n of correlated inputs with uneven channel magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols, generator=g) @ torch.randn(cols, cols, generator=g) * torch.rand(cols, generator=g)
    return x.T @ x / 256


def _student_t(shape, df: int, g: torch.Generator) -> torch.Tensor:
    chi2 = torch.randn(*shape, df, generator=g).pow(2).sum(-1)
    return torch.randn(shape, generator=g) / (chi2 / df).sqrt()


def test_splits_of_each_bit_width():
    assert minifloat_splits(4) == ["fp4_e1m2", "fp4_e2m1", "fp4_e3m0"]
    assert minifloat_splits(8)[3:5] == ["fp8_e4m3", "fp8_e5m2"]  # the registry's OCP/IEEE-like fp8 formats
    assert len(minifloat_splits(6)) == 5 and len(minifloat_splits(5)) == 4


def test_clipping_stores_the_clipped_scale():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(format="fp4_e2m1", **GROUP)
    clipped = clip_groups(w, spec, 0.8)
    amax = w.reshape(4, 2, 32).abs().amax(-1)
    assert torch.allclose(clipped.reshape(4, 2, 32).abs().amax(-1), 0.8 * amax)
    assert (clipped.abs() <= w.abs()).all() and (clipped != w).any()
    scales = decode_scale(quantize_tensor(clipped, spec).scales, "fp16")
    assert torch.allclose(scales, 0.8 * amax / 6, rtol=1e-3)


@pytest.mark.parametrize("bits, own_format", [(4, "fp4_e2m1"), (6, "fp6_e3m2")])
def test_chosen_error_is_at_most_every_fixed_split(bits, own_format):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 64, generator=g) * (1 + 4 * torch.rand(24, 1, generator=g))
    h = _hessian(64, bits)
    result = search_fp_format(w, h, bits, GROUP, clip_grid=[0.9, 0.8, 0.7])
    chosen = output_error(w, dequantize(result.quantized), h)
    assert result.quantized.spec == result.spec and result.spec.number_format.bits == bits
    assert chosen == pytest.approx(result.errors[result.spec.format][result.clip_ratio], rel=1e-12)
    assert set(result.errors) == set(minifloat_splits(bits))
    assert all(sorted(by_ratio) == [0.7, 0.8, 0.9, 1.0] for by_ratio in result.errors.values())
    for name in minifloat_splits(bits):  # every split unclipped, computed independently
        fixed = quantize_tensor(w, QuantSpec(format=name, **GROUP))
        assert chosen <= output_error(w, dequantize(fixed), h) + 1e-12
    own = quantize_tensor(w, QuantSpec(format=own_format, **GROUP))
    assert chosen < output_error(w, dequantize(own), h)


def test_heavy_tails_get_more_exponent_bits_than_flat_weights():
    g = torch.Generator().manual_seed(1)
    h = _hessian(64, 1)
    flat = torch.rand(32, 64, generator=g) * 2 - 1
    heavy = _student_t((32, 64), df=2, g=g)
    for bits in (4, 6):
        exp_bits = {}
        for label, w in (("flat", flat), ("heavy", heavy)):
            spec = search_fp_format(w, h, bits, GROUP, clip_grid=[0.9, 0.8]).spec
            exp_bits[label] = int(spec.format.split("_e")[1].split("m")[0])
        assert exp_bits["heavy"] > exp_bits["flat"], (bits, exp_bits)


def test_search_input_errors():
    w = torch.randn(4, 32)
    with pytest.raises(WeightwiseError, match="does not match 32 input features"):
        search_fp_format(w, torch.eye(16), 4, GROUP, [0.9])
    with pytest.raises(WeightwiseError, match="2 to 8 bits"):
        minifloat_splits(9)


def test_recipe_needs_a_minifloat_format_and_valid_ratios():
    with pytest.raises(WeightwiseError, match="use a minifloat format .* not 'int4'"):
        validated(QuantRecipe, {"format": "int4", "method": "fpsearch"})
    with pytest.raises(ValidationError, match="not 'mxfp4'"):
        QuantRecipe(format="mxfp4", method="fpsearch")
    with pytest.raises(ValidationError, match="not 'nf4'"):  # an override's format is checked too
        QuantRecipe(format="fp4_e2m1", method="fpsearch", overrides=[{"pattern": "down_proj", "format": "nf4"}])
    with pytest.raises(ValidationError, match=r"clip ratios must lie in \(0, 1\]"):
        QuantRecipe(format="fp4_e2m1", method={"name": "fpsearch", "clip_grid": [1.2]})
    assert QuantRecipe(format="fp5_e2m2", method={"name": "fpsearch", "clip_grid": [0.75]}).method.clip_grid == [0.75]


def test_end_to_end_on_a_tiny_model_with_save_and_load(tmp_path):
    model = tiny_model()
    calib = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    recipe = {"format": "fp4_e2m1", "method": "fpsearch", "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}}
    qmodel = quantize(model, recipe, calibration=calib)
    record = quantization_record(qmodel)
    modules = dict(qmodel.named_modules())
    chosen = set()
    for name, layer in record.layers.items():
        search = layer.diagnostics["fp_search"]
        assert layer.spec.format == search["format"] == modules[name].spec.format
        assert search["format"] in minifloat_splits(4) and search["clip_ratio"] in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
        assert search["output_error"] == min(e for by_ratio in search["errors"].values() for e in by_ratio.values())
        assert layer.stored_bits == QuantizedLinear.from_quantized(
            quantize_tensor(torch.zeros(modules[name].out_features, modules[name].in_features),
                            QuantSpec(format="fp4_e2m1", **GROUP))).stored_bits()  # same size as the recipe's format
        chosen.add(search["format"])
    assert len(record.layers) == 14 and record.calibration.tokens == calib.numel()
    save(qmodel, tmp_path / "searched")
    loaded, _ = load_quantized(tmp_path / "searched")
    with torch.no_grad():
        assert torch.equal(loaded(calib).logits, qmodel(calib).logits)
    assert {m.spec.format for m in loaded.modules() if isinstance(m, QuantizedLinear)} == chosen


def test_cli_search_fp(capsys, monkeypatch, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text for the tiny model. " * 30)
    bad = tmp_path / "bad"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--search-fp", "--format", "int4", "-o", bad),
                      "use a minifloat format", bad)
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--search-fp", "--method", "gptq",
                              "--format", "fp4_e2m1", "-o", bad), "drop --method gptq", bad)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("format: int4\nmethod: {name: fpsearch, clip_grid: [0.9]}\n")
    run = tmp_path / "fp5"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--config", recipe, "--search-fp", "--format", "fp5_e2m2",
                             "--calib", f"{text}:8x32", "-o", run)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["method"] == {"name": "fpsearch", "clip_grid": [0.9]}
    assert all(layer["spec"]["format"].startswith("fp5_e") for layer in manifest["layers"].values())
    assert "fp search choices" in out
