"""Data-selection scorers on a tiny random Llama and a character tokenizer (no downloads)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from weightwise.data.tasks import Example, encode_example
from weightwise.errors import WeightwiseError
from weightwise.select.batch import ScoringContext
from weightwise.select.pool import PoolExample, example_key
from weightwise.select.scorers import (
    DSIRConfig,
    EL2NConfig,
    GraNdConfig,
    IFDConfig,
    LengthConfig,
    LESSConfig,
    LossConfig,
    PrototypeConfig,
    RDSConfig,
    _handlers,
)
from weightwise.select.scorers.gradient import attached, lora_example_grads
from weightwise.select.scorers.model import ifd
from weightwise.select.scorers.target import dsir_scores
from weightwise.select.scorers.text import length_scores, prototype_distances, prototype_scores
from weightwise.tune.lift import budget_k

from conftest import tiny_model

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character or newline, a BOS prepended, pad/eos/bos set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, "\n", *(chr(c) for c in range(32, 127))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def examples(*items) -> list[PoolExample]:
    """Pool examples of (prompt, response) pairs or plain texts."""
    out = []
    for i, item in enumerate(items):
        example = Example(*item) if isinstance(item, tuple) else item
        out.append(PoolExample(index=i, line=i + 1, example=example, record={}, key=example_key(example)))
    return out


def bag_of_chars(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for MiniLM: unit bag-of-characters vectors."""
    rows = np.zeros((len(texts), 64))
    for row, text in zip(rows, texts):
        for ch in text:
            row[ord(ch) % 64] += 1
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


TARGETS = [("Add 12 and 30.", "12 + 30 = 42."), ("Add 7 and 8.", "7 + 8 = 15."), ("Add 41 and 1.", "41 + 1 = 42.")]
POOL = [
    ("Add 12 and 31.", "12 + 31 = 43."),
    ("Name a colour of the sky", "The sky is blue on a clear day, grey when it rains"),
    ("Say hi", "hello there friend"),
    ("Add 5 and 9.", "5 + 9 = 14."),
    ("Write about cats", "cats sleep most of the day and hunt mice at night"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine thread hand-offs cost 100×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def ctx(tok):
    model = tiny_model(seed=0, vocab_size=len(tok), hidden_size=32, intermediate_size=64)
    return ScoringContext(model, tok, targets=examples(*TARGETS), max_length=96, batch_size=4, embed=bag_of_chars)


def run(config, ctx, pool, state=None):
    """Scores of ``pool`` as the registry runs a scorer: prepared once (unless ``state`` is given), batch by batch."""
    handler = _handlers()[type(config)]
    if handler.score_pool is not None:
        return handler.score_pool(config, pool, ctx)
    if state is None and handler.prepare is not None:
        state = handler.prepare(config, ctx)
    return np.concatenate([handler.score_batch(config, batch, state) for batch in ctx.batches(pool)])


def state_of(config, ctx):
    prepare = _handlers()[type(config)].prepare
    return prepare(config, ctx) if prepare is not None else None


BATCH_SCORERS = [LossConfig(), EL2NConfig(), IFDConfig(drop_above_one=False), GraNdConfig(filter_rank=4, density=0.2),
                 RDSConfig(), LESSConfig(lora_rank=2, projection_dim=64, warmup_steps=2)]


# --- loss, el2n, ifd ------------------------------------------------------------------------------


def test_loss_is_the_mean_cross_entropy_of_the_response(ctx, tok):
    pool = examples(POOL[0])
    item = encode_example(pool[0].example, tok, ctx.max_length)
    ids, labels = item["input_ids"], item["labels"]
    with torch.no_grad():
        logp = torch.log_softmax(ctx.model(input_ids=ids[None]).logits[0].double(), -1)
    scored = [t for t in range(1, len(ids)) if labels[t] != -100]
    assert "".join(tok.convert_ids_to_tokens(ids[scored].tolist())) == POOL[0][1] + "</s>"
    expected = -sum(logp[t - 1, ids[t]].item() for t in scored) / len(scored)
    assert run(LossConfig(), ctx, pool)[0] == pytest.approx(expected, rel=1e-5)


def test_el2n_lies_between_zero_and_root_two_and_matches_its_definition(ctx, tok):
    pool = examples(*POOL)
    scores = run(EL2NConfig(), ctx, pool)
    assert ((scores >= 0) & (scores <= math.sqrt(2))).all()
    item = encode_example(pool[1].example, tok, ctx.max_length)
    with torch.no_grad():
        probs = torch.softmax(ctx.model(input_ids=item["input_ids"][None]).logits[0].double(), -1)
    scored = (item["labels"][1:] != -100).nonzero().squeeze(1)
    onehot = F.one_hot(item["labels"][1:][scored], probs.shape[-1]).double()
    assert scores[1] == pytest.approx((probs[scored] - onehot).norm(dim=-1).mean().item(), rel=1e-5)


def test_ifd_is_the_ratio_of_the_two_nlls_and_nan_above_one(ctx, tok):
    pool = examples(*POOL)
    conditioned = run(LossConfig(), ctx, pool)
    unconditioned = []
    for ex in pool:
        answer = encode_example(ex.example, tok, ctx.max_length)
        answer = answer["input_ids"][answer["labels"] != -100]
        ids = torch.cat([torch.tensor([tok.bos_token_id]), answer])
        with torch.no_grad():
            logp = torch.log_softmax(ctx.model(input_ids=ids[None]).logits[0].double(), -1)
        unconditioned.append(-logp[torch.arange(len(answer)), answer].mean().item())
    ratio = conditioned / np.array(unconditioned)
    np.testing.assert_allclose(run(IFDConfig(drop_above_one=False), ctx, pool), ratio, rtol=1e-5)
    dropped = run(IFDConfig(), ctx, pool)
    np.testing.assert_array_equal(np.isnan(dropped), ratio > 1)
    np.testing.assert_allclose(dropped[ratio <= 1], ratio[ratio <= 1], rtol=1e-5)
    assert torch.isnan(ifd(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0])))[0]
    assert ifd(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]))[1] == 0.5


