"""The demo API: RTN and GPTQ rows in one harness, and the best exactly-stored row exported to GGUF from the
model that was measured."""

import json

import pytest

import weightwise.compare
from conftest import bpe_tokenizer
from test_export_gguf import llama
from weightwise.demo import DEMO_CALIBRATION, DEMO_FORMATS, run_demo, short_recipe
from weightwise.errors import WeightwiseError
from weightwise.evaluate.config import EvalConfig


@pytest.fixture
def setup(tmp_path):
    """A tiny llama folder with a byte-level BPE tokenizer (exportable to GGUF), eval settings and calibration."""
    model_dir = tmp_path / "tiny"
    llama().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text("hello world, the llama said hello to the other llama. " * 60)
    config = EvalConfig(text=str(text), window=32, max_tokens=128, measure_speed=False)
    return model_dir, config, {"source": str(text), "samples": 4, "seq_len": 32}


def test_the_best_exact_row_is_exported_without_quantizing_again(setup, tmp_path, monkeypatch):
    model_dir, config, calibration = setup
    calls = []
    quantize = weightwise.compare.quantize
    monkeypatch.setattr(weightwise.compare, "quantize", lambda *a, **k: calls.append(1) or quantize(*a, **k))
    recipes = [short_recipe("int4:32"), short_recipe("int4:32:gptq", calibration), short_recipe("nf4:32")]
    out = tmp_path / "demo"
    events = []
    result = run_demo(out, source=str(model_dir), recipes=recipes, config=config, on_event=events.append)
    assert len(calls) == 3  # one quantization per recipe: the export reuses the measured model
    assert [r["name"] for r in result.rows] == ["source fp32", "int4 g32 rtn", "int4 g32 gptq", "nf4 g32 rtn"]
    assert result.exact_gguf == {"int4 g32 rtn": ["Q4_0"], "int4 g32 gptq": ["Q4_0"], "nf4 g32 rtn": []}
    best = min(result.rows[1:3], key=lambda r: r["ppl"])
    assert result.choice.name == best["name"] and result.choice.gguf_types == ["Q4_0"]
    assert result.export.path == str(out / "model.gguf") and (out / "model.gguf").stat().st_size == result.export.file_bytes
    linears = [t for t in result.export.tensors if t.how == "exact"]
    assert len(linears) == 14 and all(t.type == "Q4_0" and t.max_abs_diff == 0 for t in linears)
    assert {t.type for t in result.export.tensors if "token_embd" in t.gguf_name} == {"Q8_0"}
    sidecar = json.loads((out / "model.gguf.json").read_text())
    assert sidecar["recipe"]["method"]["name"] == best["recipe"]["method"]["name"]
    assert result.run_commands[0].startswith(f"llama-cli -m {out / 'model.gguf'} ") and "llama_cpp" in result.run_commands[1]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.gguf", "model.gguf.json", "pareto.png", "report.md"]
    assert result.report == out / "report.md" and any("exporting" in e for e in events)


def test_nothing_is_exported_without_an_exact_row_or_with_export_off(setup, tmp_path):
    model_dir, config, _ = setup
    result = run_demo(tmp_path / "a", source=str(model_dir), recipes=[short_recipe("nf4:32")], config=config)
    assert result.choice is None and result.export is None and "nothing exported" in result.note
    assert not (tmp_path / "a" / "model.gguf").exists()
    result = run_demo(tmp_path / "b", source=str(model_dir), recipes=[short_recipe("int4:32")], config=config, export=False)
    assert result.choice is None and result.note is None and not (tmp_path / "b" / "model.gguf").exists()


def test_short_recipes():
    gptq = short_recipe("int4:32:gptq")
    assert (gptq.format, gptq.group_size, gptq.method.name) == ("int4", 32, "gptq")
    assert gptq.calibration.samples == DEMO_CALIBRATION["samples"] and gptq.calibration.seq_len == DEMO_CALIBRATION["seq_len"]
    assert short_recipe("int8:0").granularity == "channel" and short_recipe("mxfp4").method.name == "rtn"
    assert short_recipe("int3:32").calibration.samples != DEMO_CALIBRATION["samples"]  # RTN keeps the defaults
    assert [short_recipe(item).method.name for item in DEMO_FORMATS] == ["rtn", "rtn", "gptq", "rtn", "gptq", "gptq"]
    for bad, message in [("int4:x", "must be an integer"), ("int4:32:magic", "unknown method"), ("int4:32:gptq:1", "expected")]:
        with pytest.raises(WeightwiseError, match=message):
            short_recipe(bad)
