"""Quantization-aware training (tune method qat): the config, the pure math of fakequant.py (fake quantization with
straight-through and LSQ gradients, oscillation tracking, freezing, dampening), the method on the one loop, its
result as a quantized run (bit-identical to the training model), init from a run, resuming, and the CLI."""

import json
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from test_tune import prepared, quick, toy_task  # noqa: F401  (toy_task is a fixture)
from weightwise.errors import WeightwiseError
from weightwise.formats.base import QuantSpec
from weightwise.formats.quantizer import dequantize, float_scales, quantize_tensor, to_groups, unpacked_codes
from weightwise.formats.registry import get_format
from weightwise.io.models import load_model
from weightwise.quantize.recipe import validated
from weightwise.tune.api import tune
from weightwise.tune.base import micro_loss
from weightwise.tune.config import QATConfig, TuneConfig
from weightwise.tune.fakequant import (
    dampening_loss,
    fake_quantize,
    freeze_oscillating,
    grid_codes,
    lsq_gradient_scale,
    straight_through,
    track_oscillations,
)
from weightwise.tune.loop import train
from weightwise.tune.qat import FakeQuantLinear

def qat(task, method: dict | None = None, **fields) -> TuneConfig:
    """A short qat run on the toy task; ``method`` the qat settings (groups of 32: the tiny rows are 64 and 96 long)."""
    config = quick(task, method="qat", **fields)
    return config.model_copy(update={"method": QATConfig(**{"group_size": 32, **(method or {})})})


