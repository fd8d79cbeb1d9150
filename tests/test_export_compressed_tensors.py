"""compressed-tensors export: transformers loads the folder on CPU and computes what weightwise's quantized model does."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from conftest import tiny_model, tiny_tokenizer
from weightwise.errors import WeightwiseError
from weightwise.export.compressed_tensors import quantized_layers, vllm_shape_warnings, write_compressed_tensors
from weightwise.quantize import quantize

VOCAB = 128


def _quantized(recipe: dict, **overrides):
    return quantize(tiny_model(vocab_size=VOCAB, intermediate_size=128, **overrides), recipe)


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits.float()


def _assert_same_model(ours, loaded) -> None:
    """The logits agree to 1e-5 relative, and every quantized layer's loaded weight equals our dequantized one
    exactly (checked after a forward: a compressed load decompresses on its first one)."""
    expected = _logits(ours)
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for name, layer in quantized_layers(ours).items():
        assert torch.equal(loaded.get_submodule(name).weight.float(), layer.dequantized_weight()), name


@pytest.mark.parametrize("recipe", [
    {"format": "int4", "group_size": 32},
    {"format": "int8", "granularity": "channel"},
    {"format": "int4", "granularity": "channel", "scale_dtype": "bf16"},
    {"format": "int8", "group_size": 64, "scale_dtype": "e8m0"},
    {"format": "int4", "group_size": 32, "pow2_scales": "ratio"},
    {"format": "fp8_e4m3", "granularity": "channel"},
    {"format": "fp8_e4m3", "granularity": "tensor"},
], ids=lambda r: "-".join(str(v) for v in r.values()))
def test_transformers_loads_the_export_with_our_weights_and_logits(tmp_path, recipe):
    ours = _quantized(recipe)
    report = write_compressed_tensors(ours, tiny_tokenizer(VOCAB), tmp_path)
    _assert_same_model(ours, AutoModelForCausalLM.from_pretrained(tmp_path))
    assert report["bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert [group["layers"] for group in report["groups"].values()] == [list(quantized_layers(ours))]
    assert (tmp_path / "tokenizer.json").exists()


def test_config_and_tensors_follow_compressed_tensors(tmp_path):
    ours = _quantized({"format": "int4", "group_size": 32})
    write_compressed_tensors(ours, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] | {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32} == group["weights"]
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32 and tensors[f"{name}.weight_packed"].shape == (64, 16)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float16 and tensors[f"{name}.weight_scale"].shape == (64, 4)
    # signed absmax puts the largest magnitude on code -8: its scale is negative, kept as it is
    assert any((value < 0).any() for key, value in tensors.items() if key.endswith("weight_scale"))
    assert "lm_head.weight" not in tensors  # tied to the embeddings, which are written as they are
    assert torch.equal(tensors["model.embed_tokens.weight"], ours.model.embed_tokens.weight)


def test_untied_head_and_dtype_option(tmp_path):
    ours = _quantized({"format": "int8", "granularity": "channel"}, tie_word_embeddings=False)
    write_compressed_tensors(ours, None, tmp_path, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16  # quantized layers keep theirs
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))


def test_mixed_precision_groups_by_scheme(tmp_path):
    recipe = {"format": "int4", "group_size": 32,
              "overrides": [{"pattern": r"self_attn\.", "format": "int8", "granularity": "channel"},
                            {"pattern": r"layers\.1\.mlp\.down_proj$", "format": "fp8_e4m3", "granularity": "channel"}]}
    ours = _quantized(recipe)
    report = write_compressed_tensors(ours, None, tmp_path)
    assert report["format"] == "mixed-precision" and len(report["groups"]) == 3
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert sorted(len(group["targets"]) for group in config["config_groups"].values()) == [1, 5, 8]
    _assert_same_model(ours, AutoModelForCausalLM.from_pretrained(tmp_path))


def test_mxfp4_is_exact_but_transformers_decompresses_it_to_bfloat16(tmp_path):
    ours = _quantized({"format": "mxfp4"})
    report = write_compressed_tensors(ours, None, tmp_path)
    assert report["format"] == "mxfp4-pack-quantized"
    assert any("bfloat16" in warning for warning in report["warnings"])
    # float32 and exact: dequantize while loading
    _assert_same_model(ours, AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True)))
    # the default (compressed) load: bfloat16 weights, every one equal to ours
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    _logits(loaded)
    for name, layer in quantized_layers(ours).items():
        assert torch.equal(loaded.get_submodule(name).weight.float(), layer.dequantized_weight()), name


def test_mxfp4_with_bfloat16_dtype_loads_by_default(tmp_path):
    ours = _quantized({"format": "mxfp4"})
    report = write_compressed_tensors(ours, None, tmp_path, dtype=torch.bfloat16)
    assert not any("bfloat16" in warning for warning in report["warnings"])
    assert _logits(AutoModelForCausalLM.from_pretrained(tmp_path)).isfinite().all()


def test_asymmetric_int_with_integer_zero_points_is_exact(tmp_path):
    ours = _quantized({"format": "int4_asym", "group_size": 32})
    for layer in quantized_layers(ours).values():  # scales of 7 significant bits, offsets -s·k with k in [0, 15]
        mantissa, exponent = torch.frexp(layer.scales.float())
        scales = torch.ldexp(torch.round(mantissa * 64) / 64, exponent)
        k = torch.round(-layer.offsets.float() / scales).clamp(0, 15)
        layer.scales.copy_(scales)
        layer.offsets.copy_(-(scales * k))
    report = write_compressed_tensors(ours, None, tmp_path)
    assert "asymmetric" in next(iter(report["groups"].values()))["scheme"]
    assert any("zero points" in warning for warning in report["warnings"])
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight_zero_point"].shape == (16, 2)  # packed, 8 per int32 down the rows
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float32
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the compressed load expects them unpacked
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_model(ours, AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True)))


def test_asymmetric_int_with_float_offsets_is_refused(tmp_path):
    ours = _quantized({"format": "int4_asym", "group_size": 32})
    with pytest.raises(WeightwiseError, match=r"model\.layers\.0\.self_attn\.q_proj: int4_asym offsets are not integer"):
        write_compressed_tensors(ours, None, tmp_path)


@pytest.mark.parametrize(("recipe", "why"), [
    ({"format": "nf4", "group_size": 32}, "format nf4 has no exact compressed-tensors scheme"),
    ({"format": "int3", "group_size": 32}, "format int3 has no exact compressed-tensors scheme"),
    ({"format": "int4", "group_size": 32, "lorc_rank": 4}, "low-rank compensation"),
    ({"format": "int4", "granularity": "tensor"}, "one scale per tensor"),
    ({"format": "fp8_e4m3", "group_size": 32}, "fp8_e4m3 with group scales"),
    ({"format": "int4", "group_size": 48, "pad": True}, "group size 48 does not divide in_features 64"),
], ids=["nf4", "int3", "lorc", "int-tensor", "fp8-group", "padded-group"])
def test_inexact_layers_are_refused_by_name_before_writing(tmp_path, recipe, why):
    ours = _quantized(recipe)
    with pytest.raises(WeightwiseError, match=rf"model\.layers\.0\.self_attn\.q_proj: [^;]*{why}") as caught:
        write_compressed_tensors(ours, None, tmp_path)
    assert "model.layers.1.mlp.down_proj" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def _smollm2_shaped(recipe: dict):
    """One block with SmolLM2-135M's shapes: hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads."""
    return quantize(tiny_model(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                               num_key_value_heads=3, num_hidden_layers=1), recipe)


