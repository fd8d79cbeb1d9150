"""quantize(): targets, recipes, overrides, errors and save/load on tiny models; the anchor on the real one."""

import json

import pytest
import torch
from torch import nn

from conftest import tiny_model
from weightwise.errors import WeightwiseError
from weightwise.evaluate.size import model_size
from weightwise.quantize import QuantizedLinear, QuantRecipe, quantization_record, quantize
from weightwise.io.folders import load_quantized, save

TARGETS_PER_BLOCK = 7


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_quantize_swaps_block_linears_only_and_leaves_source_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize(model, QuantRecipe(format="int4", group_size=32))
    q = _qlinears(qmodel)
    assert len(q) == 2 * TARGETS_PER_BLOCK
    assert all(".layers." in n for n in q)
    assert isinstance(qmodel.lm_head, nn.Linear) and isinstance(qmodel.model.embed_tokens, nn.Embedding)
    assert not _qlinears(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ref, out = model(ids).logits, qmodel(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(ref, out)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.9


def test_weight_bytes_really_shrink():
    model = tiny_model(hidden_size=128, intermediate_size=256)
    qmodel = quantize(model, QuantRecipe(format="int4", group_size=64))
    full, small = model_size(model), model_size(qmodel)
    assert small["total_bytes"] < full["total_bytes"]
    assert small["bits_per_weight"] == pytest.approx(4 + 16 / 64)
    linear_bytes = sum(t.numel() * t.element_size() for m in _qlinears(qmodel).values() for t in m.buffers())
    assert linear_bytes * 8 == small["linear_bits"]


def test_sqnr_recorded_and_higher_for_more_bits():
    model = tiny_model()
    s8 = quantization_record(quantize(model, {"format": "int8", "granularity": "channel"}))
    s3 = quantization_record(quantize(model, {"format": "int3", "group_size": 32}))
    for name, layer in s8.layers.items():
        assert layer.sqnr_db > s3.layers[name].sqnr_db + 10
    assert len(s8.source_fingerprint) == 64


def test_overrides_skip_and_change_format():
    recipe = QuantRecipe(
        format="int4", group_size=32,
        overrides=[{"pattern": r"layers\.0\.mlp\.down_proj$", "skip": True},
                   {"pattern": r"down_proj$", "format": "nf4", "group_size": 16},
                   {"pattern": r"q_proj$", "format": "mxfp4"}],
    )
    q = _qlinears(quantize(tiny_model(), recipe))
    assert "model.layers.0.mlp.down_proj" not in q
    assert q["model.layers.1.mlp.down_proj"].spec.format == "nf4"
    assert q["model.layers.1.mlp.down_proj"].spec.resolved_group_size == 16
    assert q["model.layers.0.self_attn.q_proj"].spec.resolved_scale_dtype == "e8m0"
    assert q["model.layers.0.self_attn.k_proj"].spec.format == "int4"


def test_targets_and_ignore_patterns():
    q = _qlinears(quantize(tiny_model(), QuantRecipe(format="int8", granularity="channel", targets=["mlp"], ignore=["up_proj"])))
    assert sorted({n.rsplit(".", 1)[1] for n in q}) == ["down_proj", "gate_proj"]
    with pytest.raises(WeightwiseError, match="no Linear layer matches"):
        quantize(tiny_model(), QuantRecipe(targets=["nothing_here"]))


def test_recipe_yaml_and_field_errors(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("format: nf4\ngroup_size: 32\noverrides:\n  - pattern: down_proj\n    skip: true\n")
    recipe = QuantRecipe.from_yaml(good)
    assert recipe.format == "nf4" and recipe.overrides[0].skip
    assert QuantRecipe.from_yaml(good, group_size=16).group_size == 16
    cases = {
        "format: int4\ngroup_sise: 32\n": "group_sise: Extra inputs are not permitted",
        "format: int11\n": "unknown format 'int11'",
        "format: int4\ngroup_size: -3\n": "group_size must be a positive integer",
        "method: magic\n": "unknown method 'magic'",
        "format: mxfp4\ngroup_size: 64\n": "blocks of 32",
        "overrides:\n  - pattern: '('\n": "not a valid regex",
        "format: [int4\n": "not valid YAML",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(WeightwiseError, match=message.replace("(", r"\(")):
            QuantRecipe.from_yaml(bad)
    with pytest.raises(WeightwiseError, match="not found"):
        QuantRecipe.from_yaml(tmp_path / "missing.yaml")


def test_group_size_error_names_the_layer_and_pad_fixes_it():
    model = tiny_model(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(WeightwiseError, match=r"model\.layers\.0\.self_attn\.q_proj: group size 32 does not divide the row length 48"):
        quantize(model, QuantRecipe(format="int4", group_size=32))
    q = quantize(model, QuantRecipe(format="int4", group_size=32, pad=True))
    assert len(_qlinears(q)) == 2 * TARGETS_PER_BLOCK


def test_nan_weights_are_refused_before_any_work():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(WeightwiseError, match=r"model\.layers\.1\.mlp\.up_proj has 1 NaN/Inf"):
        quantize(model, QuantRecipe(format="int4", group_size=32))


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(WeightwiseError, match="architecture 'gpt2' is not supported"):
        quantize(gpt2, QuantRecipe())


def test_quantizing_twice_is_refused():
    q = quantize(tiny_model(), QuantRecipe(format="int4", group_size=32))
    with pytest.raises(WeightwiseError, match="already quantized"):
        quantize(q, QuantRecipe())


@pytest.mark.parametrize(
    "fields",
    [{"format": "int4_asym", "group_size": 32}, {"format": "fp4_e2m1", "group_size": 16, "scale_dtype": "bf16"},
     {"format": "mxfp6_e2m3"}, {"format": "int3", "group_size": 40, "pad": True}, {"format": "ternary", "granularity": "channel"}],
    ids=lambda f: f["format"],
)
def test_save_load_round_trip_is_exact(tmp_path, fields):
    model = tiny_model()
    fmt = fields["format"]
    qmodel = quantize(model, fields)
    path = save(qmodel, tmp_path / "run", metrics={"note": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "quantized-model" and manifest["recipe"]["format"] == fmt
    assert set(manifest["layers"]) == set(_qlinears(qmodel)) and "torch" in manifest["versions"]
    loaded, tokenizer = load_quantized(path)
    assert tokenizer is None
    for name, module in _qlinears(qmodel).items():
        other = dict(loaded.named_modules())[name]
        assert torch.equal(module.dequantized_weight(), other.dequantized_weight())
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_truncated_quantized_weights_are_reported(tmp_path):
    path = save(quantize(tiny_model(), {"format": "int4", "group_size": 32}), tmp_path / "run")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightwiseError, match="truncated or corrupt"):
        load_quantized(path)


def test_failed_save_leaves_no_folder(tmp_path):
    qmodel = quantize(tiny_model(), {"format": "int4", "group_size": 32})
    with pytest.raises(TypeError):
        save(qmodel, tmp_path / "run", metrics={"bad": object()})
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_anchor_int4_asym_g32_reproduces_the_q4_1_source(default_model):
    """The default SmolLM2 file is Q4_1: asymmetric INT4 with groups of 32 must give its weights back."""
    model, _ = default_model
    qmodel = quantize(model, {"format": "int4_asym", "group_size": 32, "scale_dtype": "fp16"})
    source = dict(model.named_modules())
    layers = _qlinears(qmodel)
    assert len(layers) == 30 * TARGETS_PER_BLOCK
    worst = 0.0
    for name, module in layers.items():
        w = source[name].weight.detach()
        scale = module.scales.float().abs().repeat_interleave(32, dim=1)
        # within fp16 rounding of the stored scale (2^-11 relative) over the 15 steps of a group
        bound = scale * 15 * 2.0**-11 + 1e-7
        diff = (module.dequantized_weight() - w).abs()
        assert (diff <= bound).all(), name
        worst = max(worst, diff.max().item())
    assert worst < 1e-4


def test_lorc_improves_layers_and_is_counted_in_the_size(tmp_path):
    model = tiny_model()
    plain = quantize(model, {"format": "int3", "group_size": 32})
    compensated = quantize(model, {"format": "int3", "group_size": 32, "lorc_rank": 4,
                                   "overrides": [{"pattern": "down_proj", "lorc_rank": 8}]})
    p, c = quantization_record(plain).layers, quantization_record(compensated).layers
    for name in p:
        assert c[name].sqnr_db > p[name].sqnr_db
        rank = 8 if "down_proj" in name else 4
        out_f, in_f = dict(model.named_modules())[name].weight.shape
        assert c[name].stored_bits - p[name].stored_bits == 16 * rank * (out_f + in_f)
        assert c[name].lorc.model_dump() == {"rank": rank, "dtype": "fp16"}
    assert model_size(compensated)["bits_per_weight"] > model_size(plain)["bits_per_weight"]
    loaded, _ = load_quantized(save(compensated, tmp_path / "lorc"))
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compensated(ids).logits)


@pytest.mark.parametrize("mode", ["all", "ratio"])
def test_pow2_scales_through_the_model(tmp_path, mode):
    model = tiny_model()
    qmodel = quantize(model, {"format": "int4", "group_size": 16, "pow2_scales": mode, "lorc_rank": 2, "lorc_dtype": "int8"})
    layer = _qlinears(qmodel)["model.layers.0.self_attn.q_proj"]
    if mode == "all":
        exponents = torch.log2(layer.scales.float().abs())
        assert torch.equal(exponents, exponents.round())
    else:
        assert layer.scales.shape == (64, 1) and layer.scale_shifts is not None
    loaded, _ = load_quantized(save(qmodel, tmp_path / mode))
    other = dict(loaded.named_modules())["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.dequantized_weight(), other.dequantized_weight())


def test_dequantized_once_gives_the_same_outputs_and_is_released():
    from weightwise.qlinear import dequantized_once

    qmodel = quantize(tiny_model(), {"format": "nf4", "group_size": 32})
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        plain = qmodel(ids).logits
        with dequantized_once(qmodel):
            assert all(m.held_weight is not None for m in _qlinears(qmodel).values())
            cached = qmodel(ids).logits
    assert torch.equal(plain, cached)
    assert all(m.held_weight is None for m in _qlinears(qmodel).values())


def test_public_api_functions_stay_callable_after_their_packages_are_imported():
    import subprocess
    import sys

    code = ("import weightwise as ww, weightwise.quantize.recipe, weightwise.tune.lift\n"
            "from conftest import tiny_model\n"
            "q = ww.quantize(tiny_model(), {'format': 'int4', 'group_size': 16})\n"
            "assert isinstance(q.model.layers[0].mlp.down_proj, ww.QuantizedLinear)\n"
            "assert callable(ww.tune) and ww.quantize.QuantRecipe is ww.QuantRecipe\n")
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code], cwd=tests_dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