# --- every batch scorer ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", BATCH_SCORERS, ids=lambda c: c.name)
def test_batch_scores_equal_one_at_a_time_and_long_examples_score_nan(config, ctx):
    pool = examples(*POOL, "a plain text record", ("Add 1 and 2." * 12, "3"))  # the last one is too long
    state = state_of(config, ctx)
    together = run(config, ctx, pool, state)
    alone = np.array([run(config, ctx, [ex], state)[0] for ex in pool[:-1]])
    assert np.isnan(together[-1]) and np.isfinite(together[:-1]).all()
    np.testing.assert_allclose(together[:-1], alone, rtol=1e-5, atol=1e-6)


# --- rds, dsir ------------------------------------------------------------------------------------


def test_rds_prefers_near_copies_of_the_targets(ctx):
    pool = examples(("Add 12 and 30!", "12 + 30 = 42!"), ("Add 7 and 9.", "7 + 9 = 16."),
                    ("Write about cats", "cats sleep most of the day"), ("Say hi", "hello there friend"))
    scores = run(RDSConfig(), ctx, pool)
    assert (np.abs(scores) <= 1 + 1e-6).all() and min(scores[:2]) > max(scores[2:])


def test_dsir_ranks_target_like_text_above_unrelated_text_of_the_same_length(ctx):
    pool = examples(("Add 9 and 30.", "9 + 30 = 39."), ("Add 8 and 12.", "8 + 12 = 20."),
                    ("Name a red fruit.", "An apple is red."), ("Pick a pet.", "A dog is loyal."),
                    ("Say hi to me", "hello there, friend"))
    scores = run(DSIRConfig(), ctx, pool)
    assert min(scores[:2]) > max(scores[2:]) + 1
    np.testing.assert_array_equal(scores, run(DSIRConfig(), ctx, pool))


