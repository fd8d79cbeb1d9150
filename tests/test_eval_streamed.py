"""Evaluation block by block (`weightwise eval --stream`, StreamedModel): the figures of the model in memory, for
float folders (bf16 and fp32) and quantized runs (sharded by streamed quantization, or one file), as candidate and
as reference, without ever loading the whole model."""

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from test_cli import run_cli
from weightwise.evaluate import StreamedModel, evaluate, reference_outputs, token_windows
from weightwise.io.folders import save
from weightwise.io.models import load_model
from weightwise.quantize import quantize
from weightwise.quantize.api import quantize_streamed

TEXT = "the tiny llama reads this text block by block, window after window, and scores it. " * 12
SETTINGS = {"text": TEXT, "window": 32, "batch_size": 3, "measure_speed": False}
FIGURES = ("mean_nll", "reference_ppl", "kl_mean", "top1_agreement", "n_tokens_scored", "n_windows", "total_bytes",
           "bits_per_weight", "linear_params", "quantized_layers")


@pytest.fixture
def folders(tmp_path):
    """A bf16 Hugging Face folder, a streamed (sharded) GPTQ run of it and an in-memory RTN run (one file)."""
    source = tmp_path / "bf16"
    tiny_model(num_hidden_layers=3).to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    gptq = {"format": "int4", "group_size": 32, "method": "gptq", "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2}}
    quantize_streamed(source, gptq, tmp_path / "gptq", calibration=TEXT)
    model, tokenizer = load_model(source, dtype="auto")
    save(quantize(model, {"format": "int3", "group_size": 16, "lorc_rank": 2}), tmp_path / "rtn", tokenizer=tokenizer)
    return {name: tmp_path / name for name in ("bf16", "gptq", "rtn")}


def _in_memory(source, reference=None):
    model, tokenizer = load_model(source)
    ref = None  # the reference's outputs kept (float16 log-probs), as `weightwise eval` and the streamed path keep them
    if reference is not None:
        ref = reference_outputs(load_model(reference)[0], token_windows(tokenizer, TEXT, window=32), batch_size=3)
    return evaluate(model, tokenizer, reference=ref, **SETTINGS)


def _streamed(source, reference=None):
    streamed = StreamedModel.open(str(source))
    ref = None if reference is None else StreamedModel.open(str(reference))
    return evaluate(streamed, streamed.skeleton.tokenizer, reference=ref, **SETTINGS)


@pytest.mark.parametrize("name", ["bf16", "gptq", "rtn"])
def test_block_by_block_gives_the_in_memory_figures(folders, name):
    reference = None if name == "bf16" else folders["bf16"]
    whole, streamed = _in_memory(folders[name], reference), _streamed(folders[name], reference)
    for field in FIGURES:
        ours, theirs = getattr(streamed, field), getattr(whole, field)
        assert ours == (None if theirs is None else pytest.approx(theirs, rel=1e-5, abs=1e-7)), (field, ours, theirs)
    assert streamed.n_windows > 3 and streamed.tokens_per_second is None  # several batches; speed needs the model in memory
    if name != "bf16":
        assert streamed.kl_mean > 0 and streamed.quantized_layers == 21


def test_a_streamed_model_is_never_materialized_whole(folders):
    streamed = StreamedModel.open(str(folders["gptq"]))
    windows = torch.randint(1, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = list(streamed.batch_logits(windows, 3))
    assert [b.shape for b in batches] == [(3, 16, 96), (1, 16, 96)]
    tensors = [*streamed.model.parameters(), *streamed.model.buffers(recurse=True)]
    assert all(t.is_meta for t in tensors if t.is_floating_point() and t.dim() > 1)  # every block emptied again


def test_cli_eval_stream_writes_the_report(capsys, monkeypatch, folders, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, monkeypatch, "eval", folders["gptq"], "--reference", folders["bf16"], "--stream",
                                "--text", text, "--window", "32", "-o", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["stream"] is True
    row = next(r for r in metrics["runs"] if r["name"] == str(folders["gptq"]))
    assert row["kl_mean"] > 0 and row["tokens_per_second"] is None and row["format"] == "int4 g32"
