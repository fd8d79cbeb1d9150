"""Block-output tuning: fits scales, offsets, biases and norms of quantized blocks; codes and sizes stay."""

import pytest
import torch
from conftest import tiny_model

from weightwise.formats.quantizer import unpacked_codes
from weightwise.quantize import (
    QuantizedLinear,
    QuantRecipe,
    quantization_record,
    quantize,
)

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 2}


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(seed))


def _logit_mse(model, qmodel, tokens) -> float:
    with torch.no_grad():
        return (model(tokens).logits - qmodel(tokens).logits).pow(2).mean().item()


def _quantized(model) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


RECIPE = {"format": "int3_asym", "group_size": 16, "calibration": CALIB}


def test_block_tuning_lowers_block_and_model_error_with_the_same_codes_and_size():
    model, calib, held_out = tiny_model(attention_bias=True), _tokens(1), _tokens(2)
    plain = quantize(model, RECIPE, calibration=calib)
    tuned = quantize(model, {**RECIPE, "block_tune": {"epochs": 6, "lr": 3e-3}}, calibration=calib)
    results = [layer.block_tune for layer in quantization_record(tuned).layers.values()]
    assert all(r.kept and r.loss_after < r.loss_before for r in results)
    assert _logit_mse(model, tuned, held_out) < _logit_mse(model, plain, held_out)
    before, after = _quantized(plain), _quantized(tuned)
    for name, layer in after.items():
        assert torch.equal(unpacked_codes(layer.quantized_tensor()), unpacked_codes(before[name].quantized_tensor())), name
        assert layer.stored_bits() == before[name].stored_bits()
        assert layer.scales.dtype == before[name].scales.dtype
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(tuned.state_dict()[norm], plain.state_dict()[norm])  # norms are tuned too
    assert torch.equal(model.state_dict()[norm], plain.state_dict()[norm])  # the source model is untouched


def test_tuning_that_does_not_help_is_undone():
    model, calib = tiny_model(), _tokens(3)
    plain = quantize(model, RECIPE, calibration=calib)
    wild = quantize(model, {**RECIPE, "block_tune": {"epochs": 2, "lr": 50.0, "tune_norms": False}}, calibration=calib)
    results = [layer.block_tune for layer in quantization_record(wild).layers.values()]
    assert not any(r.kept for r in results)
    for (name, a), b in zip(plain.state_dict().items(), wild.state_dict().values()):
        assert torch.equal(a, b), name


def test_block_tuned_model_saves_loads_and_resumes_identically(tmp_path):
    from weightwise.io.folders import load_quantized, save

    model, calib = tiny_model(attention_bias=True), _tokens(4)
    recipe = {**RECIPE, "method": "gptq", "block_tune": {"epochs": 2, "lr": 3e-3}}
    reference = quantize(model, recipe, calibration=calib)
    loaded, _ = load_quantized(save(reference, tmp_path / "tuned"))
    with torch.no_grad():
        assert torch.equal(loaded(calib).logits, reference(calib).logits)

    def kill_after_first_block(done, total, name):
        if done == 8:  # block 0 holds 7 layers: the first layer of block 1 is being installed
            raise KeyboardInterrupt

    checkpoint = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint, progress=kill_after_first_block)
    resumed = quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint)
    assert quantization_record(resumed).calibration.resumed_at_block == 1
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_block_tune_needs_calibration_and_valid_options():
    from weightwise.errors import WeightwiseError

    assert QuantRecipe(block_tune={}).needs_calibration
    with pytest.raises(WeightwiseError, match="needs calibration data"):
        quantize(tiny_model(), {"format": "int4", "group_size": 16, "block_tune": {}})
    with pytest.raises(WeightwiseError, match="epochs"):
        quantize(tiny_model(), {"block_tune": {"epochs": 0}})


def test_frozen_parameters_are_tuned_and_stay_frozen():
    model, calib = tiny_model(), _tokens(5)
    model.requires_grad_(False)
    tuned = quantize(model, {**RECIPE, "block_tune": {"epochs": 2, "lr": 3e-3}}, calibration=calib)
    assert all(layer.block_tune.kept for layer in quantization_record(tuned).layers.values())
    assert not any(p.requires_grad for p in tuned.parameters())
