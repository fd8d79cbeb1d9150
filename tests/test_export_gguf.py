"""GGUF export: exact packing read back by gguf-py, transformers and (when installed) llama.cpp; errors and atomicity."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import bpe_tokenizer, tiny_model
from weightwise.errors import WeightwiseError
from weightwise.export import export
from weightwise.export.gguf import GGUFExportConfig, export_gguf
from weightwise.quantize import quantize

EXACT_RECIPES = {
    "Q4_0": {"format": "int4", "group_size": 32},
    "Q4_1": {"format": "int4_asym", "group_size": 64},
    "Q5_0": {"format": "int5", "group_size": 32},
    "Q5_1": {"format": "int5_asym", "group_size": 32},
    "Q8_0": {"format": "int8", "granularity": "channel"},
    "IQ4_NL": {"format": "iq4_nl", "group_size": 32},
    "MXFP4": {"format": "mxfp4"},
}


TOKENIZER = bpe_tokenizer()


def llama(**overrides):
    return tiny_model(**{"vocab_size": len(TOKENIZER), "intermediate_size": 128, **overrides})


def qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("ggml_type", list(EXACT_RECIPES))
def test_every_quantized_layer_is_stored_exactly(tmp_path, ggml_type):
    qmodel = quantize(llama(), EXACT_RECIPES[ggml_type])
    report = export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf")
    linears = [t for t in report.tensors if t.how == "exact"]
    assert len(linears) == 14 and {t.type for t in linears} == {ggml_type}
    assert all(t.max_abs_diff == 0 for t in linears)
    assert {t.type for t in report.tensors if t.how == "converted"} == {"F32", "F16"}  # norms; embeddings (f16 default)
    sidecar = json.loads((tmp_path / "m.gguf.json").read_text())
    assert sidecar["recipe"]["format"] == EXACT_RECIPES[ggml_type]["format"] and sidecar["versions"]["gguf"]


def test_transformers_reads_the_file_back_to_the_same_model(tmp_path):
    """transformers' GGUF loader undoes llama.cpp's Q/K permutation: same logits means rows and scales moved together."""
    qmodel = quantize(llama(), {"format": "int4_asym", "group_size": 32})
    export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", GGUFExportConfig(embeddings="f32"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qmodel(ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen2_biases_and_untied_output_are_exported(tmp_path):
    qmodel = quantize(qwen2(), {"format": "int4", "group_size": 32})
    report = export_gguf(qmodel, TOKENIZER, tmp_path / "q.gguf", GGUFExportConfig(embeddings="q8_0"))
    names = {t.gguf_name: t for t in report.tensors}
    assert "blk.0.attn_q.bias" in names and names["output.weight"].type == "Q8_0"
    assert all(t.max_abs_diff == 0 for t in report.tensors if t.how == "exact")
    assert names["output.weight"].max_abs_diff > 0  # llama.cpp's Q8_0 rounding of a float matrix, reported


@pytest.mark.parametrize("kind", ["q5_0", "q4_0", "iq4_nl"])
def test_embeddings_in_a_smaller_block_type_are_rounded_to_nearest_and_read_back(tmp_path, kind):
    """Block-type embeddings (to fit a file-size budget): weightwise's round-to-nearest grid, which gguf-py
    dequantizes to the values the report measured against the float embeddings."""
    import gguf

    from weightwise.export.gguf import NATIVE_SPECS
    from weightwise.formats.quantizer import dequantize, quantize_tensor

    qmodel = quantize(llama(), {"format": "int4", "group_size": 32})
    report = export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", GGUFExportConfig(embeddings=kind))
    embd = next(t for t in report.tensors if t.gguf_name == "token_embd.weight")
    assert embd.type == kind.upper() and embd.how == "requantized" and embd.max_abs_diff > 0
    float_embd = qmodel.model.embed_tokens.weight.detach()
    stored = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "token_embd.weight")
    read = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy()).reshape(float_embd.shape)
    expected = dequantize(quantize_tensor(float_embd, NATIVE_SPECS[kind], "embed_tokens"))
    torch.testing.assert_close(read, expected, rtol=0, atol=1e-6)
    assert (read - float_embd).abs().max().item() == pytest.approx(embd.max_abs_diff, rel=1e-5)


def test_float_model_to_a_block_type_and_to_f32(tmp_path):
    model = llama()
    exact = export_gguf(model, TOKENIZER, tmp_path / "f32.gguf", GGUFExportConfig(embeddings="f32"))
    assert {t.type for t in exact.tensors} == {"F32"} and all(t.max_abs_diff == 0 for t in exact.tensors)
    q40 = export_gguf(model, TOKENIZER, tmp_path / "q40.gguf", GGUFExportConfig(type="q4_0"))
    requantized = [t for t in q40.tensors if t.how == "requantized"]
    assert len(requantized) == 14 and {t.type for t in requantized} == {"Q4_0"}
    assert 0 < max(t.max_abs_diff for t in requantized) < 0.05


def test_a_layer_without_an_exact_type_is_an_error_unless_a_fallback_is_chosen(tmp_path):
    qmodel = quantize(llama(), {"format": "int4", "group_size": 32, "overrides": [{"pattern": "down_proj", "format": "nf4"}]})
    with pytest.raises(WeightwiseError, match=r"2 layers have no exact GGUF type .*nf4.*model\.layers\.0\.mlp\.down_proj.*fallback"):
        export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    report = export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", GGUFExportConfig(fallback="q8_0"))
    assert report.fallback_layers == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    fallback = [t for t in report.tensors if t.how == "fallback"]
    assert {t.type for t in fallback} == {"Q8_0"} and all(t.max_abs_diff > 0 for t in fallback)
    with pytest.raises(WeightwiseError, match="Q4_0.*maps to|no exact GGUF type q8_0"):
        export_gguf(quantize(llama(), EXACT_RECIPES["Q4_0"]), TOKENIZER, tmp_path / "q8.gguf", GGUFExportConfig(type="q8_0"))


def test_lorc_act_formats_and_odd_groups_have_no_exact_type(tmp_path):
    for recipe, why in [({"format": "int4", "group_size": 32, "lorc_rank": 2}, "LoRC"),
                        ({"format": "int4", "group_size": 16}, "16"),
                        ({"format": "int4", "group_size": 32, "act_format": "int8"}, "activation format")]:
        with pytest.raises(WeightwiseError, match=why):
            export_gguf(quantize(llama(), recipe), TOKENIZER, tmp_path / "m.gguf")


def test_a_tokenizer_shorter_than_the_embeddings_is_padded_with_unused_tokens(tmp_path):
    """One token per embedding row, as llama.cpp requires (its converter pads the same way)."""
    import gguf

    qmodel = quantize(llama(vocab_size=len(TOKENIZER) + 5), EXACT_RECIPES["Q4_0"])
    export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"]
    kinds = fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == len(TOKENIZER) + 5
    assert [tokens.contents(i) for i in (-2, -1)] == [f"[PAD{len(TOKENIZER) + 3}]", f"[PAD{len(TOKENIZER) + 4}]"]
    assert kinds.contents()[-5:] == [gguf.TokenType.UNUSED] * 5
    with pytest.raises(WeightwiseError, match="more than the model's"):
        export_gguf(quantize(llama(vocab_size=len(TOKENIZER) - 1), EXACT_RECIPES["Q4_0"]), TOKENIZER, tmp_path / "s.gguf")


def test_existing_output_unsupported_architecture_and_missing_tokenizer(tmp_path):
    qmodel = quantize(llama(), EXACT_RECIPES["Q4_0"])
    (tmp_path / "m.gguf").write_bytes(b"keep me")
    with pytest.raises(WeightwiseError, match="exists"):
        export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"keep me"
    export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", overwrite=True)
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(WeightwiseError, match="architecture 'gpt2' has no GGUF exporter"):
        export_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), TOKENIZER, tmp_path / "g.gguf")
    with pytest.raises(WeightwiseError, match="no tokenizer"):
        export_gguf(qmodel, None, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()


def test_a_killed_exports_temporaries_are_removed_by_the_next_export(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (f".m.gguf.tmp-{gone.pid}", f".m.gguf.json.tmp-{gone.pid}"):  # the file and its report, cut short
        (tmp_path / name).write_bytes(b"cut short")
    export_gguf(quantize(llama(), EXACT_RECIPES["Q4_0"]), TOKENIZER, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.json"]


@pytest.mark.parametrize("case", ["int4-tied", "mixed-untied-fallback", "qwen2-biases", "float-folder"])
def test_block_by_block_export_writes_the_same_file_as_in_memory(tmp_path, case):
    """``stream``: the run (or model folder) is read one part at a time; the file is byte for byte the in-memory one."""
    from weightwise.export import export_source
    from weightwise.io.folders import save

    options = {}
    if case == "float-folder":
        model = llama(tie_word_embeddings=False)
        model.save_pretrained(tmp_path / "run")
        TOKENIZER.save_pretrained(tmp_path / "run")
        source, options = tmp_path / "run", {"gguf": GGUFExportConfig(type="q8_0")}
    else:
        if case == "int4-tied":
            qmodel = quantize(llama(), {"format": "int4", "group_size": 32})
        elif case == "qwen2-biases":
            qmodel = quantize(qwen2(), {"format": "int4_asym", "group_size": 32})
            options = {"gguf": GGUFExportConfig(embeddings="q4_0")}
        else:
            qmodel = quantize(llama(tie_word_embeddings=False), {
                "format": "int4", "group_size": 32, "ignore": [r"mlp\.up_proj"],
                "overrides": [{"pattern": "down_proj", "format": "nf4"}]})
            options = {"gguf": GGUFExportConfig(fallback="q8_0")}
        source = save(qmodel, tmp_path / "run", tokenizer=TOKENIZER)
    whole = export_source(source, "gguf", tmp_path / "whole.gguf", **options)
    streamed = export_source(source, "gguf", tmp_path / "streamed.gguf", stream=True, **options)
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert {k: v for k, v in streamed.items() if k != "path"} == {k: v for k, v in whole.items() if k != "path"}
    assert any(t["how"] != "exact" for t in streamed["tensors"])  # float parts compared after being read again
    if case == "mixed-untied-fallback":
        assert len(streamed["fallback_layers"]) == 2


def test_block_by_block_gguf_export_refuses_inexact_layers_before_writing(tmp_path):
    from weightwise.export import export_source
    from weightwise.io.folders import save

    run = save(quantize(llama(), {"format": "int4", "group_size": 32, "lorc_rank": 2}), tmp_path / "run", tokenizer=TOKENIZER)
    with pytest.raises(WeightwiseError, match="14 layers have no exact GGUF type .LoRC"):
        export_source(run, "gguf", tmp_path / "out.gguf", stream=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(WeightwiseError, match="export hf with the model in memory"):
        export_source(run, "hf", tmp_path / "out", stream=True)


def test_dense_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    qmodel = quantize(llama(), {"format": "int3", "group_size": 32, "lorc_rank": 2})
    export(qmodel, TOKENIZER, "hf", tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qmodel(ids).logits)
    assert json.loads((tmp_path / "dense" / "manifest.json").read_text())["formats"] == "int3 g32 + lorc2"
    with pytest.raises(WeightwiseError, match="exists"):
        export(qmodel, TOKENIZER, "hf", tmp_path / "dense")


def test_cli_exports_a_run_and_refuses_bad_options(tmp_path):
    qmodel = quantize(llama(), EXACT_RECIPES["Q5_0"])
    from weightwise.io.folders import save

    run = save(qmodel, tmp_path / "run", tokenizer=TOKENIZER)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "weightwise.cli", "export", *map(str, args)], capture_output=True, text=True)

    done = cli(run, "-o", tmp_path / "m.gguf")
    assert done.returncode == 0, done.stderr
    assert "Q5_0" in done.stdout and (tmp_path / "m.gguf").is_file()
    for args, message in [((run, "-o", tmp_path / "m.gguf"), "exists"),
                          ((run, "--to", "onnx", "-o", tmp_path / "x"), "--to onnx"),
                          ((run, "--type", "q3_k", "-o", tmp_path / "y.gguf"), "type"),
                          ((run, "--to", "hf", "--fallback", "q8_0", "-o", tmp_path / "z"), "--fallback apply to --to gguf only")]:
        failed = cli(*args)
        assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].startswith("error:") and message in failed.stderr


def test_llama_cpp_runs_the_exported_file(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the [peers] extra)")
    qmodel = quantize(llama(), EXACT_RECIPES["Q4_0"])
    export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", GGUFExportConfig(embeddings="f32"))
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    text = "hello world, hello llama"
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        expected = qmodel(torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[: len(ids)])
    # llama.cpp quantizes activations to 8 bits for Q4_0 matmuls on CPU: close, not equal
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_planner_budgets_gguf_file_bits_and_the_plan_exports_exactly(tmp_path):
    """plan_storage 'gguf': candidates cost their GGUF type's bits (int3 costs Q4_0's 4.5), nf4 has none and is skipped."""
    from gguf import GGUFReader

    from weightwise.quantize import quantization_record

    candidates = [{"format": "mxfp4"}, {"format": "int3", "group_size": 32}, {"format": "nf4", "group_size": 32},
                  {"format": "int5", "group_size": 32}, {"format": "int8", "group_size": 32}]
    calib = torch.randint(0, len(TOKENIZER), (4, 32), generator=torch.Generator().manual_seed(0))
    qmodel = quantize(llama(), {"target_bpw": 5.0, "plan_storage": "gguf", "candidates": candidates,
                                "calibration": {"samples": 4, "seq_len": 32}}, calibration=calib)
    plan = quantization_record(qmodel).plan
    assert plan.total_bits <= plan.budget_bits and not any(c.choice.startswith("nf4") for c in plan.choices.values())
    assert {c.bits for c in plan.choices.values() if c.choice.startswith("int3")} <= {4.5 * 64 * 64, 4.5 * 32 * 64}
    report = export_gguf(qmodel, TOKENIZER, tmp_path / "plan.gguf")
    assert len({t.type for t in report.tensors if t.how == "exact"}) > 1  # several GGUF types in one file
    linears = [t for t in GGUFReader(tmp_path / "plan.gguf").tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert sum(int(t.n_bytes) for t in linears) * 8 == plan.total_bits


def _family_model(model_type: str):
    from transformers import AutoConfig

    torch.manual_seed(0)
    fields = dict(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=model_type != "mistral")
    if model_type == "qwen3":
        fields["head_dim"] = 16
    if model_type.startswith("gemma"):  # queries scaled by 1/√256 (query_pre_attn_scalar), as llama.cpp scales by 1/√head_dim
        fields.update(head_dim=256, sliding_window=8)  # a window shorter than the test's 37 tokens: it must matter
    if model_type == "gemma2":  # strong soft-capping, so that a file without it would not match
        fields.update(attn_logit_softcapping=5.0, final_logit_softcapping=2.0)
    if model_type == "phi3":  # fused qkv_proj and gate_up_proj
        fields.update(num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).eval()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_every_supported_family_reloads_through_transformers_and_llama_cpp(tmp_path, model_type):
    qmodel = quantize(_family_model(model_type), {"format": "int4", "group_size": 32})
    report = export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", GGUFExportConfig(embeddings="f32"))
    assert all(t.max_abs_diff == 0 for t in report.tensors if t.how == "exact")
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        expected = qmodel(ids).logits
    # transformers' GGUF loader: qwen3's key_length ignored; phi3 pad id defaults to 32000; gemma2 soft-capping not read
    if model_type not in ("qwen3", "phi3", "gemma2"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the [gguf-check] extra)")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[: ids.shape[1]])
    assert (got.argmax(-1) == expected[0].numpy().argmax(-1)).mean() > 0.9
    assert np.abs(got - expected[0].numpy()).max() < 0.05 * np.abs(expected[0].numpy()).max()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_a_gguf_source_is_read_tensor_by_tensor_into_what_transformers_loads(tmp_path, monkeypatch, model_type):
    """The GGUF cache is written one shard at a time (here 64 KiB, so several): the inverse of the exporter (Q/K rows,
    Gemma's norms), equal tensor for tensor to transformers' whole-file load."""
    from weightwise.io import gguf_read
    from weightwise.io.models import load_model, load_skeleton

    monkeypatch.setenv("WEIGHTWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_read, "SHARD_BYTES", 1 << 16)
    qmodel = quantize(_family_model(model_type), {"format": "int4", "group_size": 32})
    export_gguf(qmodel, TOKENIZER, tmp_path / "m.gguf", GGUFExportConfig(embeddings="q8_0"))
    model, tokenizer = load_model(tmp_path / "m.gguf")
    (cache,) = (tmp_path / "cache" / "gguf").glob("*/model.safetensors.index.json")
    assert len(set(json.loads(cache.read_text())["weight_map"].values())) > 2
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = model.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], value), name
    assert tokenizer("hello").input_ids == TOKENIZER("hello").input_ids
    skeleton = load_skeleton(tmp_path / "m.gguf")  # the streamed loaders read the same cache
    assert skeleton.model.config.model_type == model.config.model_type and len(skeleton.weights.files) == len(ours) - (
        model.config.tie_word_embeddings and "lm_head.weight" in ours)


@pytest.mark.parametrize("change, message", [
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    ({"layer_types": ["full_attention", "full_attention"]}, "llama.cpp's fixed pattern"),
    ({"final_logit_softcapping": 30.0}, "soft-capping"),
])
def test_a_gemma3_config_llama_cpp_would_run_differently_is_refused(tmp_path, change, message):
    model = _family_model("gemma3_text")
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(WeightwiseError, match=message):
        export_gguf(model, TOKENIZER, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
