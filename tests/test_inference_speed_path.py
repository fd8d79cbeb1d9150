"""The inference fast path: dequantized_once holds each QuantizedLinear's float weight for many forward calls
(generation, exact match, perplexity) with outputs bit-identical to dequantizing per call, within a memory limit."""

import gc
import logging
import weakref

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from weightwise.data.tasks import Example
from weightwise.evaluate import evaluate
from weightwise.evaluate.tasks import exact_match
from weightwise.qlinear import QuantizedLinear, dequantized_once
from weightwise.quantize import quantize

RECIPES = [
    {"format": "int4", "group_size": 32},
    {"format": "int3_asym", "group_size": 32, "lorc_rank": 4},
    {"format": "nf4", "group_size": 32, "act_format": "int8"},
]


def qlinears(model) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def quantized(recipe=RECIPES[0]):
    return quantize(tiny_model(1, tie_word_embeddings=False), recipe)


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=12, min_new_tokens=12, pad_token_id=0)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r["format"])
def test_held_weights_give_bit_identical_logits_and_generations(recipe):
    qmodel = quantized(recipe)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain_logits, plain_tokens = qmodel(ids).logits, greedy(qmodel, ids)
        with dequantized_once(qmodel) as held:
            assert held and all(m.held_weight is not None for m in qlinears(qmodel))
            held_logits, held_tokens = qmodel(ids).logits, greedy(qmodel, ids)
    assert torch.equal(plain_logits, held_logits)
    assert torch.equal(plain_tokens, held_tokens)


def test_float_weights_are_released_after_the_context():
    qmodel = quantized()
    with dequantized_once(qmodel):
        refs = [weakref.ref(m.held_weight) for m in qlinears(qmodel)]
    gc.collect()
    assert all(m.held_weight is None for m in qlinears(qmodel))
    assert refs and all(ref() is None for ref in refs)  # no float weight left referenced anywhere


def test_weights_that_do_not_fit_are_dequantized_per_call_with_the_same_results(caplog):
    qmodel = quantized()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain_logits, plain_tokens = qmodel(ids).logits, greedy(qmodel, ids)
        with caplog.at_level(logging.WARNING, logger="weightwise.qlinear"), dequantized_once(qmodel, max_bytes=1024) as held:
            assert not held and all(m.held_weight is None for m in qlinears(qmodel))
            assert torch.equal(qmodel(ids).logits, plain_logits)
            assert torch.equal(greedy(qmodel, ids), plain_tokens)
    assert "dequantizing on every forward call" in caplog.text
    needed = sum(4 * m.in_features * m.out_features for m in qlinears(qmodel))
    with dequantized_once(qmodel, max_bytes=needed) as held:
        assert held  # the limit is inclusive: exactly the float32 bytes fit


def test_an_inner_context_keeps_the_outer_ones_weights():
    qmodel = quantized()
    with dequantized_once(qmodel):
        outer = [m.held_weight for m in qlinears(qmodel)]
        with dequantized_once(qmodel):
            pass
        assert all(m.held_weight is w for m, w in zip(qlinears(qmodel), outer))
    assert all(m.held_weight is None for m in qlinears(qmodel))


def held_during_forward(model) -> list[bool]:
    """Records, at every forward call of the model's first QuantizedLinear, whether it held its weight."""
    seen: list[bool] = []
    qlinears(model)[0].register_forward_hook(lambda module, args, out: seen.append(module.held_weight is not None))
    return seen


def test_exact_match_and_evaluate_run_on_held_weights():
    qmodel, tokenizer = quantized(), tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    seen = held_during_forward(qmodel)
    exact_match(qmodel, tokenizer, [Example("1 + 2?", "3"), Example("2 + 2?", "4")], max_new_tokens=4, batch_size=1)
    evaluate(qmodel, tokenizer, text="abcdefghij" * 20, window=16, max_tokens=64, measure_speed=False)
    assert seen and all(seen)
    assert all(m.held_weight is None for m in qlinears(qmodel))
