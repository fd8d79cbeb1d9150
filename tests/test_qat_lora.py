"""QAT-LoRA (tune method qat-lora): the config and its shared quantizer fields, the layer (fake quantization of the
frozen weight plus a low-rank pair), the method on the one loop (what trains, what does not), its result as a quantized
run (bit-identical to the training model), init from a run, resuming, and the CLI."""

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from test_qat import _batch_loss, assert_same_tensors, ids
from test_tune import _Kill, _kill_at, prepared, quick, toy_task  # noqa: F401  (toy_task is a fixture)
from weightwise.errors import WeightwiseError
from weightwise.formats.base import QuantSpec
from weightwise.formats.quantizer import float_scales, quantize_tensor
from weightwise.io.models import load_model
from weightwise.quantize.recipe import validated
from weightwise.tune.api import tune
from weightwise.tune.config import LoraConfig, QATConfig, QATLoraConfig, QuantizerTrainingConfig, TuneConfig
from weightwise.tune.loop import train
from weightwise.tune.qat import FakeQuantLinear
from weightwise.tune.qat_lora import LoraFakeQuantLinear


def qat_lora(task, method: dict | None = None, **fields) -> TuneConfig:
    """A short qat-lora run on the toy task (groups of 32: the tiny rows are 64 and 96 long; rank 2)."""
    config = quick(task, method="qat-lora", **fields)
    return config.model_copy(update={"method": QATLoraConfig(**{"group_size": 32, "rank": 2, **(method or {})})})


def requires_grad_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- config ----------------------------------------------------------------------------------------


def test_config_shares_the_quantizer_fields_with_qat_and_the_rank_with_lora():
    flat = TuneConfig(method="qat-lora", format="int2_asym", group_size=64, init="runs/q", lora_rank=4, lora_alpha=2)
    assert flat.method == QATLoraConfig(format="int2_asym", group_size=64, init="runs/q", rank=4, alpha=2)
    assert flat.method.spec == QuantSpec(format="int2_asym", group_size=64)
    assert flat.method.resolved_alpha == 2 and QATLoraConfig(rank=3).resolved_alpha == 6
    assert TuneConfig.model_validate(flat.model_dump()) == flat
    assert QATLoraConfig().model_dump() == {"name": "qat-lora", "rank": 8, "alpha": None, "format": "int4",
                                            "granularity": "group", "group_size": None, "init": "rtn", "learn_scales": True,
                                            "oscillation_momentum": 0.01, "dampening": 0.0, "freeze_threshold": None,
                                            "distill_weight": 0.0, "distill_temperature": 1.0}
    shared = set(QuantizerTrainingConfig.model_fields) - {"name"}
    assert shared == {"format", "granularity", "group_size", "init", "learn_scales", "oscillation_momentum", "dampening",
                      "freeze_threshold", "distill_weight", "distill_temperature"}
    assert issubclass(QATConfig, QuantizerTrainingConfig) and issubclass(QATLoraConfig, QuantizerTrainingConfig)
    for field in shared:  # one definition: the same field (type, default, description) in both methods
        assert repr(QATLoraConfig.model_fields[field]) == repr(QATConfig.model_fields[field])
    assert repr(QATLoraConfig.model_fields["rank"]) == repr(LoraConfig.model_fields["rank"])
    assert TuneConfig(method="qat-lora", rank_budget=3).method.rank == 3  # the adapters' default from the budget
    with pytest.raises(WeightwiseError, match="lora_dropout is not a setting of method qat-lora"):
        validated(TuneConfig, {"method": "qat-lora", "lora_dropout": 0.1})
    assert TuneConfig(method="qat-lora", distill_weight=0.5).method.distill_weight == 0.5  # the flat shortcut reaches it
    with pytest.raises(WeightwiseError, match="qat-lora trains integer grids, not format 'nf4': use int2..int8"):
        validated(TuneConfig, {"method": "qat-lora", "format": "nf4"})
    for bad in ({"rank": 0}, {"alpha": 0}, {"group_size": 0}):
        with pytest.raises(ValueError):
            QATLoraConfig(**bad)


# --- the layer -------------------------------------------------------------------------------------


