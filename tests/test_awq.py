"""AWQ and SmoothQuant: scale search and clip search never lose to RTN on the output error, folding
leaves every supported architecture's float outputs unchanged, and quantize() wires it end to end."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from conftest import tiny_model
from weightwise.architectures import family_of
from weightwise.errors import WeightwiseError
from weightwise.formats import QuantSpec, dequantize, quantize_tensor
from weightwise.formats.quantizer import group_layout
from weightwise.quantize import QuantizedLinear, quantization_record, quantize
from weightwise.quantize.calibration import layer_sequential
from weightwise.quantize.methods import AWQConfig
from weightwise.quantize.methods.awq import (
    clamp_groups,
    fake_quantize,
    fold_scales,
    group_errors,
    scale_stats,
    search_clip,
    search_scales,
    smoothquant_scales,
)
from weightwise.quantize.methods.gptq import output_error
from weightwise.quantize.recipe import QuantRecipe
from weightwise.quantize.scaling import migrate_scales, scaling_groups

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}


def _layer(rows=48, cols=128, n=1024, outliers=True, seed=0):
    """Weight, inputs and H = XᵀX / n; with ``outliers`` a few input channels are 10× larger and a few
    other weight columns 6× larger (they set the group scales, as in real LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) + 0.5 * torch.randn(n, 1, generator=gen)
    w = 0.02 * torch.randn(rows, cols, generator=gen)
    if outliers:
        x[:, torch.randperm(cols, generator=gen)[:4]] *= 10
        w[:, torch.randperm(cols, generator=gen)[:4]] *= 6
    return w, x, x.T @ x / n


def _rtn_error(w, h, spec):
    return output_error(w, dequantize(quantize_tensor(w, spec)), h)


SPECS = {
    "int3_g32": QuantSpec(format="int3", group_size=32),
    "int3_asym_g32": QuantSpec(format="int3_asym", group_size=32),
    "nf4_channel": QuantSpec(format="nf4", granularity="channel"),
    "fp4_e2m1_g16": QuantSpec(format="fp4_e2m1", group_size=16),
    "mxfp4": QuantSpec(format="mxfp4"),
}


@pytest.mark.parametrize("name", SPECS)
def test_awq_scales_beat_rtn_with_outlier_channels(name):
    spec = SPECS[name]
    w, x, h = _layer()
    scales, info = search_scales([w], h, x.abs().mean(0), spec, grid=10)
    error = output_error(w, dequantize(quantize_tensor(w * scales, spec)) / scales, h)
    assert error == pytest.approx(info["error"], rel=1e-4) and info["rtn_error"] == pytest.approx(_rtn_error(w, h, spec), rel=1e-4)
    assert error < 0.7 * info["rtn_error"] and info["alpha"] is not None  # observed 0.13-0.43


@pytest.mark.parametrize("duo", [True, False])
def test_awq_is_never_worse_than_rtn(duo):
    spec = SPECS["int3_g32"]
    for seed in range(3):
        w, x, h = _layer(outliers=False, seed=seed)
        w2 = 0.05 * torch.randn(16, 128, generator=torch.Generator().manual_seed(seed))
        scales, info = search_scales([w, w2], h, x.abs().mean(0), spec, grid=5, duo_scaling=duo)
        assert info["error"] <= info["rtn_error"]
        assert scales.shape == (128,) and torch.all(scales > 0)
        if info["alpha"] is None:
            assert torch.equal(scales, torch.ones(128))


CLIP_SPECS = [
    *SPECS.values(),
    QuantSpec(format="int4", granularity="tensor"),
    QuantSpec(format="int4", group_size=48, pad=True),
    QuantSpec(format="int4", group_size=32, pow2_scales="ratio"),
    QuantSpec(format="ternary", group_size=32, scale_dtype="bf16"),
]


