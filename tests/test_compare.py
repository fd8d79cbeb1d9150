"""compare_recipes: one reference pass, one row per recipe, in one harness."""

import pytest

from conftest import tiny_model, tiny_tokenizer
from weightwise.compare import compare_recipes, describe
from weightwise.evaluate.config import EvalConfig
from weightwise.quantize.recipe import QuantRecipe


def test_compare_recipes_rows(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    recipes = [QuantRecipe(format="int8", granularity="channel"), QuantRecipe(format="int2", group_size=16)]
    events = []
    rows = compare_recipes(tiny_model(), tiny_tokenizer(), recipes, EvalConfig(text=str(text), window=64, max_tokens=256),
                           on_event=events.append)
    assert [r["name"] for r in rows] == ["source fp32", "int8 per-channel rtn", "int2 g16 rtn"]
    source, int8, int2 = rows
    assert source["kl_mean"] == 0 and source["top1_agreement"] == 1 and source["quantized_layers"] == 0
    assert int8["reference_ppl"] == pytest.approx(source["ppl"])
    assert 0 < int8["kl_mean"] < int2["kl_mean"]
    assert int8["speed_ratio"] == pytest.approx(int8["tokens_per_second"] / source["tokens_per_second"])
    assert int2["bits_per_weight"] < int8["bits_per_weight"] < 32
    assert int8["quantize_device"] == int2["quantize_device"] == "cpu"
    assert len(events) == 4


def test_describe():
    assert describe(QuantRecipe(format="nf4")) == "nf4 g64 rtn"
    assert describe(QuantRecipe(format="mxfp4")) == "mxfp4 g32 rtn"


def test_labels_name_rows_and_on_row_sees_each_row_as_it_is_measured(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("pack my box with five dozen liquor jugs. " * 40)
    seen = []
    rows = compare_recipes(tiny_model(), tiny_tokenizer(), [QuantRecipe(format="int4", group_size=16)],
                           EvalConfig(text=str(text), window=64, max_tokens=128), labels=["mine"], on_row=seen.append)
    assert [r["name"] for r in rows] == ["source fp32", "mine"]
    assert seen == rows
