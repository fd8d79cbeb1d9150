"""A finished tune run loads as its base model with the result merged, so eval, quantize and export take it."""

import json

import pytest
import torch

from weightwise.errors import WeightwiseError
from weightwise.io.models import load_model, model_source_info
from weightwise.tune.api import tune
from weightwise.tune.config import TuneConfig


@pytest.fixture
def toy_task(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(11, 19)))
    return str(path)


@pytest.mark.parametrize("method", ["lift", "lora"])
def test_a_tune_run_loads_as_the_tuned_model(method, toy_task, tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    settings = {"lift": {"name": "lift", "density": 0.1, "filter_rank": 8}, "lora": {"name": "lora", "rank": 4}}[method]
    config = TuneConfig(task=toy_task, method=settings, train_examples=8, batch_size=8, max_steps=4, lr=5e-3,
                        test_examples=0, retention_max_tokens=0, checkpoint_every=0, patch_dtype="fp32")
    tune(model, tokenizer, config, tmp_path / "run", source=model_source_info(tiny_dir))  # lora: adapters injected in model
    loaded, loaded_tokenizer = load_model(tmp_path / "run")
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        base = load_model(tiny_dir)[0](ids).logits
        tuned, merged = model(ids).logits, loaded(ids).logits
    assert (tuned - base).abs().max() > 1e-3 and loaded_tokenizer is not None
    torch.testing.assert_close(merged, tuned, atol=2e-5, rtol=0)


def test_a_run_without_its_result_is_a_clear_error(toy_task, tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    config = TuneConfig(task=toy_task, method="lift", train_examples=8, batch_size=8, max_steps=2, density=0.1, filter_rank=8,
                        test_examples=0, retention_max_tokens=0, checkpoint_every=0)
    tune(model, tokenizer, config, tmp_path / "run", source=model_source_info(tiny_dir))
    (tmp_path / "run" / "patch.safetensors").unlink()
    with pytest.raises(WeightwiseError, match="truncated|missing|not found|no finished"):
        load_model(tmp_path / "run")