def test_target_scorers_need_a_target_set(ctx):
    bare = ScoringContext(ctx.model, ctx.tokenizer)
    for config in (RDSConfig(), LESSConfig()):
        with pytest.raises(WeightwiseError, match=f"{config.name} needs a target set"):
            state_of(config, bare)
    with pytest.raises(WeightwiseError, match="dsir needs a target set"):
        dsir_scores(DSIRConfig(), examples(*POOL), bare)


# --- grand ----------------------------------------------------------------------------------------


def test_grand_is_the_masked_gradient_norm_and_leaves_no_trace(ctx, tok):
    config = GraNdConfig(filter_rank=4, density=0.2)
    masks = state_of(config, ctx)
    modules = dict(ctx.model.named_modules())
    assert list(masks) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(len(m) == budget_k(tuple(modules[n].weight.shape), density=0.2) for n, m in masks.items())
    ctx.model.train()
    ctx.model.model.layers[0].requires_grad_(False)
    flags = [p.requires_grad for p in ctx.model.parameters()]
    try:
        score = run(config, ctx, examples(POOL[1]), masks)[0]
        assert ctx.model.training and [p.requires_grad for p in ctx.model.parameters()] == flags
        assert all(p.grad is None for p in ctx.model.parameters())
    finally:
        ctx.model.eval().requires_grad_(True)
    item = encode_example(Example(*POOL[1]), tok, ctx.max_length)
    weights = [modules[name].weight for name in masks]
    logits = ctx.model(input_ids=item["input_ids"][None]).logits[0]
    loss = F.cross_entropy(logits[:-1], item["labels"][1:], ignore_index=-100)
    grads = torch.autograd.grad(loss, weights)
    expected = torch.cat([g.flatten()[masks[name]] for g, name in zip(grads, masks)]).norm().item()
    assert score == pytest.approx(expected, rel=1e-5)


def test_grand_of_a_padded_batch_is_each_examples_own_gradient_norm(ctx, tok):
    """One backward pass for the batch gives, per example, the norm its own backward pass alone gives."""
    config = GraNdConfig(filter_rank=4, density=0.2)
    masks = state_of(config, ctx)
    modules = dict(ctx.model.named_modules())
    weights = [modules[name].weight for name in masks]
    scores = run(config, ctx, examples(*POOL), masks)
    assert len({len(encode_example(Example(*p), tok, ctx.max_length)["input_ids"]) for p in POOL}) > 1  # padded
    for pair, score in zip(POOL, scores):
        item = encode_example(Example(*pair), tok, ctx.max_length)
        logits = ctx.model(input_ids=item["input_ids"][None]).logits[0]
        loss = F.cross_entropy(logits[:-1], item["labels"][1:], ignore_index=-100)
        grads = torch.autograd.grad(loss, weights)
        expected = torch.cat([g.flatten()[masks[name]] for g, name in zip(grads, masks)]).norm().item()
        assert score == pytest.approx(expected, rel=1e-4)


def test_grand_names_unmatched_targets(ctx):
    with pytest.raises(WeightwiseError, match="no Linear layer"):
        state_of(GraNdConfig(targets=["nothing_like_this"]), ctx)


# --- less -----------------------------------------------------------------------------------------


def test_lora_example_grads_match_autograd():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 6, generator=gen), torch.randn(4, 6, generator=gen)
    a, b = torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen)
    weights = torch.randn(3, 5, 4, generator=gen)
    a.requires_grad_(), b.requires_grad_()
    y = x @ w.T + 1.5 * (x @ a.T) @ b.T
    grad_out = torch.autograd.grad((y * weights).sum(), y, retain_graph=True)[0]
    d_a, d_b = lora_example_grads(x, grad_out, a, b, 1.5)
    for i in range(3):
        ref_a, ref_b = torch.autograd.grad((y[i] * weights[i]).sum(), [a, b], retain_graph=True)
        torch.testing.assert_close(d_a[i], ref_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_b[i], ref_b, rtol=1e-5, atol=1e-5)