def assert_same_tensors(run, other) -> None:
    """The two quantized runs' model.safetensors hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(folder / "model.safetensors")) for folder in (run, other))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


# --- config ----------------------------------------------------------------------------------------


def test_config_shape_shortcuts_and_ranges():
    flat = TuneConfig(method="qat", format="int2_asym", group_size=64, init="runs/q")
    assert flat.method == QATConfig(format="int2_asym", group_size=64, init="runs/q")
    assert flat.method.spec == QuantSpec(format="int2_asym", group_size=64)
    assert QATConfig().model_dump() == {"name": "qat", "format": "int4", "granularity": "group", "group_size": None,
                                        "init": "rtn", "learn_scales": True, "oscillation_momentum": 0.01,
                                        "dampening": 0.0, "freeze_threshold": None, "distill_weight": 0.0,
                                        "distill_temperature": 1.0}
    assert TuneConfig.model_validate(flat.model_dump()) == flat
    for bad in ({"oscillation_momentum": 0}, {"oscillation_momentum": 1.5}, {"dampening": -1}, {"freeze_threshold": 1},
                {"freeze_threshold": 0}, {"granularity": "row"}, {"group_size": 0}, {"lr": 1}, {"distill_weight": 1.5},
                {"distill_weight": -0.1}, {"distill_temperature": 0}):
        with pytest.raises(ValueError):
            QATConfig(**bad)
    with pytest.raises(WeightwiseError, match="format is not a setting of method lift"):
        validated(TuneConfig, {"method": "lift", "format": "int4"})


@pytest.mark.parametrize("fmt", ["nf4", "fp4_e2m1", "mxint8", "iq4_nl", "fp8_e4m3"])
def test_non_integer_formats_are_refused_naming_the_format_and_the_supported_ones(fmt):
    with pytest.raises(WeightwiseError, match=f"not format '{fmt}': use int2..int8 .* int2_asym..int8_asym") as err:
        validated(TuneConfig, {"method": "qat", "format": fmt})
    assert "\n" not in str(err.value)


# --- the math --------------------------------------------------------------------------------------


INTEGER_FORMATS = [f"int{b}{a}" for b in range(2, 9) for a in ("", "_asym")]


@pytest.mark.parametrize("fmt", INTEGER_FORMATS)
def test_fake_quantization_is_exactly_dequantization_of_the_nearest_codes(fmt):
    spec = QuantSpec(format=fmt, group_size=16)
    weight = torch.randn(8, 48, generator=torch.Generator().manual_seed(1))
    qt = quantize_tensor(weight, spec)
    scales, offsets = float_scales(qt)
    groups, frozen = to_groups(weight, spec), torch.zeros(8, 3, 16, dtype=torch.bool)
    codes = grid_codes(groups, scales, offsets, spec.number_format, frozen, torch.zeros_like(frozen, dtype=torch.uint8))
    assert torch.equal(codes.reshape(8, 48), unpacked_codes(qt))  # round-to-nearest's codes
    fake = fake_quantize(groups, scales, offsets, spec.number_format, codes, frozen).reshape(8, 48)
    assert torch.equal(fake, dequantize(qt))


def test_straight_through_and_lsq_gradients():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = straight_through(x, torch.tensor([5.0, 7.0]), 0.5)
    assert torch.equal(y, torch.tensor([5.0, 7.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.5, 0.5]))

    fmt = get_format("int3_asym")  # codes 0..7
    w = torch.tensor([[[0.3, 1.45, 9.0, -3.0]]], requires_grad=True)  # (1, 1, 4): inside, inside, above, below
    s = torch.tensor([[0.5]], requires_grad=True)
    o = torch.tensor([[-0.25]], requires_grad=True)
    frozen = torch.zeros(1, 1, 4, dtype=torch.bool)
    codes = grid_codes(w, s, o, fmt, frozen, frozen.to(torch.uint8))
    assert codes.tolist() == [[[1, 3, 7, 0]]]  # y = (w - o)/s = 1.1, 3.4, 18.5, -5.5
    out = fake_quantize(w, s, o, fmt, codes, frozen)
    assert torch.equal(out, torch.tensor([[[0.25, 1.25, 3.25, -0.25]]]))
    out.sum().backward()
    assert w.grad.tolist() == [[[1.0, 1.0, 0.0, 0.0]]]  # straight through inside the grid, nothing where clipped
    y = torch.tensor([1.1, 3.4, 18.5, -5.5])
    expected_s = (torch.tensor([1.0, 3.0]) - y[:2]).sum() + 7 + 0  # round(y) − y inside, the grid's ends outside
    assert s.grad.item() == pytest.approx(expected_s.item(), abs=1e-6)
    assert o.grad.item() == pytest.approx(2.0)  # 0 inside, 1 for each clipped entry
    assert lsq_gradient_scale(QuantSpec(format="int4", group_size=32), (4, 64)) == 1 / math.sqrt(32 * 7)
    assert lsq_gradient_scale(QuantSpec(format="int2_asym", group_size=64), (4, 64)) == 1 / math.sqrt(64 * 3)
    assert lsq_gradient_scale(QuantSpec(format="int2", granularity="channel"), (4, 64)) == 1 / math.sqrt(64 * 1)


@pytest.mark.parametrize("fmt, freezing", [("int3_asym", True), ("int4", False)])
def test_the_recomputing_linear_equals_the_linear_on_the_fake_quantized_weight(fmt, freezing):
    """fake_quant_linear (what FakeQuantLinear's forward runs): the same output, bit for bit, and the same gradients
    into the input, latent weight, scales and offsets as F.linear on quantized_weight(), frozen and clipped weights
    included."""
    spec = QuantSpec(format=fmt, group_size=16)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 32, generator=generator)
    layer = FakeQuantLinear(weight, *float_scales(quantize_tensor(weight, spec)), None, spec, True, freezing)
    with torch.no_grad():
        layer.weight[0, :4] = 50.0  # far outside the grid: clipped
        if freezing:
            layer.frozen[1, 0] = True  # row 1's first group
            layer.frozen_codes[1, 0] = 2
    x = torch.randn(3, 5, 32, generator=generator)
    grad_out = torch.randn(3, 5, 6, generator=generator)
    results = []
    for run in ("recomputing", "reference"):
        inputs = x.clone().requires_grad_(True)
        layer.zero_grad()
        out = layer(inputs) if run == "recomputing" else torch.nn.functional.linear(inputs, layer.quantized_weight())
        out.backward(grad_out)
        grads = [inputs.grad, layer.weight.grad, layer.scales.grad] + ([layer.offsets.grad] if layer.offsets is not None else [])
        results.append((out.detach(), [g.clone() for g in grads]))
    (out, grads), (expected_out, expected_grads) = results
    assert torch.equal(out, expected_out)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert (grads[1][0, :4] == 0).all() and grads[1][0, 4:].abs().sum() > 0  # clipped weights get no gradient
    if freezing:
        assert (grads[1][1, :16] == 0).all() and grads[1][1, 16:].abs().sum() > 0  # nor do frozen ones


def test_a_fake_quantized_layer_keeps_only_its_input_for_backward():
    """Memory: forward saves no weight-sized intermediate (the fake-quantized weight, codes, clipping masks); the
    tensors it keeps are the input and the layer's own parameters and buffers. The latent weight is the float32
    weight it was given, not a copy."""
    spec = QuantSpec(format="int2_asym", group_size=16)
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    layer = FakeQuantLinear(weight, *float_scales(quantize_tensor(weight, spec)), None, spec, True, True)
    assert layer.weight.data_ptr() == weight.data_ptr()
    assert FakeQuantLinear(weight, *float_scales(quantize_tensor(weight, spec)), None, spec, True).frozen is None
    x = torch.randn(2, 48, requires_grad=True)
    own = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers(), x]}
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    large = [tuple(t.shape) for t in kept if t.data_ptr() not in own and t.numel() >= weight.numel() // 4]
    assert large == [] and kept
    assert layer.weight.grad is not None and layer.scales.grad is not None


def test_oscillation_tracking_counts_reversals_on_a_hand_made_sequence():
    # weight 0 flips 0,1,0,1 (2 reversals), weight 1 climbs (none), weight 2 goes up, rests, down (1), weight 3 rests
    sequence = torch.tensor([[0, 5, 3, 2], [1, 6, 4, 2], [0, 7, 4, 2], [1, 7, 3, 2]], dtype=torch.uint8)
    direction = torch.zeros(4, dtype=torch.int8)
    frequency = torch.zeros(4)
    counts, momentum = torch.zeros(4, dtype=torch.long), 0.5
    expected_frequency = torch.zeros(4)
    for previous, codes in zip(sequence[:-1], sequence[1:]):
        direction, frequency, oscillated = track_oscillations(previous, direction, frequency, codes, momentum)
        counts += oscillated
        expected_frequency = (1 - momentum) * expected_frequency + momentum * oscillated.float()
        assert torch.allclose(frequency, expected_frequency)
    assert counts.tolist() == [2, 0, 1, 0]
    assert direction.tolist() == [1, 1, -1, 0]
    assert frequency.tolist() == [0.75, 0.0, 0.5, 0.0]  # weight 0: 0 → 0.5 → 0.75


def test_freezing_fixes_weights_above_the_threshold_at_their_average_code():
    frequency = torch.tensor([0.1, 0.3, 0.5, 0.0])
    frozen = torch.tensor([False, False, False, True])
    frozen_codes = torch.tensor([0, 0, 0, 9], dtype=torch.uint8)
    average = torch.tensor([2.4, 5.6, 3.5, 1.0])
    frozen, frozen_codes = freeze_oscillating(frequency, 0.2, frozen, frozen_codes, average)
    assert frozen.tolist() == [False, True, True, True]
    assert frozen_codes.tolist() == [0, 6, 4, 9]  # the rounded average; an already frozen weight keeps its code


def test_dampening_loss_is_zero_at_bin_centres_and_pulls_towards_them():
    fmt = get_format("int2_asym")  # codes 0..3
    s, o = torch.tensor([[0.5]]), torch.tensor([[-0.25]])
    centres = torch.tensor([[[-0.25, 0.25, 0.75, 1.25]]])  # code · s + o
    none = torch.zeros(1, 1, 4, dtype=torch.bool)
    codes = grid_codes(centres, s, o, fmt, none, none.to(torch.uint8))
    assert dampening_loss(centres, s, o, fmt, codes, none).item() == 0.0
    spec = QuantSpec(format="int4", group_size=16)
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    qt = quantize_tensor(weight, spec)
    grid = to_groups(dequantize(qt), spec)
    scales, _ = float_scales(qt)
    none = torch.zeros_like(grid, dtype=torch.bool)
    codes = grid_codes(grid, scales, None, spec.number_format, none, none.to(torch.uint8))
    assert dampening_loss(grid, scales, None, spec.number_format, codes, none) < 1e-10

    w = torch.tensor([[[0.05, 0.45, 3.0, 0.3]]], requires_grad=True)  # above its centre, below, clipped, frozen
    frozen = torch.tensor([[[False, False, False, True]]])
    codes = grid_codes(w, s, o, fmt, frozen, torch.full_like(frozen, 3, dtype=torch.uint8))
    loss = dampening_loss(w, s, o, fmt, codes, frozen)
    assert loss.item() == pytest.approx(0.4**2 + 0.4**2, abs=1e-6)  # (0.3 − 1)², (1.4 − 1)² in scale units; clipped: 0
    loss.backward()
    assert w.grad[0, 0, 0] < 0 < w.grad[0, 0, 1] and w.grad[0, 0, 2] == 0 and w.grad[0, 0, 3] == 0


# --- the method on the one loop ----------------------------------------------------------------------


def _batch_loss(model, examples) -> float:
    """The loop's loss of one global batch holding every example."""
    from weightwise.data.tasks import collate

    with torch.no_grad():
        batch = collate(examples, 0)
        n_answer = sum(int((ex["labels"][1:] != -100).sum()) for ex in examples)
        return (micro_loss(model, batch) / n_answer).item()


@pytest.mark.parametrize("fmt", ["int4", "int2_asym"])
def test_qat_starts_at_round_to_nearest_and_lowers_the_loss(fmt, toy_task):
    from weightwise.quantize import quantize

    config = qat(toy_task, method={"format": fmt}, max_steps=6)
    model, method, examples = prepared(config)
    rtn = quantize(tiny_model(), {"format": fmt, "group_size": 32})
    assert _batch_loss(model, examples) == _batch_loss(rtn, examples)  # the fake-quantized start is RTN, exactly
    records = []
    train(model, method, examples, config, pad_token_id=0, on_step=records.append)
    losses = [r["loss"] for r in records]
    assert losses[0] == pytest.approx(_batch_loss(rtn, examples), rel=1e-5)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(0 <= r["qat_oscillating"] <= 1 and r["qat_frozen"] == 0 for r in records)
    assert records[0]["qat_oscillating"] == 0 and max(r["qat_oscillating"] for r in records) > 0  # a reversal needs 2 steps
    assert method.trained_entries() > sum(layer.weight.numel() for layer in method.layers.values())  # + scales, offsets


def test_freezing_stops_a_weight_from_changing(toy_task):
    # freezing on (its buffers exist) at a threshold 4 steps of momentum 0.01 cannot reach: the test freezes by hand
    config = qat(toy_task, method={"learn_scales": False, "freeze_threshold": 0.99}, max_steps=4, lr=2e-2)
    model, method, examples = prepared(config)
    layer = method.layers["model.layers.0.mlp.down_proj"]
    start_codes, start_weight = layer.codes(), layer.quantized_weight().detach()
    layer.frozen[..., ::2] = True  # every other weight, frozen at its current code
    layer.frozen_codes.copy_(torch.where(layer.frozen, start_codes, 0))
    train(model, method, examples, config, pad_token_id=0)
    frozen = layer.frozen.reshape(start_weight.shape)
    assert torch.equal(layer.codes()[layer.frozen], start_codes[layer.frozen])
    assert torch.equal(layer.quantized_weight().detach()[frozen], start_weight[frozen])
    assert (layer.codes() != start_codes)[~layer.frozen].float().mean() > 0.1  # the others moved


def test_oscillating_weights_freeze_and_stay_frozen(toy_task):
    config = qat(toy_task, method={"oscillation_momentum": 0.5, "freeze_threshold": 0.3}, max_steps=6, lr=2e-2)
    model, method, examples = prepared(config)
    records, snapshots = [], []

    def on_step(record):
        records.append(record)
        snapshots.append({name: (layer.frozen.clone(), layer.codes()) for name, layer in method.layers.items()})

    train(model, method, examples, config, pad_token_id=0, on_step=on_step)
    fractions = [r["qat_frozen"] for r in records]
    assert fractions == sorted(fractions) and fractions[-1] > 0
    for before, after in zip(snapshots, snapshots[1:]):
        for name, (frozen, codes) in before.items():
            assert after[name][0][frozen].all() and torch.equal(after[name][1][frozen], codes[frozen])


def test_dampening_pulls_weights_to_their_bin_centres(toy_task):
    distances = {}
    for dampening in (0.0, 10.0):
        config = qat(toy_task, method={"dampening": dampening}, max_steps=6, lr=5e-4)
        model, method, examples = prepared(config)
        records = []
        train(model, method, examples, config, pad_token_id=0, on_step=records.append)
        distances[dampening] = sum(layer.dampening().item() for layer in method.layers.values())
        assert ("qat_dampening" in records[-1]) == bool(dampening)
    assert distances[10.0] < 0.8 * distances[0.0]


def _kl_to_float(model, examples, temperature: float) -> float:
    """Mean KL(float tiny model ‖ ``model``) at ``temperature`` over the examples' labelled positions, computed apart
    from the method (a fresh float model as the teacher)."""
    from weightwise.data.tasks import collate
    from weightwise.tune.distill import distillation_loss

    batch = collate(examples, 0)
    with torch.no_grad():
        teacher, student = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                            for m in (tiny_model(), model))
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    return distillation_loss(student, teacher, batch["labels"], temperature).item() / temperature**2 / tokens