@pytest.mark.parametrize("spec", CLIP_SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{s.group_size}-{s.pow2_scales}")
def test_clip_search_is_never_worse_than_no_clip(spec):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 128, generator=gen) ** 3  # heavy tails: clipping pays
    _, _, h = _layer(cols=128)
    clipped, ratios = search_clip(w, h, spec, grid=10)
    error = output_error(w, dequantize(quantize_tensor(clipped, spec)), h)
    assert error <= _rtn_error(w, h, spec)
    assert ratios.shape == group_layout(tuple(w.shape), spec)[:2]
    assert torch.all((ratios >= 0.5) & (ratios <= 1))
    assert torch.all(clipped.abs() <= w.abs() + 1e-6)  # clamping never grows an entry


def test_clip_search_clips_heavy_tailed_int3_groups():
    spec = SPECS["int3_asym_g32"]
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2)) ** 3
    _, _, h = _layer(cols=128)
    clipped, ratios = search_clip(w, h, spec)
    assert ratios.shape == (24, 4) and (ratios < 1).float().mean() > 0.5
    assert output_error(w, dequantize(quantize_tensor(clipped, spec)), h) < 0.8 * _rtn_error(w, h, spec)


def test_group_errors_add_up_to_the_output_error():
    w, _, h = _layer(cols=96)
    e = 0.01 * torch.randn(w.shape)
    block_diag = torch.block_diag(*(h[i : i + 32, i : i + 32] for i in range(0, 96, 32)))
    grouped = group_errors(e, block_diag, QuantSpec(format="int4", group_size=32))
    assert grouped.shape == (48, 3)
    assert float(grouped.sum()) == pytest.approx(output_error(e, torch.zeros_like(e), block_diag), rel=1e-5)
    per_row = group_errors(e, h, QuantSpec(format="int4", granularity="channel"))
    assert per_row.shape == (48, 1) and float(per_row.sum()) == pytest.approx(output_error(e, torch.zeros_like(e), h), rel=1e-5)


@pytest.mark.parametrize("spec", CLIP_SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{s.group_size}-{s.pow2_scales}")
def test_fake_quantize_equals_quantize_then_dequantize(spec):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3)) ** 3
    assert torch.equal(fake_quantize(w, spec), dequantize(quantize_tensor(w, spec)))


def test_clamp_groups_shrinks_each_groups_range():
    w = torch.tensor([[-4.0, 1.0, 2.0, 8.0]])
    assert clamp_groups(w, QuantSpec(format="int4", group_size=2), 0.5).tolist() == [[-2.0, 1.0, 2.0, 4.0]]
    w = torch.tensor([[-1.0, 1.0, 2.0, 8.0]])
    assert clamp_groups(w, QuantSpec(format="int4", group_size=4), 0.5).tolist() == [[-1.0, 1.0, 2.0, 4.0]]
    asym = clamp_groups(w, QuantSpec(format="int4_asym", group_size=4), torch.tensor([[0.5]]))
    assert asym.tolist() == [[-0.5, 1.0, 2.0, 4.0]]


def test_smoothquant_scales_balance_activation_and_weight_ranges():
    gen = torch.Generator().manual_seed(3)
    act_max = torch.rand(16, generator=gen) * 10 + 0.1
    weights = [torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)]
    s = smoothquant_scales(act_max, weights, 0.5)
    w_max = torch.cat(weights).abs().amax(0)
    assert torch.allclose(act_max / s, w_max * s, rtol=1e-5)  # α = 1/2: equal ranges after migration
    assert torch.allclose(smoothquant_scales(act_max, weights, 1.0), act_max)
    with pytest.raises(WeightwiseError, match="alpha"):
        smoothquant_scales(act_max, weights, 1.5)


def test_scale_stats_are_the_statistics_of_the_rescaled_inputs():
    _, x, h = _layer(cols=32)
    s = torch.rand(32) + 0.5
    stats = scale_stats({"hessian": h, "act_abs_mean": x.abs().mean(0), "act_abs_max": x.abs().amax(0), "tokens": 7}, s)
    xs = x / s
    assert torch.allclose(stats["hessian"], xs.T @ xs / len(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(stats["act_abs_mean"], xs.abs().mean(0)) and torch.allclose(stats["act_abs_max"], xs.abs().amax(0))
    assert stats["tokens"] == 7


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_scales_keeps_norm_then_linears_unchanged(offset):
    torch.manual_seed(0)
    weight, bias = torch.randn(16), torch.randn(16)
    linears = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 4, bias=False)]
    x = torch.randn(5, 16)

    def run(w, b):
        return [lin(x * (offset + w) + b) for lin in linears]

    before = run(weight, bias)
    norm = torch.nn.LayerNorm(16)
    norm.weight.data, norm.bias.data = weight.clone(), bias.clone()
    fold_scales(norm, linears, torch.rand(16) + 0.2, norm_offset=offset)
    for a, b in zip(before, run(norm.weight.data, norm.bias.data)):
        assert torch.allclose(a, b, atol=1e-5)


