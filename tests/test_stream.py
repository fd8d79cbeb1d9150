"""Streamed quantization: a model read block by block from its safetensors gives the in-memory result, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model, tiny_tokenizer
from test_cli import assert_user_error, run_cli
from weightwise.errors import WeightwiseError
from weightwise.io.folders import load_quantized, save
from weightwise.io.lazy import NotStreamable
from weightwise.io.models import load_model, load_skeleton
from weightwise.quantize.api import quantize, quantize_streamed
from weightwise.quantize.calibration import layer_sequential
from weightwise.quantize.stream import StreamedBlocks

TEXT = "some calibration text for the tiny model, streamed or not. " * 40
GPTQ = {"format": "int4", "group_size": 32, "method": "gptq", "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2}}
RECIPES = {"rtn": {"format": "int4", "group_size": 32}, "gptq": GPTQ,
           "awq": {**GPTQ, "format": "int3", "method": "awq"},
           "gptq-all": {**GPTQ, "lorc_rank": 2, "bias_correction": True, "block_tune": {"epochs": 2},
                        "calibration": {**GPTQ["calibration"], "true_sequential": True}}}


@pytest.fixture(params=["bf16", "fp32"])
def source(request, tmp_path):
    """A tiny Llama saved as safetensors in bf16 or fp32, with its tokenizer."""
    path = tmp_path / f"tiny-{request.param}"
    tiny_model(num_hidden_layers=3).to(torch.bfloat16 if request.param == "bf16" else torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_same_tensors(a, b):
    ours, theirs = folder_tensors(a), folder_tensors(b)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def logits(folder) -> torch.Tensor:
    model, _ = load_quantized(folder)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def in_memory(source, recipe, out, dtype="auto"):
    model, tokenizer = load_model(source, dtype=dtype)
    return save(quantize(model, recipe, tokenizer=tokenizer, calibration=TEXT, inplace=True), out, tokenizer=tokenizer)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_run_is_the_in_memory_run_bit_for_bit(source, method, tmp_path):
    recipe = RECIPES[method]
    memory = in_memory(source, recipe, tmp_path / "memory")
    qmodel = quantize_streamed(source, recipe, tmp_path / "streamed", calibration=TEXT)
    streamed = tmp_path / "streamed"
    assert_same_tensors(memory, streamed)  # codes, scales, norms, embeddings: names, dtypes and bits
    assert torch.equal(logits(memory), logits(streamed))
    ours, theirs = (json.loads((folder / "manifest.json").read_text()) for folder in (memory, streamed))
    assert ours["source_fingerprint"] == theirs["source_fingerprint"]
    assert ours["layers"] == theirs["layers"] and ours["calibration"] == theirs["calibration"]
    assert theirs["metrics"]["size"]["bits_per_weight"] == pytest.approx(4.5)
    assert all(p.is_meta for p in qmodel.parameters())  # the returned model holds no tensors
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + 3  # the embeddings and norm, then one shard per block
    assert not (tmp_path / ".streamed.partial").exists()


@pytest.mark.parametrize("method", ["awq", "gptq-all"])
def test_awq_and_every_block_step_stream_too(method, tmp_path):
    """AWQ (norms rescaled), and GPTQ with LoRC, bias correction, true-sequential stages and block tuning."""
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    memory = in_memory(path, RECIPES[method], tmp_path / "memory")
    quantize_streamed(path, RECIPES[method], tmp_path / "streamed", calibration=TEXT)
    assert_same_tensors(memory, tmp_path / "streamed")


def test_calibration_math_is_float32_whatever_the_model_dtype(tmp_path):
    """A bf16 model quantized in memory gives what its float32 copy gives (and keeps its float parts in float32)."""
    source = tmp_path / "tiny"
    tiny_model().to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    assert_same_tensors(in_memory(source, GPTQ, tmp_path / "bf16"), in_memory(source, GPTQ, tmp_path / "fp32", torch.float32))
    assert load_model(source, dtype="auto")[0].dtype == torch.bfloat16
    assert load_model(source)[0].dtype == torch.float32


def test_one_block_is_in_memory_at_a_time(tmp_path):
    path = tmp_path / "tiny"
    tiny_model(num_hidden_layers=3).save_pretrained(path)
    skeleton = load_skeleton(path)
    model = skeleton.model
    blocks = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    by_block = {name: {f"{name}.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
                for name, block in blocks}
    seen = []

    def check(index, name, stats, block_pass):
        seen.append([i for i, layer in enumerate(model.model.layers) if any(not p.is_meta for p in layer.parameters())])
        assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
        assert set(stats) == set(by_block[name]) and all(torch.isfinite(s["hessian"]).all() for s in stats.values())

    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    layer_sequential(model, blocks, by_block, tokens, 2, check, store=StreamedBlocks(model, skeleton.weights))
    assert seen == [[0], [1], [2]]  # neither the other blocks nor the embeddings
    assert all(p.is_meta for p in model.parameters())


def test_a_killed_streamed_run_resumes_with_identical_weights(tmp_path):
    path = tmp_path / "tiny"
    tiny_model(num_hidden_layers=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    quantize_streamed(path, GPTQ, tmp_path / "whole", calibration=TEXT)

    def kill_in_second_block(done, total, name):
        if name.startswith("model.layers.1."):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_streamed(path, GPTQ, tmp_path / "resumed", calibration=TEXT, progress=kill_in_second_block)
    assert (tmp_path / ".resumed.partial" / "block_0000.safetensors").is_file() and not (tmp_path / "resumed").exists()
    qmodel = quantize_streamed(path, GPTQ, tmp_path / "resumed", calibration=TEXT)
    assert_same_tensors(tmp_path / "whole", tmp_path / "resumed")
    from weightwise import quantization_record

    assert quantization_record(qmodel).calibration.resumed_at_block == 1


def test_what_cannot_stream_says_why(tmp_path):
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    for recipe, message in (({"target_bpw": 4.0}, "size target"),
                            ({**GPTQ, "calibration": {"source": "self"}}, "samples text from the whole model"),
                            ({"format": "int8", "targets": ["lm_head"]}, "outside")):
        with pytest.raises(NotStreamable, match=message):
            quantize_streamed(path, recipe, tmp_path / "out")
    run = save(quantize(tiny_model(), {"format": "int8", "group_size": 32}), tmp_path / "run")
    with pytest.raises(NotStreamable, match="quantized-model"):
        quantize_streamed(run, RECIPES["rtn"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_streams_by_default_and_falls_back_or_refuses(capsys, monkeypatch, tiny_dir, tmp_path):
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "-f", "int8", "-g", "32", "-o", tmp_path / "auto")
    assert code == 0, err
    assert (tmp_path / "auto" / "model.safetensors.index.json").is_file() and "layers quantized" in out
    code, _, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "-f", "int8", "-g", "32", "--no-stream", "-o", tmp_path / "whole")
    assert code == 0, err
    assert (tmp_path / "whole" / "model.safetensors").is_file()
    assert_same_tensors(tmp_path / "auto", tmp_path / "whole")
    out = tmp_path / "sized"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--target-bpw", "4", "--stream", "-o", out), "size target", out)


def test_quantize_to_folder_is_the_command_path(tiny_dir, tmp_path):
    """The API behind `weightwise quantize`: streamed when it can be, else in memory, the same tensors either way."""
    from weightwise.quantize.api import quantize_to_folder

    streamed = quantize_to_folder(tiny_dir, {"format": "int8", "group_size": 32}, tmp_path / "auto")
    assert next(streamed.parameters()).is_meta and (tmp_path / "auto" / "model.safetensors.index.json").is_file()
    whole = quantize_to_folder(tiny_dir, {"format": "int8", "group_size": 32}, tmp_path / "whole", stream=False)
    assert not next(whole.parameters()).is_meta and (tmp_path / "whole" / "model.safetensors").is_file()
    assert_same_tensors(tmp_path / "auto", tmp_path / "whole")
    pickled = tmp_path / "pickled"  # weights that are not safetensors: read whole, in memory
    tiny_model().config.save_pretrained(pickled)
    torch.save(tiny_model().state_dict(), pickled / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(pickled)
    quantize_to_folder(pickled, {"format": "int8", "group_size": 32}, tmp_path / "fallback", allow_pickle=True)
    assert_same_tensors(tmp_path / "fallback", tmp_path / "whole")
    with pytest.raises(NotStreamable, match="no safetensors weights"):
        quantize_to_folder(pickled, {"format": "int8", "group_size": 32}, tmp_path / "refused", stream=True, allow_pickle=True)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))


def test_a_damaged_shard_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    run = tmp_path / "run"
    quantize_streamed(path, RECIPES["rtn"], run)
    shard = sorted(run.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(WeightwiseError, match="truncated or corrupt"):
        load_quantized(run)
    shard.unlink()
    with pytest.raises(WeightwiseError, match=f"{shard.name}.* is missing"):
        load_quantized(run)
