"""Shared fixtures: tiny random models built from a config (no downloads) and the real default model."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """A byte-level-ish character tokenizer built offline with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + vocab_size - 1)]
    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def bench_module(name: str):
    """bench/<name>.py as a module, loaded once; its sibling scripts importable while it loads, as when it runs."""
    key = f"bench_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the class is built
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    return sys.modules[key]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that llama.cpp and gguf-py read (the character tokenizer above is not byte-level):
    the one the fuzz and crash benchmarks build."""
    return bench_module("fuzz").bpe_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path):
    """A local HF folder (safetensors + config + tokenizer) holding a tiny Llama."""
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default (SmolLM2-135M-Instruct), loaded once per session."""
    from weightwise.io.models import load_model

    return load_model("default")