def test_distillation_alone_brings_the_student_to_the_float_teacher_which_stays_untouched(toy_task):
    config = qat(toy_task, method={"format": "int2_asym", "distill_weight": 1.0, "distill_temperature": 2.0},
                 max_steps=8, lr=3e-4)
    model, method, examples = prepared(config)
    float_model = tiny_model()
    start = _kl_to_float(model, examples, 2.0)
    records = []
    train(model, method, examples, config, pad_token_id=0, on_step=records.append)
    assert records[0]["qat_distill_kl"] == pytest.approx(start, rel=1e-4)  # the method's KL is the float model's
    for r in records:  # weight 1: the loss is the distillation term alone, T² · KL
        assert r["loss"] == pytest.approx(4.0 * r["qat_distill_kl"], rel=1e-4) and r["qat_task_loss"] > 0
    after = _kl_to_float(model, examples, 2.0)
    assert after < 0.5 * start and records[-1]["qat_distill_kl"] < 0.5 * start, (start, after)
    for name, linear in method.teacher.items():  # the teacher: the original Linears, unchanged, out of the model
        assert torch.equal(linear.weight, float_model.get_submodule(name).weight), name
        assert model.get_submodule(name) is method.layers[name] and not linear.weight.requires_grad
        assert not torch.equal(method.layers[name].weight, linear.weight)  # the latent weight trained apart


