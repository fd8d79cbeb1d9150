import copy
import math

import time

import pytest
import torch
import transformers
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.evaluate import EvalResult, evaluate, model_size, reference_outputs, token_windows
from weightwise.evaluate.divergence import kl_divergence, kl_from_log_probs, top1_agreement
from weightwise.evaluate.perplexity import window_nll
from weightwise.evaluate.speed import ForwardTimer

VOCAB = 128
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 3


class ByteTokenizer:
    """Token = byte value mod the vocabulary size; adds no special tokens."""

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [b % VOCAB for b in text.encode()]}


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_token_windows_drop_the_partial_window_and_respect_max_tokens():
    tok = ByteTokenizer()
    text = "x" * 100
    assert token_windows(tok, text, window=16).shape == (6, 16)
    assert token_windows(tok, text, window=16, max_tokens=40).shape == (2, 16)
    assert token_windows(tok, text, window=16, max_tokens=5).shape == (1, 16)
    assert token_windows(tok, text, window=16, max_tokens=10_000).shape == (6, 16)
    ids = token_windows(tok, "abcdefghij", window=3)
    assert ids.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    with pytest.raises(WeightwiseError, match="has 10 tokens.*smaller window"):
        token_windows(tok, "abcdefghij", window=16)


def test_window_nll_matches_a_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    nll = window_nll(logits, ids)
    assert nll.shape == (2, 4)
    for b in range(2):
        for t in range(1, 5):
            p = torch.exp(logits[b, t - 1]) / torch.exp(logits[b, t - 1]).sum()
            assert nll[b, t - 1].item() == pytest.approx(-math.log(p[ids[b, t]].item()), rel=1e-5)


def test_perplexity_is_exp_of_the_mean_manual_nll_on_one_window(model):
    tok = ByteTokenizer()
    result = evaluate(model, tok, text=TEXT, window=32, max_tokens=32, measure_speed=False)
    ids = torch.tensor(tok(TEXT)["input_ids"][:32])
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    manual = [-torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, 32)]
    assert result.n_windows == 1 and result.n_tokens_scored == 31 and result.window == 32
    assert result.mean_nll == pytest.approx(sum(manual) / 31, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(manual) / 31), rel=1e-5)
    assert result.reference_ppl is None and result.kl_mean is None and result.top1_agreement is None
    assert result.tokens_per_second is None


def test_model_against_itself_has_zero_kl_and_full_agreement(model):
    result = evaluate(model, ByteTokenizer(), text=TEXT, reference=model, window=32, batch_size=3)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert result.top1_agreement == 1.0
    assert result.reference_ppl == pytest.approx(result.ppl, rel=1e-6)
    assert result.tokens_per_second > 0 and result.speed_ratio > 0
    assert result.python_version and result.eval_seconds > 0


def test_perturbed_copy_diverges_and_precomputed_reference_agrees_with_live_one(model):
    tok = ByteTokenizer()
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        for layer in candidate.model.layers:
            layer.mlp.down_proj.weight.add_(0.5 * torch.randn_like(layer.mlp.down_proj.weight))
    live = evaluate(candidate, tok, text=TEXT, reference=model, window=32, batch_size=2, measure_speed=False)
    assert live.kl_mean > 1e-4
    assert live.top1_agreement < 1.0
    assert live.ppl != pytest.approx(live.reference_ppl)

    windows = token_windows(tok, TEXT, window=32)
    stored = reference_outputs(model, windows, batch_size=4)
    assert stored.log_probs.dtype == torch.float16 and stored.log_probs.shape == (len(windows), 31, VOCAB)
    again = evaluate(candidate, tok, text=TEXT, reference=stored, window=32, batch_size=3, measure_speed=False)
    assert again.kl_mean == pytest.approx(live.kl_mean, rel=1e-2)
    assert again.top1_agreement == pytest.approx(live.top1_agreement)
    assert again.reference_ppl == pytest.approx(live.reference_ppl, rel=1e-6)
    self_kl = evaluate(model, tok, text=TEXT, reference=stored, window=32, measure_speed=False)
    assert 0.0 <= self_kl.kl_mean < 1e-5 and self_kl.top1_agreement == 1.0


def test_precomputed_reference_must_match_the_windows(model):
    tok = ByteTokenizer()
    stored = reference_outputs(model, token_windows(tok, TEXT, window=32))
    with pytest.raises(WeightwiseError, match="other windows"):
        evaluate(model, tok, text=TEXT, reference=stored, window=16, measure_speed=False)


def test_evaluate_restores_training_mode_and_reports_progress(model):
    model.train()
    calls = []
    result = evaluate(model, ByteTokenizer(), text=[TEXT, TEXT], window=32, batch_size=4, measure_speed=False,
                      progress=lambda done, total: calls.append((done, total)))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert calls[-1] == (result.n_windows, result.n_windows) and len(calls) == math.ceil(result.n_windows / 4)
    assert set(result.model_dump()) == set(EvalResult.model_fields)


def test_kl_and_top1_pure_functions():
    torch.manual_seed(2)
    a, b = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(3, 4), atol=1e-6)
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    assert torch.allclose(kl_divergence(a, b), (p * (p / q).log()).sum(-1), atol=1e-5)
    assert (kl_divergence(a, b) > 0).all()
    ref_lp = torch.tensor([[0.0, float("-inf")]])
    assert kl_from_log_probs(ref_lp, torch.tensor([[-0.1, float("-inf")]])).item() == pytest.approx(0.1)
    assert top1_agreement(a, a).all()
    assert top1_agreement(a, -a).float().mean() < 0.5


class FakeQuantizedLinear(nn.Module):
    """The QuantizedLinear interface: in/out features and stored_bits(); 4-bit codes + fp16 scales."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, 1, dtype=torch.float16))

    def stored_bits(self):
        return self.codes.numel() * 8 + self.scales.numel() * 16


def test_model_size_counts_quantized_and_block_linears():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].q = FakeQuantizedLinear(8, 6)
    model.layers[0].v = nn.Linear(8, 6, bias=False)
    model.lm_head = nn.Linear(8, 6, bias=False)
    size = model_size(nn.ModuleDict({"model": model}))
    assert size["quantized_layers"] == 1
    assert size["linear_params"] == 96
    assert size["linear_bits"] == 6 * 4 * 8 + 6 * 16 + 48 * 32
    assert size["bits_per_weight"] == pytest.approx(size["linear_bits"] / 96)
    assert size["total_bytes"] == 24 + 12 + 2 * 48 * 4


def test_model_size_counts_tied_weights_once():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    unique = sum(p.numel() * p.element_size() for p in tied.parameters())
    assert model_size(tied)["total_bytes"] == unique
    assert model_size(untied)["total_bytes"] == unique + VOCAB * 32 * 4
    size = model_size(tied)
    assert size["bits_per_weight"] == 32.0 and size["quantized_layers"] == 0
    assert size["linear_params"] == 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64)


def test_forward_timer_and_evaluate_speed(model):
    timer = ForwardTimer()
    assert timer.tokens_per_second() is None
    for seconds in (0.2, 0.03, 0.02, 0.01):  # the slow first call is left out
        with timer.measure(100):
            time.sleep(seconds)
    assert 100 / 0.03 < timer.tokens_per_second() < 100 / 0.01
    result = evaluate(model, ByteTokenizer(), text=TEXT, reference=model, window=32, batch_size=1)
    assert result.tokens_per_second > 0 and result.reference_tokens_per_second > 0
    assert result.speed_ratio == pytest.approx(result.tokens_per_second / result.reference_tokens_per_second)