def test_vllm_warnings_name_the_layers_marlin_rejects():
    warnings = vllm_shape_warnings(_smollm2_shaped({"format": "int4", "group_size": 32}))
    assert len(warnings) == 3  # one per shape: in_features 576 is no multiple of 128
    text = "\n".join(warnings)
    assert "not 960x576" in text and "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in text
    assert "not 576x576 (" in text and "model.layers.0.self_attn.o_proj" in text
    assert "not 3072x576" in text and "model.layers.0.mlp.{gate_proj,up_proj}" in text
    assert "down_proj" not in text  # 576x1536 fits
    # the FP8 Marlin GEMM also takes (out % 128, in % 64): gate/up (3072x576) fits it
    fp8 = "\n".join(vllm_shape_warnings(_smollm2_shaped({"format": "fp8_e4m3", "granularity": "channel"})))
    assert "960x576" in fp8 and "576x576" in fp8 and "3072x576" not in fp8 and "down_proj" not in fp8


def test_vllm_warnings_for_group_sizes_and_mixed_fused_shards():
    aligned = tiny_model(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    assert vllm_shape_warnings(quantize(aligned, {"format": "int4", "group_size": 32})) == []
    (warning,) = vllm_shape_warnings(quantize(aligned, {"format": "int4", "group_size": 32, "overrides": [
        {"pattern": r"layers\.0\.self_attn\.k_proj$", "format": "int8", "granularity": "channel"}]}))
    assert "model.layers.0.self_attn.q_proj" in warning and "differ" in warning
    (group_16,) = vllm_shape_warnings(quantize(aligned, {"format": "int4", "group_size": 16}))
    assert "not 16: model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in group_16 and "model.layers.1.mlp.down_proj" in group_16


def test_cli_exports_a_run_atomically_and_refuses_an_existing_folder(tmp_path):
    import subprocess
    import sys

    from weightwise.io.folders import save

    run = save(_quantized({"format": "int4", "group_size": 32}), tmp_path / "run", tokenizer=tiny_tokenizer())

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "weightwise.cli", "export", str(run), "--to", "compressed-tensors", *args],
                              capture_output=True, text=True)

    done = cli("-o", str(tmp_path / "ct"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["quantization_status"] == "compressed"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    _assert_same_model(_quantized({"format": "int4", "group_size": 32}), loaded)
    again = cli("-o", str(tmp_path / "ct"))
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error:") and "exists" in again.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ct")]  # no temporary folder left behind
    streamed = cli("--stream", "-o", str(tmp_path / "ct-stream"))
    assert streamed.returncode == 0, streamed.stderr
    assert (tmp_path / "ct-stream" / "model.safetensors.index.json").is_file()
    _assert_same_model(_quantized({"format": "int4", "group_size": 32}),
                       AutoModelForCausalLM.from_pretrained(tmp_path / "ct-stream").eval())


