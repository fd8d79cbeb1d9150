"""bench/make_llama7b.py on a small shape: the folder loads, holds one shard per block, repeats with its seed, and streams."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightwise.io.models import load_model
from weightwise.quantize.api import quantize_streamed

SMALL = ["--layers", "2", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--vocab", "300"]


@pytest.fixture(scope="module")
def make_llama():
    path = Path(__file__).resolve().parents[1] / "bench" / "make_llama7b.py"
    spec = importlib.util.spec_from_file_location("bench_make_llama7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_defaults_are_llama_2_7b(make_llama):
    config = make_llama.llama_config(32, 4096, 11008, 32, 32000)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (4096, 32, 32, 32, 11008, 32000, False)


def test_a_small_llama_is_written_shard_by_shard_and_streams(make_llama, tmp_path):
    out = tmp_path / "llama"
    make_llama.main(["-o", str(out), *SMALL])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 1 + 2 + 1  # embeddings, one per block, final norm + LM head
    assert {name for name, shard in index["weight_map"].items() if shard == shards[1]} == {
        name for name in index["weight_map"] if name.startswith("model.layers.0.")}
    model, tokenizer = load_model(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.hidden_size == 64 and len(tokenizer) == 300
    assert tokenizer.bos_token_id == 1 and max(tokenizer("def f(x): return x")["input_ids"]) < 300
    q = model.model.layers[1].mlp.down_proj.weight.float()
    assert q.std().item() == pytest.approx(0.02, rel=0.1) and torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))

    again = tmp_path / "again"
    make_llama.main(["-o", str(again), *SMALL])
    for shard in shards:  # the same seed draws the same weights
        ours, theirs = load_file(str(out / shard)), load_file(str(again / shard))
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    quantize_streamed(out, {"format": "int4", "group_size": 32}, tmp_path / "w4")
    assert json.loads((tmp_path / "w4" / "manifest.json").read_text())["metrics"]["size"]["quantized_layers"] == 14