def test_the_layer_fake_quantizes_the_merged_weight_and_trains_only_the_pair_and_the_scales():
    spec = QuantSpec(format="int3_asym", group_size=16)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    start = (weight, *float_scales(quantize_tensor(weight, spec)))
    layer = LoraFakeQuantLinear(*start, None, spec, True, 2, 4.0, torch.Generator().manual_seed(1))
    assert layer.scaling == 2.0 and not layer.weight.requires_grad
    assert torch.equal(layer.latent(), weight)  # B = 0: training starts at the quantized W0
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    merged = weight + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    plain = FakeQuantLinear(merged, layer.scales, layer.offsets, None, spec, True)  # qat's layer on the merged weight
    assert torch.equal(layer.quantized_weight(), plain.quantized_weight())
    assert torch.equal(layer.codes(), plain.codes()) and not torch.equal(plain.codes(), FakeQuantLinear(
        *start, None, spec, True).codes())  # the pair moved codes
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    layer(x).square().sum().backward()
    assert layer.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B, layer.scales, layer.offsets))
    qlinear = layer.to_quantized()
    with torch.no_grad():
        assert torch.equal(qlinear(x), layer(x))


# --- the method on the one loop ----------------------------------------------------------------------


def test_qat_lora_starts_at_round_to_nearest_lowers_the_loss_and_trains_far_fewer_numbers_than_qat(toy_task):
    from weightwise.quantize import quantize

    config = qat_lora(toy_task, method={"format": "int4"}, max_steps=6)
    model, method, examples = prepared(config)
    rtn = quantize(tiny_model(), {"format": "int4", "group_size": 32})
    assert _batch_loss(model, examples) == _batch_loss(rtn, examples)  # B = 0: the start is RTN, exactly
    base = {name: layer.weight.detach().clone() for name, layer in method.layers.items()}
    records = []
    train(model, method, examples, config, pad_token_id=0, on_step=records.append)
    losses = [r["loss"] for r in records]
    assert losses[0] == pytest.approx(_batch_loss(rtn, examples), rel=1e-5)
    assert losses[-1] < 0.9 * losses[0], losses
    for name, layer in method.layers.items():  # W0 frozen: unchanged, no gradient, no optimizer state
        assert torch.equal(layer.weight, base[name]) and layer.weight.grad is None
        assert layer.weight not in method.optimizer.state
    counts = {"lora": 0, "scales": 0}
    for layer in method.layers.values():
        rows, cols = layer.shape
        counts["lora"] += 2 * (rows + cols)
        counts["scales"] += layer.scales.numel()
    assert method.trained_entries() == counts["lora"] + counts["scales"] == requires_grad_count(model)
    assert len(method.optimizer.state) == len(method.params) == 3 * 14  # A, B and scales (int4: no offsets) of 14 layers
    qat_config = quick(toy_task, method="qat", max_steps=1)
    qat_model, qat_method, _ = prepared(qat_config)
    assert qat_method.trained_entries() == requires_grad_count(qat_model)
    assert method.trained_entries() < 0.1 * qat_method.trained_entries()  # 5,632 against 63,360 on the tiny model


def test_the_low_rank_pair_alone_moves_the_codes_and_lowers_the_loss(toy_task):
    config = qat_lora(toy_task, method={"learn_scales": False, "rank": 4}, max_steps=6, lr=2e-2)
    model, method, examples = prepared(config)
    scales = {name: layer.scales.detach().clone() for name, layer in method.layers.items()}
    codes = {name: layer.codes() for name, layer in method.layers.items()}
    records = []
    train(model, method, examples, config, pad_token_id=0, on_step=records.append)
    assert records[-1]["loss"] < 0.95 * records[0]["loss"]
    assert method.trained_entries() == requires_grad_count(model) == sum(4 * sum(layer.shape) for layer in method.layers.values())
    changed = sum(int((layer.codes() != codes[name]).sum()) for name, layer in method.layers.items())
    assert changed > 0.01 * sum(layer.weight.numel() for layer in method.layers.values())
    assert all(torch.equal(layer.scales, scales[name]) for name, layer in method.layers.items())


# --- the result: a quantized run ----------------------------------------------------------------------