@pytest.mark.parametrize("recipe", [
    {"format": "int4", "group_size": 32},
    {"format": "int4", "group_size": 32, "overrides": [{"pattern": r"self_attn\.", "format": "int8", "granularity": "channel"}],
     "ignore": [r"mlp\.up_proj"]},
], ids=["int4", "mixed-with-float-layer"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_block_by_block_writes_the_tensors_of_the_whole_model_as_shards(tmp_path, recipe, tied):
    from weightwise.export import export_source
    from weightwise.io.folders import save

    ours = _quantized(recipe, tie_word_embeddings=tied)
    run = save(ours, tmp_path / "run", tokenizer=tiny_tokenizer(VOCAB))
    whole = export_source(run, "compressed-tensors", tmp_path / "whole", dtype="bf16")
    streamed = export_source(run, "compressed-tensors", tmp_path / "streamed", dtype="bf16", stream=True)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "streamed").glob("model-*.safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == set(shards)  # two blocks, then the rest
    tensors = {}
    for shard in shards:
        tensors.update(load_file(tmp_path / "streamed" / shard))
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    assert tensors.keys() == expected.keys() == index["weight_map"].keys()
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    assert {k: v for k, v in streamed.items() if k not in ("path", "bytes")} == \
        {k: v for k, v in whole.items() if k not in ("path", "bytes")}
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "whole" / name).read_text()
    loaded = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("whole", "streamed")}
    # the shards and their index load like the one file
    assert torch.equal(_logits(loaded["streamed"]), _logits(loaded["whole"]))


def test_block_by_block_export_refuses_what_it_cannot_write(tmp_path):
    from weightwise.export import export_source
    from weightwise.io.folders import save

    lorc = save(_quantized({"format": "int4", "group_size": 32, "lorc_rank": 2}), tmp_path / "lorc", tokenizer=tiny_tokenizer(VOCAB))
    with pytest.raises(WeightwiseError, match="14 layer.s. have no exact compressed-tensors form"):
        export_source(lorc, "compressed-tensors", tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    tiny_model(vocab_size=VOCAB).save_pretrained(tmp_path / "float")
    with pytest.raises(WeightwiseError, match="writes a quantized run as compressed-tensors; .* is not one"):
        export_source(tmp_path / "float", "compressed-tensors", tmp_path / "out", stream=True)