def test_fold_scales_into_a_previous_linear_and_shape_checks():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)
    x = torch.randn(4, 8)
    before = second(first(x))
    fold_scales(first, [second], torch.rand(12) + 0.2)
    assert torch.allclose(before, second(first(x)), atol=1e-5)
    with pytest.raises(WeightwiseError, match="cannot fold"):
        fold_scales(first, [torch.nn.Linear(7, 2)], torch.ones(12))


_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256)
FAMILY_CONFIGS = {
    "llama": (LlamaConfig, {}, 4),
    "llama_gqa": (LlamaConfig, {"num_key_value_heads": 2}, 3),  # v_proj → o_proj does not fit: skipped
    "mistral": (MistralConfig, {}, 4),
    "qwen2": (Qwen2Config, {}, 4),
    "qwen3": (Qwen3Config, {"head_dim": 16}, 4),
    "gemma2": (Gemma2Config, {"head_dim": 16}, 4),
    "gemma3_text": (Gemma3TextConfig, {"head_dim": 16}, 4),
    "phi3": (Phi3Config, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, 2),
}


def _family_model(key):
    cls, extra, _ = FAMILY_CONFIGS[key]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**{**_COMMON, **extra})).eval()
    with torch.no_grad():  # non-trivial norm weights (Gemma's start at 0, i.e. a factor 1)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def _blocks(model):
    return [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]


@pytest.mark.parametrize("key", FAMILY_CONFIGS)
def test_folding_random_scales_keeps_every_family_unchanged(key):
    model = _family_model(key)
    family = family_of(model.config.model_type)
    tokens = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
    gen = torch.Generator().manual_seed(1)
    for block_name, block in _blocks(model):
        specs = {f"{block_name}.{n}": QuantSpec(format="int4") for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert len(scaling_groups(block, block_name, family, specs)) == FAMILY_CONFIGS[key][2]
        stats = {name: {"hessian": torch.eye(block.get_submodule(name[len(block_name) + 1 :]).in_features)} for name in specs}
        out = migrate_scales(block, block_name, specs, stats, family,
                             lambda ws, shared, sp: (torch.rand(ws[0].shape[1], generator=gen) * 3 + 0.2, {}), "random")
        assert any("folded" in s for s in out.values())
    with torch.no_grad():
        after = model(tokens).logits
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, _family_model(key).model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", [{"smoothquant_alpha": 0.5}, {"method": {"name": "awq", "grid": 4}}], ids=["smoothquant", "awq"])
def test_block_steps_keep_the_float_model_unchanged(recipe):
    """Run only the block steps (no quantization) through layer-sequential calibration: same logits."""
    model = tiny_model(num_key_value_heads=4)
    recipe = QuantRecipe(format="int3", group_size=32, **recipe)
    tokens = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
    family, blocks = family_of("llama"), _blocks(model)
    by_block = {name: {n: m for n, m in block.named_modules(prefix=name) if isinstance(m, torch.nn.Linear)} for name, block in blocks}
    folded = []

    def step_only(index, block_name, stats, block_pass):
        specs = {name: recipe.base_spec() for name in by_block[block_name]}
        for step in recipe.block_steps():
            stats = step(dict(blocks)[block_name], block_name, specs, stats, family)
        folded.extend(note for s in stats.values() for note in s.get("folded", []))

    layer_sequential(model, blocks, by_block, tokens, 2, step_only)
    assert len(folded) == 2 * (3 + 2 + 1 + 1)  # per block: q/k/v, gate/up, down, o
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, atol=1e-4, rtol=1e-4)