def test_the_saved_run_gives_the_training_models_logits_bit_for_bit(toy_task, tmp_path):
    model = tiny_model()
    config = qat_lora(toy_task, method={"format": "int3_asym", "rank": 4, "alpha": 16}, max_steps=4, lr=1e-2)
    metrics = tune(model, tiny_tokenizer(), config, tmp_path / "run")
    assert metrics["files"] == ["model"] and metrics["method"] == "qat-lora"
    assert metrics["trained_entries"] == requires_grad_count(model)  # the trainable parameter count, recorded
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["trained_entries"] == metrics["trained_entries"]
    model.eval()  # the training model, running its fake-quantized merged weights
    assert sum(isinstance(m, LoraFakeQuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        trained = model(ids()).logits
    for folder in (tmp_path / "run" / "model", tmp_path / "run"):  # the quantized run, and the tune run naming it
        loaded, tokenizer = load_model(folder)
        assert not any("lora" in name for name in loaded.state_dict())  # no adapter left: codes and scales
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, trained), folder
        assert tokenizer is not None
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert manifest["kind"] == "quantized-model" and len(manifest["layers"]) == 14
    assert {layer["spec"]["format"] for layer in manifest["layers"].values()} == {"int3_asym"}
    assert manifest["recipe"]["method"] == QATLoraConfig(format="int3_asym", group_size=32, rank=4, alpha=16).model_dump()


def test_init_from_a_quantized_run_and_an_interrupted_run_resumes_to_the_same_result(toy_task, tmp_path):
    from weightwise.io.folders import save
    from weightwise.quantize import quantize

    start = quantize(tiny_model(), {"format": "int2_asym", "group_size": 32})
    with torch.no_grad():  # another starting point than round-to-nearest: shrunk scales
        for m in start.modules():
            if hasattr(m, "set_scales"):
                m.set_scales(*(s * 0.9 for s in m.stored_scales()))
        expected = start(ids()).logits
    save(start, tmp_path / "q", tokenizer=tiny_tokenizer())
    config = qat_lora(toy_task, method={"format": "int2_asym", "init": str(tmp_path / "q")}, max_steps=6,
                      checkpoint_every=2, batch_size=4, lr=1e-2)
    model, _, _ = prepared(config)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, expected)

    reference = tiny_model()
    tune(reference, tiny_tokenizer(), config, tmp_path / "a")
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(5))
    assert (tmp_path / "b" / "checkpoints" / "step-00000004" / "state.json").is_file()
    resumed = tiny_model()
    metrics = tune(resumed, tiny_tokenizer(), config, tmp_path / "b")
    assert metrics["resumed_from_step"] == 4 and metrics["train"]["steps_run"] == 2
    for name, tensor in reference.state_dict().items():  # W0 (from the init run), A, B, scales, offsets
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert_same_tensors(tmp_path / "a" / "model", tmp_path / "b" / "model")  # the same codes and scales
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab"]
    assert [[r["step"], r["loss"]] for r in logs[0]] == [[r["step"], r["loss"]] for r in logs[1]]


def test_oscillations_dampening_and_distillation_train_and_resume_as_in_qat(toy_task, tmp_path):
    method = {"format": "int2_asym", "rank": 4, "freeze_threshold": 0.05, "oscillation_momentum": 0.5,
              "dampening": 0.1, "distill_weight": 0.5, "distill_temperature": 2.0}
    config = qat_lora(toy_task, method=method, max_steps=6, checkpoint_every=2, batch_size=4, lr=5e-2)
    reference = tiny_model()
    tune(reference, tiny_tokenizer(), config, tmp_path / "a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["qat_distill_kl"] >= 0 and r["qat_task_loss"] > 0 and r["qat_dampening"] > 0 for r in records)
    assert max(r["qat_oscillating"] for r in records) > 0 and records[-1]["qat_frozen"] > 0  # tracked, then frozen
    assert records[0]["qat_distill_kl"] < 1e-3 < records[-1]["qat_distill_kl"]  # the teacher is the float model
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(5))
    resumed = tiny_model()
    assert tune(resumed, tiny_tokenizer(), config, tmp_path / "b")["resumed_from_step"] == 4
    for name, tensor in reference.state_dict().items():  # adapters, scales, frozen masks and codes
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert_same_tensors(tmp_path / "a" / "model", tmp_path / "b" / "model")


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_qat_lora_and_its_user_errors(capsys, monkeypatch, tiny_dir, toy_task, tmp_path):
    from test_cli import run_cli

    common = ["tune", tiny_dir, "--task", toy_task, "--train-examples", "8", "--batch-size", "4", "--steps", "2",
              "--test-examples", "0", "--retention-max-tokens", "0", "--method", "qat-lora"]
    code, out, err = run_cli(capsys, monkeypatch, *common, "--format", "int4", "-g", "32", "--lora-rank", "2",
                             "--lora-alpha", "8", "-o", tmp_path / "run")
    assert code == 0, err
    assert "qat-lora" in out and "model" in out
    saved = json.loads((tmp_path / "run" / "tune_config.json").read_text())["config"]["method"]
    assert saved == QATLoraConfig(group_size=32, rank=2, alpha=8).model_dump()
    code, _, err = run_cli(capsys, monkeypatch, "eval", tmp_path / "run" / "model", "--window", "64", "--max-tokens", "128",
                           "-o", tmp_path / "report")
    assert code == 0, err
    for options, message in ((["--format", "nf4"], "qat-lora trains integer grids, not format 'nf4'"),
                             (["-g", "32", "--lora-dropout", "0.1"], "lora_dropout is not a setting of method qat-lora"),
                             (["--format", "int4"], "group size 64 does not divide the row length 96")):
        code, _, err = run_cli(capsys, monkeypatch, *common, *options, "-o", tmp_path / "bad")
        assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err
