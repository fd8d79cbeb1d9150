"""Layer-sequential calibration engine on tiny models: capture, statistics, sequencing, data."""

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from weightwise.errors import WeightwiseError
from weightwise.formats import QuantSpec, quantize_tensor
from weightwise.quantize.calibration import (
    CalibrationConfig,
    calibration_tokens,
    capture_block_inputs,
    collect_stats,
    gram,
    layer_sequential,
    run_block,
)
from weightwise.qlinear import QuantizedLinear


def _tokens(n=6, length=16, seed=0):
    return torch.randint(1, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_parse_calibration_spec():
    assert CalibrationConfig.parse("pydoc:128x512") == CalibrationConfig(source="pydoc", samples=128, seq_len=512)
    assert CalibrationConfig.parse("data.jsonl").source == "data.jsonl"
    with pytest.raises(WeightwiseError, match="SAMPLESxTOKENS"):
        CalibrationConfig.parse("pydoc:12y3")


def test_calibration_tokens_from_text(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("abcdefghij" * 50)
    config = CalibrationConfig(source=str(text), samples=5, seq_len=40, seed=3)
    tokens = calibration_tokens(config, tiny_tokenizer())
    assert tokens.shape == (5, 40) and tokens.dtype == torch.long
    assert torch.equal(tokens, calibration_tokens(config, tiny_tokenizer()))
    with pytest.raises(WeightwiseError, match="fewer than the 50 asked for"):
        calibration_tokens(config.model_copy(update={"samples": 50}), tiny_tokenizer())


def test_pydoc_calibration_uses_the_calib_split():
    tok = tiny_tokenizer()
    tokens = calibration_tokens(CalibrationConfig(samples=4, seq_len=64), tok)
    assert tokens.shape == (4, 64)


def test_data_free_calibration_samples_from_the_model():
    model = tiny_model()
    tok = tiny_tokenizer()
    tok.bos_token = tok.unk_token
    tokens = calibration_tokens(CalibrationConfig(source="self", samples=3, seq_len=8, batch_size=2), tok, model)
    assert tokens.shape == (3, 8)


def test_blocks_rerun_from_captured_inputs_reproduce_the_model():
    model = tiny_model()
    tokens = _tokens()
    blocks = list(model.model.layers)
    inputs = capture_block_inputs(model, blocks[0], tokens, batch_size=4)
    assert [h.shape[0] for h, *_ in inputs] == [4, 2]
    for block in blocks:
        inputs = run_block(block, inputs)
    with torch.no_grad():
        expected = model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
    ours = model.model.norm(torch.cat([h for h, *_ in inputs]))
    assert torch.allclose(ours, expected, atol=1e-5)


def test_stats_are_token_normalized_input_hessians():
    model = tiny_model()
    tokens = _tokens()
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, tokens, batch_size=3)
    linears = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "down": block.mlp.down_proj}
    stats = collect_stats(block, linears, inputs)
    seen = {}
    handle = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for hidden, args, kwargs in inputs:
            block(hidden, *args, **kwargs)
    handle.remove()
    x = torch.cat(seen["x"])
    assert stats["down"]["tokens"] == tokens.numel()
    assert torch.allclose(stats["down"]["hessian"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(stats["down"]["act_abs_mean"], x.abs().mean(0), rtol=1e-5)
    assert torch.equal(stats["q"]["hessian"], stats["k"]["hessian"])  # shared input, computed once


def test_statistics_passes_stop_at_the_last_linear_after_the_first_batch():
    model = tiny_model()
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, _tokens(), batch_size=2)  # 3 batches
    down_calls, up_calls = [], []
    handles = [block.mlp.down_proj.register_forward_hook(lambda *a: down_calls.append(1)),
               block.mlp.up_proj.register_forward_hook(lambda *a: up_calls.append(1))]
    stats = collect_stats(block, {"down": block.mlp.down_proj, "gate": block.mlp.gate_proj}, inputs)
    assert len(down_calls) == 1 and len(up_calls) == 3  # after batch 1, down's input is recorded but its matmul skipped
    gate_only = collect_stats(block, {"gate": block.mlp.gate_proj}, inputs)
    assert len(up_calls) == 4  # stops before up_proj from the second batch on
    for handle in handles:
        handle.remove()
    assert torch.equal(gate_only["gate"]["hessian"], stats["gate"]["hessian"])
    assert stats["down"]["tokens"] == 6 * 16


def test_next_block_is_calibrated_on_quantized_outputs():
    model = tiny_model()
    tokens = _tokens()
    float_model = tiny_model()
    blocks = [(f"model.layers.{i}", b) for i, b in enumerate(model.model.layers)]
    targets = {name: {f"{name}.mlp.down_proj": b.mlp.down_proj} for name, b in blocks}
    order, seen = [], {}

    def quantize_block(index, name, stats, block_pass):
        order.append(index)
        seen.update(stats)
        block = dict(blocks)[name]
        qt = quantize_tensor(block.mlp.down_proj.weight.detach(), QuantSpec(format="int2", group_size=16))
        block.mlp.down_proj = QuantizedLinear.from_quantized(qt)

    layer_sequential(model, blocks, targets, tokens, 4, quantize_block)
    assert order == [0, 1]
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantizedLinear)

    def block1_down_stats(m):
        inputs = capture_block_inputs(m, m.model.layers[1], tokens, 4)
        return collect_stats(m.model.layers[1], {"x": m.model.layers[1].mlp.down_proj}, inputs)["x"]["hessian"]

    got = seen["model.layers.1.mlp.down_proj"]["hessian"]
    assert torch.allclose(got, block1_down_stats(model), rtol=1e-4, atol=1e-7)  # = the quantized block 0's outputs
    assert not torch.allclose(got, block1_down_stats(float_model), rtol=1e-3, atol=1e-7)  # ≠ the float model's