def _output_mse(model, qmodel, tokens):
    with torch.no_grad():
        return (model(tokens).logits - qmodel(tokens).logits).pow(2).mean().item()


def test_awq_beats_rtn_end_to_end_and_records_its_choices():
    model = tiny_model()
    with torch.no_grad():  # a few outlier channels in the normed activations, as in real LLMs
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 8
            layer.post_attention_layernorm.weight[5:7] *= 8
    calib = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    norm = model.model.layers[0].input_layernorm.weight.clone()
    rtn = quantize(model, {"format": "int3", "group_size": 32})
    awq = quantize(model, {"format": "int3", "group_size": 32, "method": {"name": "awq", "grid": 10, "clip_grid": 10},
                           "calibration": CALIB}, calibration=calib)
    assert _output_mse(model, awq, calib) < 0.8 * _output_mse(model, rtn, calib)
    assert not torch.equal(awq.model.layers[0].input_layernorm.weight, norm)  # folded into the copy ...
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)  # ... not into the user's model
    layers = quantization_record(awq).layers
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.folded[0]["step"] == "awq" and q.folded[0]["from"] == "input_layernorm"
    assert q.folded[0]["error"] <= q.folded[0]["rtn_error"]
    assert layers["model.layers.0.self_attn.o_proj"].folded is None  # GQA: v_proj → o_proj skipped
    assert all(0.5 <= layer.diagnostics["clip"]["min_ratio"] <= 1 for layer in layers.values())


def test_awq_then_gptq_and_smoothquant_records():
    model, calib = tiny_model(), torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    recipe = {"format": "int4", "group_size": 32, "method": {"name": "awq", "then": "gptq", "clip": False, "grid": 4},
              "smoothquant_alpha": 0.5, "calibration": CALIB}
    qmodel = quantize(model, recipe, calibration=calib)
    record = quantization_record(qmodel).layers["model.layers.1.mlp.down_proj"]
    assert [note["step"] for note in record.folded] == ["smoothquant", "awq"]
    assert "damp" in record.diagnostics and "clip" not in record.diagnostics
    assert _output_mse(model, qmodel, calib) < _output_mse(model, quantize(model, {"format": "int4", "group_size": 32}), calib)


def test_smoothquant_needs_calibration_and_a_valid_alpha():
    assert QuantRecipe(smoothquant_alpha=0.5).needs_calibration and not QuantRecipe().needs_calibration
    assert QuantRecipe(method="awq").needs_calibration
    with pytest.raises(WeightwiseError, match="needs calibration data"):
        quantize(tiny_model(), {"format": "int8", "granularity": "channel", "smoothquant_alpha": 0.5})
    with pytest.raises(WeightwiseError, match="smoothquant_alpha"):
        quantize(tiny_model(), {"smoothquant_alpha": 1.5})
    with pytest.raises(WeightwiseError, match="max_shrink"):
        quantize(tiny_model(), {"method": {"name": "awq", "max_shrink": 1.0}})
    assert isinstance(QuantRecipe(method="awq").method, AWQConfig)


def test_awq_model_saves_and_loads_with_identical_logits(tmp_path):
    from weightwise.io.folders import load_quantized, save

    model, calib = tiny_model(num_key_value_heads=4), torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(3))
    qmodel = quantize(model, {"format": "int4", "group_size": 32, "method": {"name": "awq", "grid": 5, "clip_grid": 5},
                              "calibration": CALIB}, calibration=calib)
    loaded, _ = load_quantized(save(qmodel, tmp_path / "awq"))
    with torch.no_grad():
        assert torch.equal(loaded(calib).logits, qmodel(calib).logits)
    assert quantization_record(loaded).layers["model.layers.0.self_attn.o_proj"].folded[0]["from"] == "self_attn.v_proj"