def test_the_distillation_mix_weighs_task_loss_and_kl(toy_task):
    from weightwise.data.tasks import collate
    from weightwise.quantize import quantize

    config = qat(toy_task, method={"distill_weight": 0.25, "distill_temperature": 3.0}, max_steps=1)
    model, method, examples = prepared(config)
    records = []
    train(model, method, examples, config, pad_token_id=0, on_step=records.append)
    rtn = quantize(tiny_model(), {"format": "int4", "group_size": 32})  # the student's start, exactly
    batch = collate(examples, 0)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        task = micro_loss(rtn, batch).item() / tokens
    kl = _kl_to_float(rtn, examples, 3.0)
    assert records[0]["qat_task_loss"] == pytest.approx(task, rel=1e-4)
    assert records[0]["qat_distill_kl"] == pytest.approx(kl, rel=1e-4)
    assert records[0]["loss"] == pytest.approx(0.75 * task + 0.25 * 9.0 * kl, rel=1e-4)
    _, plain, _ = prepared(qat(toy_task))  # without distill_weight: no teacher, the latent weights are not copies
    assert plain.teacher == {} and "qat_distill_kl" not in plain.step_metrics()


def test_group_size_that_does_not_divide_a_row_names_the_layer(toy_task):
    config = qat(toy_task, method={"group_size": 64})
    with pytest.raises(WeightwiseError, match="down_proj: group size 64 does not divide the row length 96"):
        prepared(config)


