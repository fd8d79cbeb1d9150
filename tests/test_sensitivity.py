"""Planner sensitivities: loss-gradient channel weights and method-aware (GPTQ) candidate errors."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from weightwise.quantize.methods.gptq import gptq, output_error
from weightwise.formats.quantizer import dequantize
from weightwise.quantize.planning import PlanCandidate, anchor_spec, layer_candidates, method_gain, round_to_nearest
from weightwise.quantize.sensitivity import output_gradient_moments


def test_gradient_moments_match_autograd_on_the_layer_output():
    model = tiny_model()
    tokens = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    linear = dict(model.named_modules())[name]
    moments = output_gradient_moments(model, {name: linear}, tokens, batch_size=2)[name]

    total = torch.zeros(linear.out_features)
    for row in tokens:  # brute force, one sequence at a time, with retain_grad on the output
        kept = {}
        handle = linear.register_forward_hook(lambda m, a, out: kept.setdefault("y", out.retain_grad() or out))
        logits = model(input_ids=row[None]).logits
        F.cross_entropy(logits[0, :-1], row[1:], reduction="sum").backward()
        handle.remove()
        total += kept["y"].grad.pow(2).reshape(-1, linear.out_features).sum(0)
        model.zero_grad()
    expected = total / tokens.numel()
    assert moments.shape == (linear.out_features,)
    assert torch.allclose(moments, expected, rtol=1e-4, atol=1e-10)


def test_gradient_moments_compute_no_parameter_gradients():
    model = tiny_model()
    tokens = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    linears = {n: m for n, m in model.named_modules() if n.endswith("q_proj")}
    moments = output_gradient_moments(model, linears, tokens)
    assert set(moments) == set(linears) and all((m > 0).all() for m in moments.values())
    assert all(p.grad is None for p in model.parameters())


def test_row_weights_weight_each_output_channels_error():
    torch.manual_seed(0)
    w, approx = torch.randn(6, 8), torch.randn(6, 8)
    x = torch.randn(50, 8)
    h = x.T @ x / 50
    weights = torch.rand(6)
    per_row = [output_error(w[i : i + 1], approx[i : i + 1], h) for i in range(6)]
    assert output_error(w, approx, h, torch.ones(6)) == pytest.approx(output_error(w, approx, h))
    assert output_error(w, approx, h, weights) == pytest.approx(sum(float(a) * b for a, b in zip(weights, per_row)))


def test_gptq_gain_scales_every_candidate_of_a_layer():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)  # uneven channel scales, correlated through a mix
    x = x @ (torch.eye(64) + 0.3 * torch.randn(64, 64))
    hessian = x.T @ x / 256
    cands = [PlanCandidate(format="int2_asym", group_size=32), PlanCandidate(format="int3", group_size=32)]

    def by_gptq(w, spec, h):
        return dequantize(gptq(w, spec, h)[0])

    anchor = anchor_spec(weight, cands, False, "none")
    assert anchor.format == "int3"
    gain = method_gain(weight, hessian, anchor, by_gptq)
    assert 0 < gain < 1
    assert method_gain(weight, hessian, anchor, round_to_nearest) == pytest.approx(1.0)
    rtn = layer_candidates(weight, hessian, cands, False, "none", "fp16")
    scaled = layer_candidates(weight, hessian, cands, False, "none", "fp16", gain=gain)
    assert [c.bits for c in rtn] == [c.bits for c in scaled]
    assert [c.error for c in scaled] == pytest.approx([gain * c.error for c in rtn])
