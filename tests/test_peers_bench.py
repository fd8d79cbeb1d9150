"""bench/peers.py's own helpers (size accounting, GGUF tensor types, weight swapping, the report); no peer tool needed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize as gguf_quantize
from torch import nn

from weightwise.quantize.calibration import CalibrationConfig


@pytest.fixture(scope="module")
def peers():
    path = Path(__file__).resolve().parents[1] / "bench" / "peers.py"
    spec = importlib.util.spec_from_file_location("bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_peers", None)


def test_gguf_linear_types_counts_stored_bytes_of_block_linears_only(peers, tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    q8 = gguf_quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((2, 64)).astype(np.float32))
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))  # not a block linear
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))  # nor is a norm
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    bpw, used = peers.gguf_linear_types(path)

    # Q8_0: 34 bytes per 32 weights (8.5 bits); F32: 32 bits — weighted by element counts 256 and 128.
    assert bpw == pytest.approx((256 * 8.5 + 128 * 32) / 384)
    assert used == "F32 ffn_down×1; Q8_0 attn_q×1"


def test_with_weights_replaces_only_named_layers_in_a_copy(peers):
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    new = torch.full((3, 4), 0.5, dtype=torch.float16)

    model = peers.with_weights(source, {"0": new})

    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, new.float())
    assert torch.equal(model[1].weight, source[1].weight)
    assert not torch.equal(source[0].weight, model[0].weight)  # the source is untouched
    with pytest.raises(RuntimeError, match="shape"):
        peers.with_weights(source, {"1": new})


def test_tensor_bytes_of_a_plain_tensor(peers):
    assert peers.tensor_bytes(torch.zeros(10, 3, dtype=torch.float16)) == 60
    assert peers.tensor_bytes(nn.Parameter(torch.zeros(5))) == 20


def test_report_marks_tools_that_did_not_run_and_the_gptq_ratio(peers):
    rows = [
        {"model": "smollm2", "tool": "weightwise", "version": "0.1.0", "setting": "int4 g64 GPTQ", "bits_per_weight": 4.25,
         "basis": "real", "ppl": 18.0, "kl_mean": 0.1, "top1_agreement": 0.8, "quantize_seconds": 100.0, "status": "ran",
         "note": ""},
        {"model": "smollm2", "tool": "llm-compressor", "version": "0.14", "setting": "GPTQ W4A16 g64", "bits_per_weight": 4.5,
         "basis": "nominal", "ppl": 19.0, "kl_mean": 0.2, "top1_agreement": 0.7, "quantize_seconds": 250.0, "status": "ran",
         "note": ""},
        {"model": "smollm2", "tool": "torchao", "version": None, "setting": "Int4WeightOnly g64", "status": "did not run",
         "note": "ImportError: Requires mslk"},
    ]
    source = {"ppl": 15.0}

    table = peers.markdown(rows, "smollm2", source)

    assert "| weightwise | 0.1.0 | int4 g64 GPTQ | 4.250 | real | 18.000 | +3.000 | 0.1000 | 0.800 | 100.0 | ran |" in table
    assert "| torchao | not installed | Int4WeightOnly g64 | – |  | – | – | – | – | – | did not run (1) |" in table
    assert "(1) torchao Int4WeightOnly g64: ImportError: Requires mslk" in table
    assert "**2.50×** as fast" in peers.gptq_speed(rows, CalibrationConfig(samples=128, seq_len=512))
    assert peers.gptq_speed(rows[1:], CalibrationConfig()) is None