# --- the result: a quantized run ----------------------------------------------------------------------


def test_the_saved_run_gives_the_training_models_logits_bit_for_bit(toy_task, tmp_path):
    model = tiny_model()
    config = qat(toy_task, method={"format": "int3_asym", "freeze_threshold": 0.2, "oscillation_momentum": 0.5},
                 max_steps=4, lr=1e-2)
    metrics = tune(model, tiny_tokenizer(), config, tmp_path / "run")
    assert metrics["files"] == ["model"] and metrics["method"] == "qat"
    assert any(isinstance(m, FakeQuantLinear) for m in model.modules())  # the training model runs fake-quantized
    with torch.no_grad():
        trained = model(ids()).logits
    for folder in (tmp_path / "run" / "model", tmp_path / "run"):  # the quantized run, and the tune run naming it
        loaded, tokenizer = load_model(folder)
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, trained), folder
        assert tokenizer is not None
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert manifest["kind"] == "quantized-model" and len(manifest["layers"]) == 14
    assert {layer["spec"]["format"] for layer in manifest["layers"].values()} == {"int3_asym"}
    assert manifest["recipe"]["method"]["name"] == "qat" and manifest["tune"]["base_model_hash"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["files"] == ["model"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("qat_oscillating" in r and "qat_frozen" in r for r in lines)


def test_ternary_trains_from_absmean_scales_and_saves_packed_two_bit_codes(toy_task, tmp_path):
    """BitNet b1.58's ternary format on the same path: scales start at each group's absmean (as stored, fp16), codes
    are {-1, 0, +1}, the loss goes down, and the saved run holds 2-bit packed codes with the training model's logits."""
    from safetensors.torch import load_file

    from weightwise.formats.quantizer import storage_bits
    from weightwise.tune.api import target_modules

    config = qat(toy_task, method={"format": "ternary"}, max_steps=8, lr=1e-2)
    spec = config.method.spec
    model, method, examples = prepared(config)
    originals = target_modules(tiny_model(), config)
    for name, layer in method.layers.items():
        absmean = to_groups(originals[name].weight.detach(), spec).abs().mean(-1)
        assert torch.equal(layer.scales.detach(), absmean.half().float()), name
        assert set(layer.codes().unique().tolist()) <= {0, 1, 2}  # ternary's values -1, 0, +1 (code 3 is unused)
    start = {name: layer.codes() for name, layer in method.layers.items()}
    records = []
    train(model, method, examples, config, pad_token_id=0, on_step=records.append)
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.9 * losses[0], losses
    moved = sum(int((layer.codes() != start[name]).sum()) for name, layer in method.layers.items())
    assert moved > 0 and all(set(layer.codes().unique().tolist()) <= {0, 1, 2} for layer in method.layers.values())

    trained = tiny_model()
    tune(trained, tiny_tokenizer(), config, tmp_path / "run")
    with torch.no_grad():
        expected = trained(ids()).logits
    loaded, _ = load_model(tmp_path / "run" / "model")
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected)
    tensors = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    rows, cols = originals[name].weight.shape
    assert tensors[f"{name}.packed_codes"].dtype == torch.uint8
    assert tensors[f"{name}.packed_codes"].numel() == rows * cols * 2 // 8  # 2 bits a weight
    layer = loaded.get_submodule(name)
    assert set(unpacked_codes(layer.quantized_tensor()).unique().tolist()) <= {0, 1, 2}
    assert layer.stored_bits() == storage_bits((rows, cols), spec)
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert {layer["spec"]["format"] for layer in manifest["layers"].values()} == {"ternary"}


def test_init_from_a_quantized_run(toy_task, tmp_path):
    from weightwise.io.folders import save
    from weightwise.quantize import quantize

    gptq_like = quantize(tiny_model(), {"format": "int4", "group_size": 32})
    with torch.no_grad():  # another starting point than round-to-nearest: shrunk scales
        for m in gptq_like.modules():
            if hasattr(m, "set_scales"):
                m.set_scales(m.stored_scales()[0] * 0.9)
        expected = gptq_like(ids()).logits
    save(gptq_like, tmp_path / "q", tokenizer=tiny_tokenizer())
    config = qat(toy_task, method={"init": str(tmp_path / "q")})
    model, method, _ = prepared(config)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, expected)
    with pytest.raises(WeightwiseError, match="not int3 group 32 without LoRC"):
        prepared(qat(toy_task, method={"init": str(tmp_path / "q"), "format": "int3"}))
    with pytest.raises(WeightwiseError, match="quantized from another model"):
        prepared(qat(toy_task, method={"init": str(tmp_path / "q")}), tiny_model(seed=1))
    with pytest.raises(WeightwiseError, match="not a quantized run"):
        tiny_model().save_pretrained(tmp_path / "float")
        tiny_tokenizer().save_pretrained(tmp_path / "float")
        prepared(qat(toy_task, method={"init": str(tmp_path / "float")}))