def test_less_leaves_the_model_unchanged_and_is_deterministic(ctx):
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    flags = [p.requires_grad for p in ctx.model.parameters()]
    hooks = {name: list(m._forward_hooks) for name, m in ctx.model.named_modules()}  # transformers' own
    pool = examples(*POOL[:3])
    config = LESSConfig(lora_rank=2, projection_dim=64, warmup_steps=2, seed=1)
    first = run(config, ctx, pool)
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())
    assert [p.requires_grad for p in ctx.model.parameters()] == flags and not ctx.model.training
    assert all(p.grad is None for p in ctx.model.parameters())
    assert {name: list(m._forward_hooks) for name, m in ctx.model.named_modules()} == hooks
    np.testing.assert_array_equal(first, run(config, ctx, pool))
    assert not np.allclose(first, run(config.model_copy(update={"seed": 2}), ctx, pool))
    assert (np.abs(first) <= 1 + 1e-6).all()


def test_less_adapters_start_as_a_no_op_and_move_in_warm_up(ctx):
    state = state_of(LESSConfig(lora_rank=2, projection_dim=64, warmup_steps=0), ctx)
    assert all((b == 0).all() for b in state.adapters.b) and state.exp_avg is None
    warmed = state_of(LESSConfig(lora_rank=2, projection_dim=64, warmup_steps=3), ctx)
    assert all((b != 0).any() for b in warmed.adapters.b) and (warmed.exp_avg_sq > 0).any()
    ids = ctx.batch(ctx.targets).collated()["input_ids"]
    with torch.no_grad():
        base = ctx.model(input_ids=ids).logits
        with attached(ctx.model, state.adapters):
            assert torch.equal(ctx.model(input_ids=ids).logits, base)
        with attached(ctx.model, warmed.adapters):
            assert not torch.equal(ctx.model(input_ids=ids).logits, base)


def test_less_without_warm_up_scores_a_copy_of_the_single_target_one(ctx):
    single = ScoringContext(ctx.model, ctx.tokenizer, targets=examples(TARGETS[0]), max_length=96, batch_size=4)
    scores = run(LESSConfig(lora_rank=2, projection_dim=256, warmup_steps=0), single, examples(*POOL, TARGETS[0]))
    assert scores[-1] == pytest.approx(1.0, abs=1e-5) and (scores[:-1] < 0.99).all()


# --- length, prototype ----------------------------------------------------------------------------


def test_length_counts_characters_of_the_response_or_text():
    scores = length_scores(LengthConfig(), examples(("a prompt", "four"), "plain text é"), None)
    np.testing.assert_array_equal(scores, [4, 12])


def test_prototype_distances_are_cosine_distances_to_centroids(ctx):
    pool = examples(*POOL, POOL[0], POOL[0])
    scores = prototype_scores(PrototypeConfig(clusters=3, seed=0), pool, ctx)
    assert scores.shape == (7,) and (scores >= 0).all() and (scores <= 2).all()
    np.testing.assert_array_equal(scores, prototype_scores(PrototypeConfig(clusters=3, seed=0), pool, ctx))
    # one cluster per distinct example (clusters capped): every example is its own centroid
    np.testing.assert_allclose(prototype_scores(PrototypeConfig(clusters=50), pool, ctx), 0, atol=1e-12)
    points = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # k = 1: the centroid is the mean (2/3, 1/3), at cosines 2/√5 and 1/√5 from the two directions
    np.testing.assert_allclose(prototype_distances(points, 1, 0), 1 - np.array([2, 1, 2]) / math.sqrt(5), atol=1e-12)


def test_prototype_needs_an_embedder(ctx):
    with pytest.raises(WeightwiseError, match="embed"):
        prototype_scores(PrototypeConfig(), examples(*POOL), ScoringContext(None, None))
