"""Every reader of user files, fed mutated inputs (bench/fuzz.py's valid tiny files and mutations, drawn by
hypothesis): each input is read or refused with a one-line WeightwiseError — no other exception, no hang, no
runaway allocation. Inputs declaring absurd sizes are read in a worker process under an address-space limit."""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import bench_module
from test_cli import assert_user_error, run_cli

from weightwise.errors import WeightwiseError

fuzz = bench_module("fuzz")

# Examples per reader: the model readers build (or refuse) a model per input, the others read a few bytes.
EXAMPLES = {"gguf": 30, "hf-folder": 40, "quantized-run": 40, "tune-run": 40}
GROWTH_MB = 1024  # how far one read may raise this process's peak resident memory (the worker test bounds it tighter)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz.build_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


def read_or_refuse(reader, path: Path, cache: Path, what: str) -> None:
    """Read ``path``: success or a one-line WeightwiseError, without raising the process's peak memory by GROWTH_MB
    (ru_maxrss sees torch's allocations too; tracemalloc would not, and slows deep parsers a hundredfold)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with mock.patch.dict(os.environ, {"WEIGHTWISE_CACHE": str(cache)}):
            reader.read(path)
    except WeightwiseError as err:
        assert "\n" not in str(err), f"{reader.name}: {what}: a multi-line message: {err}"
    except Exception as err:  # noqa: BLE001 — any other exception is the failure this test looks for
        pytest.fail(f"{reader.name}: {what} -> {type(err).__name__}: {err}")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # kB on Linux
    assert grown < GROWTH_MB, f"{reader.name}: {what}: peak memory grew by {grown:.0f} MB"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(fuzz.READERS))
def test_mutated_inputs_are_read_or_refused(name, seeds, tmp_path):
    reader = fuzz.READERS[name]

    @settings(max_examples=EXAMPLES.get(name, 75), deadline=20_000, derandomize=True, database=None)
    @given(rng=st.randoms(use_true_random=False))
    def check(rng):
        path, what = fuzz.make_case(reader, rng, seeds, tmp_path / "case")
        read_or_refuse(reader, path, tmp_path / "case" / "cache", what)

    check()


@pytest.mark.timeout(300)
def test_absurd_sizes_are_refused_without_allocating_them(seeds, tmp_path):
    """GGUF counts and lengths of 2^63, safetensors headers and tensors of 2^63 bytes and 1 TB, configs of 2^31
    layers, a 2^30 vocabulary, exponential YAML aliases: read in a worker limited to 3 GB of address space."""
    cases = fuzz.absurd_cases(seeds, tmp_path / "inputs")
    rows = fuzz.run_absurd(cases, seeds, tmp_path / "scratch", mem_mb=3072, case_timeout=60)
    outcomes = {row["case"]: row["outcome"] for row in rows}
    assert set(outcomes) == set(cases)
    assert {label for label, outcome in outcomes.items() if outcome != "refused"} == {"patch: a tensor of 2^62 × 2^62"}
    assert outcomes["patch: a tensor of 2^62 × 2^62"] == "ok"  # a valid patch of a huge tensor: nothing is allocated
    assert all(row["seconds"] < 10 for row in rows), rows


@pytest.mark.parametrize("label, command", [
    ("gguf: an array of 2^32 items", ["quantize", "{input}", "--format", "int4", "-o", "{out}"]),
    ("patch: 2^63 entries", ["patch", "info", "{input}"]),
    ("recipe: exponential YAML aliases", ["quantize", "default", "--config", "{input}", "-o", "{out}"]),
])
def test_the_cli_answers_one_error_line(label, command, seeds, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WEIGHTWISE_CACHE", str(tmp_path / "cache"))
    reader, path = fuzz.absurd_cases(seeds, tmp_path / "inputs")[label]
    out = tmp_path / "out"
    result = run_cli(capsys, monkeypatch, *[part.format(input=path, out=out) for part in command])
    assert_user_error(result, "", out)


def test_a_run_among_its_own_sources_is_refused(seeds, tmp_path):
    """gguf_tokenizer_source follows a run's sources; a cycle used to recurse without end."""
    from weightwise.export import gguf_tokenizer_source

    run = tmp_path / "run"
    shutil.copytree(seeds / "run", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["source"] = {"kind": "quantized-model", "path": str(run)}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightwiseError, match="among its own sources"):
        gguf_tokenizer_source(run)


@pytest.mark.parametrize("line", ['{"text": "a\\ud800b"}', '{"prompt": "\\udfff", "response": "x"}'])
def test_a_lone_surrogate_escape_is_not_text(line, tmp_path):
    from weightwise.data.tasks import load_examples
    from weightwise.select.pool import read_pool

    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(WeightwiseError, match="lone surrogate"):
        load_examples(path)
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"text": "fine"}\n' + line + "\n")
    assert [bad.line for bad in read_pool(pool).bad_lines] == [2]


@pytest.mark.parametrize("name, dtype", [("model.layers.1.self_attn.o_proj.packed_codes", "float8_e4m3fn"),
                                         ("model.layers.0.input_layernorm.weight", "int32")])
def test_a_quantized_run_tensor_in_the_wrong_kind_of_dtype_is_refused(name, dtype, seeds, tmp_path, monkeypatch):
    """Float8 codes used to raise NotImplementedError (no CPU sum in the NaN check), an int32 norm RuntimeError."""
    import safetensors.torch
    import torch
    from safetensors import safe_open

    from weightwise.io.models import load_model

    monkeypatch.setenv("WEIGHTWISE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(seeds / "run", run)
    with safe_open(run / "model.safetensors", framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    tensors[name] = tensors[name].to(getattr(torch, dtype))
    safetensors.torch.save_file(tensors, run / "model.safetensors", metadata=metadata)
    with pytest.raises(WeightwiseError, match="NaN/Inf|stored as"):
        load_model(run)