def test_killed_awq_run_resumes_with_the_folded_norms(tmp_path):
    model, calib = tiny_model(), torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(4))
    recipe = {"format": "int4", "group_size": 16, "method": {"name": "awq", "grid": 5, "clip_grid": 5}, "calibration": CALIB}
    reference = quantize(model, recipe, calibration=calib)

    def kill_after_first_block(done, total, name):
        if done == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(model, recipe, calibration=calib, checkpoint_dir=tmp_path / "partial", progress=kill_after_first_block)
    resumed = quantize(model, recipe, calibration=calib, checkpoint_dir=tmp_path / "partial")
    assert quantization_record(resumed).calibration.resumed_at_block == 1
    assert sum(isinstance(m, QuantizedLinear) for m in resumed.modules()) == 14
    with torch.no_grad():
        assert torch.equal(resumed(calib).logits, reference(calib).logits)


def test_cli_quantize_with_awq_and_smoothquant(capsys, monkeypatch, tiny_dir, tmp_path):
    import json
    import sys

    from weightwise.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["weightwise", *map(str, args)])
        try:
            main()
        except SystemExit as exit_:
            return exit_.code or 0, capsys.readouterr().err
        return 0, capsys.readouterr().err

    text = tmp_path / "calib.txt"
    text.write_text("some calibration text for the tiny model. " * 30)
    out = tmp_path / "awq"
    code, err = run("quantize", tiny_dir, "--method", "awq", "--smoothquant-alpha", "0.5", "-f", "int4", "-g", "32",
                    "--calib", f"{text}:8x32", "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["method"]["name"] == "awq" and manifest["recipe"]["smoothquant_alpha"] == 0.5
    steps = [note["step"] for note in manifest["layers"]["model.layers.0.mlp.gate_proj"]["folded"]]
    assert steps == ["smoothquant", "awq"]
    code, err = run("quantize", tiny_dir, "--smoothquant-alpha", "2", "-o", tmp_path / "bad")
    assert code == 2 and "smoothquant_alpha" in err.splitlines()[-1] and not (tmp_path / "bad").exists()


def test_folding_keeps_a_bert_encoder_unchanged():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=64)).eval()
    tokens = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).last_hidden_state
    family, gen = family_of("bert"), torch.Generator().manual_seed(1)
    for i, block in enumerate(model.encoder.layer):
        name = f"encoder.layer.{i}"
        specs = {f"{name}.{n}": QuantSpec(format="int4") for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stats = {n: {"hessian": torch.eye(block.get_submodule(n[len(name) + 1 :]).in_features)} for n in specs}
        assert len(scaling_groups(block, name, family, specs)) == 1
        migrate_scales(block, name, specs, stats, family,
                       lambda ws, shared, sp: (torch.rand(ws[0].shape[1], generator=gen) * 3 + 0.2, {}), "random")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).last_hidden_state, before, atol=1e-4, rtol=1e-4)


def test_smoothquant_lowers_the_error_of_quantized_activations():
    model = tiny_model()
    with torch.no_grad():  # activation outlier channels, which per-token activation scales suffer from
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 30
            layer.post_attention_layernorm.weight[5:7] *= 30
    calib, held_out = (torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    recipe = {"format": "int8", "granularity": "channel", "act_format": "int4", "calibration": CALIB}
    plain = quantize(model, recipe, calibration=calib)
    smooth = quantize(model, {**recipe, "smoothquant_alpha": 0.5}, calibration=calib)
    assert _output_mse(model, smooth, held_out) < 0.5 * _output_mse(model, plain, held_out)  # observed 0.29


@pytest.mark.slow
def test_awq_beats_rtn_on_a_block_of_the_default_model(default_model):
    """SmolLM2 (3 KV heads of 9: v_proj → o_proj is skipped), int3 g32 on block 0, on the calibration tokens."""
    model, _ = default_model
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    recipe = {"format": "int3", "group_size": 32, "targets": [r"^model\.layers\.0\..*_proj$"],
              "calibration": {"samples": 4, "seq_len": 64, "batch_size": 4}}
    rtn = quantize(model, recipe)
    awq = quantize(model, {**recipe, "method": {"name": "awq", "grid": 5, "clip_grid": 5}}, calibration=tokens)
    assert _output_mse(model, awq, tokens) < _output_mse(model, rtn, tokens)
    layers = quantization_record(awq).layers
    assert layers["model.layers.0.self_attn.o_proj"].folded is None
    assert [n["from"] for n in layers["model.layers.0.mlp.down_proj"].folded] == ["mlp.up_proj"]
