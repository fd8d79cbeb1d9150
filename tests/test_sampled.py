"""Text sampled from the model itself (data.sampled) as tune's task 'sampled' (data-free QAT as in LLM-QAT): seeded
sampling that continues the model's own distribution, the texts cached in the run folder and read back as a text
task, and a resumed run training on the very same text."""

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from test_qat import assert_same_tensors
from test_tune import _Kill, _kill_at
from weightwise.data.sampled import sample_texts, sample_token_ids
from weightwise.tune.api import tune
from weightwise.tune.config import QATConfig, TuneConfig


def sampled_qat(**fields) -> TuneConfig:
    settings = dict(task="sampled", train_examples=8, max_length=24, batch_size=4, max_steps=4, lr=5e-3,
                    test_examples=0, retention_max_tokens=0, checkpoint_every=0, eval_before=False,
                    sample_temperature=0.8)
    return TuneConfig(**{**settings, **fields}, method=QATConfig(format="int4", group_size=32))


def test_sampling_is_seeded_and_continues_the_models_own_distribution():
    model = tiny_model()
    first = torch.tensor([5, 6, 7])

    def draw(seed, temperature=1.0, n=5, batch_size=2):
        return sample_token_ids(model, [1], first, n, 12, temperature=temperature, batch_size=batch_size,
                                generator=torch.Generator().manual_seed(seed))

    ids = draw(0)
    assert ids.shape == (5, 12) and (ids[:, 0] == 1).all() and torch.isin(ids[:, 1], first).all()
    assert torch.equal(draw(0), ids) and not torch.equal(draw(1), ids)
    # near zero temperature the draws are the argmax of the model run on the whole sequence (no cache): the cached
    # continuation is the model's own next-token distribution
    greedy = draw(0, temperature=1e-4)
    with torch.no_grad():
        logits = model(input_ids=greedy).logits
    assert torch.equal(logits[:, 1:-1].argmax(-1), greedy[:, 2:])
    assert model.training is False  # eval mode restored (tiny_model() is built in eval mode)


def test_sample_texts_cut_at_the_end_of_sequence_token():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "~"})  # a character the tiny vocabulary holds, made the end token
    texts = sample_texts(tiny_model(), tokenizer, 16, 40, temperature=2.0, batch_size=8, seed=0)
    assert len(texts) == 16 and all("~" not in text for text in texts)
    assert texts == sample_texts(tiny_model(), tokenizer, 16, 40, temperature=2.0, batch_size=8, seed=0)
    assert any(len(text.replace(" ", "")) < 39 for text in texts)  # some sequence ended early at a sampled "~"


def test_qat_on_sampled_text_trains_and_caches_the_text_in_the_run(tmp_path):
    config = sampled_qat()
    model = tiny_model()
    metrics = tune(model, tiny_tokenizer(), config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "sampled.jsonl").read_text().splitlines()]
    expected = sample_texts(tiny_model(), tiny_tokenizer(), 8, 23, temperature=0.8, batch_size=4, seed=0)
    assert [r["text"] for r in records] == expected  # from the float model, before any tuning
    settings = json.loads((tmp_path / "run" / "sampled.json").read_text())
    assert settings["texts"] == 8 and settings["tokens"] == 23 and settings["temperature"] == 0.8
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()


def test_a_resumed_sampled_run_trains_on_the_cached_text(tmp_path, monkeypatch):
    config = sampled_qat(max_steps=6, checkpoint_every=2, train_examples=8, batch_size=2)
    tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "a")
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(3))
    cached = (tmp_path / "b" / "sampled.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run samples again instead of reading its text")

    monkeypatch.setattr("weightwise.tune.api.sample_texts", refuse)
    metrics = tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b")
    assert metrics["resumed_from_step"] == 2
    assert (tmp_path / "b" / "sampled.jsonl").read_text() == cached == (tmp_path / "a" / "sampled.jsonl").read_text()
    assert_same_tensors(tmp_path / "a" / "model", tmp_path / "b" / "model")


def test_cli_task_sampled(capsys, monkeypatch, tiny_dir, tmp_path):
    from test_cli import run_cli

    code, _, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--method", "qat", "-g", "32", "--task", "sampled",
                           "--sample-temperature", "0.5", "--train-examples", "4", "--batch-size", "2", "--steps", "2",
                           "--max-length", "16", "--test-examples", "0", "--retention-max-tokens", "0", "-o",
                           tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "tune_config.json").read_text())["config"]["sample_temperature"] == 0.5
    assert len((tmp_path / "run" / "sampled.jsonl").read_text().splitlines()) == 4
    code, _, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--task", "sampled", "--sample-temperature", "0",
                           "-o", tmp_path / "bad")
    assert code == 2 and "sample_temperature" in err and "Traceback" not in err, err