# --- resuming --------------------------------------------------------------------------------------


def test_an_interrupted_qat_run_resumes_to_the_same_result(toy_task, tmp_path):
    from test_tune import _Kill, _kill_at

    config = qat(toy_task, method={"format": "int2_asym", "oscillation_momentum": 0.5, "freeze_threshold": 0.3,
                                   "dampening": 1.0, "distill_weight": 0.5},
                 max_steps=6, checkpoint_every=2, batch_size=4, lr=1e-2)
    reference = tiny_model()
    tune(reference, tiny_tokenizer(), config, tmp_path / "a")
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(5))
    assert (tmp_path / "b" / "checkpoints" / "step-00000004" / "state.json").is_file()
    resumed = tiny_model()
    metrics = tune(resumed, tiny_tokenizer(), config, tmp_path / "b")
    assert metrics["resumed_from_step"] == 4 and metrics["train"]["steps_run"] == 2
    for name, tensor in reference.state_dict().items():  # latent weights, scales, offsets, frozen codes
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert_same_tensors(tmp_path / "a" / "model", tmp_path / "b" / "model")  # the same codes and scales
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab"]
    keys = ("step", "loss", "qat_oscillating", "qat_frozen", "qat_dampening", "qat_distill_kl")
    assert [[r[k] for k in keys] for r in logs[0]] == [[r[k] for k in keys] for r in logs[1]]
    assert logs[0][-1]["qat_frozen"] > 0


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_qat_from_a_quantized_run_and_its_user_errors(capsys, monkeypatch, tiny_dir, toy_task, tmp_path):
    from test_cli import run_cli

    code, _, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--format", "int4", "--group-size", "32",
                           "-o", tmp_path / "q")
    assert code == 0, err
    common = ["tune", tiny_dir, "--task", toy_task, "--train-examples", "8", "--batch-size", "4", "--steps", "2",
              "--test-examples", "0", "--retention-max-tokens", "0"]
    code, out, err = run_cli(capsys, monkeypatch, *common, "--method", "qat", "--format", "int4", "-g", "32",
                             "--init", tmp_path / "q", "-o", tmp_path / "run")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "tune_config.json").read_text())["config"]["method"]
    assert saved["name"] == "qat" and saved["init"] == str(tmp_path / "q") and saved["group_size"] == 32
    code, _, err = run_cli(capsys, monkeypatch, "eval", tmp_path / "run" / "model", "--window", "64", "--max-tokens", "128",
                           "-o", tmp_path / "report")
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, *common, "--method", "qat", "--format", "ternary", "-g", "32",
                           "--distill-weight", "0.5", "--distill-temperature", "2", "-o", tmp_path / "ternary")
    assert code == 0, err
    manifest = json.loads((tmp_path / "ternary" / "model" / "manifest.json").read_text())
    assert {layer["spec"]["format"] for layer in manifest["layers"].values()} == {"ternary"}
    saved = json.loads((tmp_path / "ternary" / "tune_config.json").read_text())["config"]["method"]
    assert saved["distill_weight"] == 0.5 and saved["distill_temperature"] == 2.0
    lines = [json.loads(line) for line in (tmp_path / "ternary" / "metrics.jsonl").read_text().splitlines()]
    assert all("qat_distill_kl" in r and "qat_task_loss" in r for r in lines)
    for options, message in ((["--method", "qat", "--format", "nf4"], "not format 'nf4': use int2..int8"),
                             (["--method", "lift", "--format", "int4"], "format is not a setting of method lift"),
                             (["--method", "lift", "--distill-weight", "0.5"], "distill_weight is not a setting of method lift"),
                             (["--method", "qat", "-g", "32", "--distill-weight", "2"], "less than or equal to 1"),
                             (["--method", "qat", "--format", "int4"], "group size 64 does not divide the row length 96")):
        code, _, err = run_cli(capsys, monkeypatch, *common, *options, "-o", tmp_path / "bad")
        assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err
