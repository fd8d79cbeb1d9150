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


# --- the shared loop and QuantizedLinear's differentiable path ----------------------------------------


def _block_setup(seed: int = 6):
    """(quantized block 0, its captured inputs, the float block 0's outputs on them) of a tiny model."""
    from weightwise.quantize.calibration import capture_block_inputs, run_block

    model, calib = tiny_model(attention_bias=True), _tokens(seed)
    qmodel = quantize(model, {**RECIPE, "method": "gptq", "lorc_rank": 2}, calibration=calib)
    inputs = capture_block_inputs(model, model.model.layers[0], calib, 2)
    targets = [out for out, _, _ in run_block(model.model.layers[0], inputs)]
    return qmodel.model.layers[0], inputs, targets


def _reference_fit(block, inputs, targets, config) -> None:
    """Block tuning's own Adam loop as it was before it ran on the shared loop (tune/steps.py): log-scales
    and scale-relative offset shifts, biases and norms; autograd.grad; one seeded order drawn per epoch."""
    import torch.nn.functional as F

    layers = [m for m in block.modules() if isinstance(m, QuantizedLinear)]
    stored = [layer.stored_scales() for layer in layers]
    thetas = [(torch.zeros_like(s, requires_grad=True), torch.zeros_like(o, requires_grad=True)) for s, o in stored]
    quantized = {id(p) for m in layers for p in m.parameters()}
    floats = [p for m in layers for p in m.parameters()] + [p for p in block.parameters() if p.ndim == 1 and id(p) not in quantized]
    params = [t for pair in thetas for t in pair] + floats
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    def scales(i):
        (s, o), (log_scale, shift) = stored[i], thetas[i]
        return s * log_scale.exp(), o + s * shift

    for _ in range(config.epochs):
        for i in torch.randperm(len(inputs), generator=generator).tolist():
            for j, layer in enumerate(layers):
                layer.hold_weight(layer.weight_from(*scales(j)))
            hidden, args, kwargs = inputs[i]
            out = block(hidden, *args, **kwargs)
            loss = F.mse_loss(out[0] if isinstance(out, tuple) else out, targets[i])
            for p, grad in zip(params, torch.autograd.grad(loss, params)):
                p.grad = grad
            optimizer.step()
    with torch.no_grad():
        for j, layer in enumerate(layers):
            layer.hold_weight(None)
            layer.set_scales(*scales(j))


def test_block_tuning_on_the_shared_loop_matches_its_former_own_loop_bit_for_bit():
    import copy

    from weightwise.quantize.blocktune import BlockTuneConfig, tune_block

    block, inputs, targets = _block_setup()
    config = BlockTuneConfig(epochs=3, seed=1)
    shared, reference, again = copy.deepcopy(block), copy.deepcopy(block), copy.deepcopy(block)
    result = tune_block(shared, inputs, targets, config)
    assert result["kept"] and result["loss_after"] < result["loss_before"]
    _reference_fit(reference, inputs, targets, config)
    for (name, a), b in zip(shared.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert tune_block(again, inputs, targets, config) == result  # same seed, same fit
    assert all(torch.equal(a, b) for a, b in zip(shared.state_dict().values(), again.state_dict().values()))
    assert all(p.grad is None for p in shared.parameters())  # the loop's backward filled no stray .grad
    other = copy.deepcopy(block)
    tune_block(other, inputs, targets, config.model_copy(update={"seed": 2}))
    assert not torch.equal(other.self_attn.q_proj.scales, shared.self_attn.q_proj.scales)  # the seed orders the batches


def test_quantized_linear_weight_is_a_differentiable_function_of_its_scales():
    from weightwise.qlinear import dequantized_once

    block, inputs, _ = _block_setup()
    layer = block.self_attn.q_proj
    scales, offsets = layer.stored_scales()
    assert torch.equal(layer.weight_from(scales, offsets), layer.dequantized_weight())
    trained = scales.clone().requires_grad_(True)
    layer.weight_from(trained, offsets).sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs offsets"):
        layer.weight_from(scales)

    x = inputs[0][0]
    doubled = lambda: (2 * scales, 2 * offsets)  # noqa: E731
    expected = torch.nn.functional.linear(x, layer.weight_from(*doubled()), layer.bias)
    layer.use_scales(doubled)
    try:
        with dequantized_once(block):  # a layer computing its weight from trained scales is left alone
            assert layer.held_weight is None and torch.equal(layer(x), expected)
    finally:
        layer.use_scales(None)
    layer.set_scales(*doubled())
    assert torch.equal(layer.scales, (2 * scales).to(layer.scales.dtype))
    assert torch.allclose(layer(x), expected, rtol=1e-2, atol=1e-4)  # stored rounded to the scale dtype


def test_scales_of_constrained_formats_cannot_be_set():
    from weightwise.formats.base import QuantSpec
    from weightwise.formats.quantizer import quantize_tensor

    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    for spec in (QuantSpec(format="mxfp4"), QuantSpec(format="int4", group_size=16, pow2_scales="all")):
        layer = QuantizedLinear.from_quantized(quantize_tensor(weight, spec))
        assert not layer.free_scales
        with pytest.raises(ValueError, match="cannot be set freely"):
            layer.set_scales(*layer.stored_scales())
