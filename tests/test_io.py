"""weightwise.io: atomic artifacts, manifests, hashes and loading models from every kind of source."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_model
from weightwise.errors import WeightwiseError
from weightwise.io import (
    atomic_output_dir,
    cache_dir,
    default_gguf_path,
    environment_versions,
    file_sha256,
    load_model,
    load_tokenizer,
    model_source_info,
    output_lock,
    read_manifest,
    state_dict_fingerprint,
    write_json_atomic,
    write_manifest,
)
from weightwise.io.artifacts import canonical_safetensors
from weightwise.io.folders import save
from weightwise.tune.patch import WeightPatch

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTWISE_CACHE", str(tmp_path / "cache"))


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    folder = tmp_path / "tiny"
    _tiny_model().save_pretrained(folder)
    return folder


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _write_tiny_gguf(path, arch: str = "llama") -> None:
    """A 2-layer llama GGUF (f32 tensors, byte-level BPE tokenizer) of about 110 kB."""
    hidden, inter, heads, kv, layers = 32, 64, 4, 2, 2
    tokens = ["<s>", "</s>", *_byte_tokens(), "he"]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head_dim = hidden // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        add(f"blk.{i}.attn_k.weight", kv * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- artifacts ----------------------------------------------------------------------------------


def test_atomic_dir_failure_leaves_no_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_saved_folder_is_readable_as_any_new_file(tmp_path):
    """safetensors writes its files 0600; a saved folder's files get the usual mode under the process's umask."""
    (tmp_path / "probe").touch()
    usual = (tmp_path / "probe").stat().st_mode & 0o777
    run = save(tiny_model(), tmp_path / "run")
    with atomic_output_dir(tmp_path / "other") as tmp:
        safetensors.torch.save_file({"a": torch.zeros(2)}, str(tmp / "x.safetensors"))
        assert (tmp / "x.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does by itself
    for path in [*run.iterdir(), tmp_path / "other" / "x.safetensors"]:
        assert path.stat().st_mode & 0o777 == usual, path


def test_atomic_dir_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_success_replaces_previous(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_output_dir(target) as tmp:
        assert not target.joinpath("new.txt").exists()  # invisible until the block ends
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_safetensors_files_are_the_same_bytes_every_time(tmp_path):
    """safetensors writes its metadata map in a random order; weightwise's files sort it, so a rerun's are identical."""
    tensors = {"b": torch.ones(3), "a": torch.arange(4)}
    metadata = {f"key {i}": f"value \"{i}\"\n é" for i in range(12)}
    saved = {canonical_safetensors(safetensors.torch.save(tensors, metadata=metadata)) for _ in range(8)}
    assert len(saved) == 1
    (tmp_path / "t.safetensors").write_bytes(saved.pop())
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("a"), tensors["a"])

    model = tiny_model()  # tied embeddings: save_model adds a second metadata key
    for i in range(4):
        save(model, tmp_path / f"m{i}")
    assert len({(tmp_path / f"m{i}" / "model.safetensors").read_bytes() for i in range(4)}) == 1
    tuned = {name: t + 1e-3 for name, t in model.state_dict().items() if name.endswith("proj.weight")}
    patch = WeightPatch.from_models({name: model.state_dict()[name] for name in tuned}, tuned, {"base_model_hash": "x"})
    assert len({patch.to_bytes("fp32") for _ in range(4)}) == 1


def test_temporaries_of_killed_writers_are_removed_when_the_output_is_next_written(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, out = gone.pid, tmp_path / "out"
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}" / "half").write_text("half")
    (tmp_path / f".out.old-{dead}").mkdir()  # killed between moving the old output aside and renaming the new one
    (tmp_path / f".out.old-{dead}" / "marker").write_text("old")
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a live process's: not ours to delete
    alive.mkdir()
    (tmp_path / f".m.gguf.tmp-{dead}").write_bytes(b"GGUF, cut short")
    with output_lock(out):
        pass
    assert (out / "marker").read_text() == "old"  # the moved-aside output is back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".m.gguf.tmp-{dead}", alive.name, "out"])
    with output_lock(tmp_path / "m.gguf"):
        pass
    assert not (tmp_path / f".m.gguf.tmp-{dead}").exists()
    (tmp_path / f".out.old-{dead}").mkdir()  # with the output in place, a moved-aside one is only deleted
    with atomic_output_dir(out) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and not (tmp_path / f".out.old-{dead}").exists()
    assert alive.is_dir()


def test_manifest_roundtrip_and_errors(tmp_path):
    write_manifest(tmp_path, "quantized-model", recipe={"format": "int4"}, source={"path": tmp_path}, metrics={})
    manifest = read_manifest(tmp_path)
    assert manifest["kind"] == "quantized-model"
    assert manifest["recipe"] == {"format": "int4"} and manifest["source"] == {"path": str(tmp_path)}
    assert manifest["created"].endswith("+00:00")
    expected = {"python", "torch", "transformers", "safetensors", "gguf", "weightwise", "platform"}
    assert expected <= set(manifest["versions"])
    assert environment_versions()["torch"] == manifest["versions"]["torch"]
    (tmp_path / "manifest.json").write_text('{"kind": "quan')
    with pytest.raises(WeightwiseError, match="corrupt"):
        read_manifest(tmp_path)
    with pytest.raises(WeightwiseError, match="no manifest.json"):
        read_manifest(tmp_path / "elsewhere")


def test_write_json_atomic_and_file_sha256(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "x.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    (tmp_path / "b").write_bytes(b"abc")
    assert file_sha256(tmp_path / "b", chunk=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cache_dir_reads_env_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTWISE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("WEIGHTWISE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "weightwise"


def test_fingerprint_stable_and_sensitive():
    model = _tiny_model()
    fp = state_dict_fingerprint(model)
    assert fp == state_dict_fingerprint(_tiny_model()) == state_dict_fingerprint(model.state_dict())
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert state_dict_fingerprint(model) != fp


def test_fingerprint_counts_shared_tensors_once():
    w = torch.randn(4, 3)
    tied = state_dict_fingerprint({"a": w, "b": w})
    assert tied == state_dict_fingerprint({"a": w, "b": w.view(4, 3)})
    assert tied != state_dict_fingerprint({"a": w, "b": w.clone()})


# --- loading from folders -----------------------------------------------------------------------


def test_safetensors_folder_loads(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    assert tokenizer is None  # the folder has no tokenizer files
    assert not model.training and model.dtype == torch.float32
    assert _same_weights(model, _tiny_model())
    info = model_source_info(tiny_dir)
    assert info["kind"] == "folder" and len(info["sha256"]) == 64


def test_folder_with_tokenizer(tiny_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tiny_dir)
    _, tokenizer = load_model(tiny_dir)
    assert tokenizer("a b a")["input_ids"] == [1, 2, 1]
    assert load_tokenizer(tiny_dir)("b")["input_ids"] == [2]
    text = (tiny_dir / "tokenizer.json").read_text()
    (tiny_dir / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(WeightwiseError, match="tokenizer.json' is truncated or corrupt"):
        load_model(tiny_dir)


def test_pickle_folder_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pickled"
    model = _tiny_model()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(WeightwiseError, match="allow_pickle=True"):
        load_model(folder)
    loaded, _ = load_model(folder, allow_pickle=True)
    assert _same_weights(loaded, model)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    folder = tmp_path / "evil"
    _tiny_model().config.save_pretrained(folder)
    torch.save({"x": Fraction(1, 3)}, folder / "pytorch_model.bin")  # not a tensor type
    with pytest.raises(WeightwiseError, match="beyond tensors"):
        load_model(folder, allow_pickle=True)


def test_truncated_safetensors(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(WeightwiseError, match="model.safetensors' is truncated or corrupt"):
        load_model(tiny_dir)


def test_invalid_config_json(tiny_dir):
    (tiny_dir / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(WeightwiseError, match="config.json' is truncated or corrupt"):
        load_model(tiny_dir)


def test_unknown_model_type(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "wobble"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightwiseError, match="architecture 'wobble'"):
        load_model(tiny_dir)


def test_config_that_matches_no_weights(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightwiseError, match="lacks most weights"):
        load_model(tiny_dir)


def test_nan_weights(tmp_path):
    model = _tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(WeightwiseError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*NaN/Inf"):
        load_model(tmp_path / "nan")


def test_missing_paths_and_unknown_hub_id(tmp_path):
    for missing in (tmp_path / "nope", str(tmp_path / "nope.gguf"), "model.safetensors", "./runs/x"):
        with pytest.raises(WeightwiseError, match="file not found"):
            load_model(missing)
    with pytest.raises(WeightwiseError, match="not a local folder, a .gguf file or a hub id in the local Hugging Face"):
        load_model("weightwise-tests/no-such-model")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    _tiny_model().save_pretrained(repo / "snapshots" / "abc123")
    model, _ = load_model("org/tiny")
    assert _same_weights(model, _tiny_model())
    assert model_source_info("org/tiny")["kind"] == "hub"


# --- loading GGUF -------------------------------------------------------------------------------


def test_gguf_loads_and_is_cached(tmp_path, caplog):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    with caplog.at_level(logging.INFO, logger="weightwise.io.models"):
        first, tokenizer = load_model(path)
        assert "converting" in caplog.text
        caplog.clear()
        second, tokenizer2 = load_model(path)
        assert "converting" not in caplog.text
    sha = file_sha256(path)
    folder = cache_dir() / "gguf" / sha
    assert json.loads((folder / "source.json").read_text())["sha256"] == sha
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert _same_weights(first, second) and first.config.tie_word_embeddings
    assert tokenizer("hello")["input_ids"] == tokenizer2("hello")["input_ids"] == [258, 110, 110, 113]
    assert model_source_info(path) == {"kind": "gguf", "source": str(path), "path": str(path), "sha256": sha}


def test_truncated_default_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as f:
        path.write_bytes(f.read(1000))
    with pytest.raises(WeightwiseError, match="cut.gguf' is truncated or corrupt"):
        load_model(path)
    assert not (cache_dir() / "gguf" / file_sha256(path)).exists()


def test_truncated_gguf_tensor_data(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(WeightwiseError, match="truncated or corrupt"):
        load_model(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "foo.gguf"
    _write_tiny_gguf(path, arch="wobble")
    with pytest.raises(WeightwiseError, match="architecture 'wobble'"):
        load_model(path)


@pytest.mark.slow
def test_default_model_end_to_end():
    start = time.perf_counter()
    first, tokenizer = load_model("default")
    first_s = time.perf_counter() - start
    config = first.config
    assert (config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)
    assert first.lm_head.weight is first.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = first(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()
    start = time.perf_counter()
    second, _ = load_model("default")
    second_s = time.perf_counter() - start
    assert second_s < first_s
    assert _same_weights(first, second)
    assert os.listdir(cache_dir() / "gguf")


@pytest.mark.slow
def test_the_default_gguf_is_converted_tensor_by_tensor_like_transformers_loads_it(tmp_path, monkeypatch, caplog):
    """The real default file (llama architecture, Q4_1/Q6_K tensors, tied output): the streamed conversion gives
    transformers' own tensors, bit for bit."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("WEIGHTWISE_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="weightwise.io.models"):
        ours, _ = load_model("default")
    assert "converted tensor by tensor" in caplog.text
    path = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = ours.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name], value), name


def test_quantized_model_folder_goes_to_load_quantized(tmp_path, monkeypatch):
    import weightwise.io.models as models

    calls = []

    def load_quantized(path):
        calls.append(path)
        return _tiny_model().train(), "tokenizer"

    monkeypatch.setattr(models, "load_quantized", load_quantized)
    write_manifest(tmp_path, "quantized-model", recipe={})
    model, tokenizer = load_model(tmp_path)
    assert calls == [tmp_path] and tokenizer == "tokenizer" and not model.training