def test_block_stages_group_shared_inputs_in_call_order_and_restat_sees_quantized_stages():
    model = tiny_model()
    tokens = _tokens()
    name, block = "model.layers.0", model.model.layers[0]
    linears = {f"{name}.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = {}

    def keep(index, block_name, stats, block_pass):
        seen.update(stats=stats, block_pass=block_pass)

    layer_sequential(model, [(name, block)], {name: linears}, tokens, 4, keep)
    block_pass, o_proj = seen["block_pass"], f"{name}.self_attn.o_proj"
    assert block_pass.stages == [[f"{name}.self_attn.{p}_proj" for p in "qkv"], [o_proj],
                                 [f"{name}.mlp.gate_proj", f"{name}.mlp.up_proj"], [f"{name}.mlp.down_proj"]]
    float_hessian = seen["stats"][o_proj]["hessian"]
    assert torch.allclose(block_pass.stats([o_proj])[o_proj]["hessian"], float_hessian)  # nothing quantized yet
    block.self_attn.v_proj = QuantizedLinear.from_quantized(
        quantize_tensor(block.self_attn.v_proj.weight.detach(), QuantSpec(format="int2", group_size=16)))
    restat = block_pass.stats([o_proj])[o_proj]
    inputs = capture_block_inputs(model, block, tokens, 4)
    assert torch.allclose(restat["hessian"], collect_stats(block, {"o": block.self_attn.o_proj}, inputs)["o"]["hessian"])
    assert not torch.allclose(restat["hessian"], float_hessian, rtol=1e-3, atol=1e-7)
    assert restat["tokens"] == tokens.numel()


def test_true_sequential_gptq_runs_stage_by_stage_and_changes_later_stages_only():
    from weightwise.quantize.api import quantize
    from weightwise.quantize.recipe import QuantRecipe

    tokens = _tokens(8, 32)
    runs = {}
    for sequential in (False, True):
        recipe = QuantRecipe(format="int3", group_size=16, method="gptq",
                             calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4, true_sequential=sequential))
        runs[sequential] = dict(quantize(tiny_model(), recipe, calibration=tokens).named_modules())
    first_block = "model.layers.0."
    for suffix in ("self_attn.q_proj", "self_attn.v_proj"):  # stage 1 of block 0: same statistics either way
        assert torch.equal(runs[False][first_block + suffix].dequantized_weight(), runs[True][first_block + suffix].dequantized_weight())
    later = runs[True][first_block + "mlp.down_proj"].dequantized_weight()
    assert not torch.equal(runs[False][first_block + "mlp.down_proj"].dequantized_weight(), later)


@pytest.mark.parametrize("d", [1, 5, 192, 200, 577])
def test_gram_mirrors_the_upper_blocks_exactly(d):
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(d))
    got = gram(x)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[:192, 192:], got[192:, :192].T)  # the lower blocks are mirrored copies
