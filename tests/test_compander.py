"""Weight compander (tune/compander.py, ``reparam: compander``): the function and its inverse, the parametrization
(the model starts bit for bit unchanged, the plain weights are left when training ends), training with full and
the sparse methods, the saved patch, resume, and the methods it refuses."""

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conftest import tiny_model, tiny_tokenizer
from test_cli import assert_user_error, run_cli
from test_tune import _kill_at, _Kill, prepared, quick, weights
from weightwise.errors import WeightwiseError
from weightwise.tune.api import tune
from weightwise.tune.compander import CompandedWeights, Compander, compand, expand, initial_bounds
from weightwise.tune.config import CompanderConfig, TuneConfig
from weightwise.tune.loop import train
from weightwise.tune.patch import WeightPatch

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 6)


# --- the function ------------------------------------------------------------------------------


def test_compand_inverts_is_bounded_and_expands_small_weights():
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    alpha, bound = torch.tensor(2.0), initial_bounds(w, 1.25)
    assert bound.shape == (6, 1) and torch.allclose(bound.squeeze(1), 1.25 * w.abs().amax(dim=1))
    torch.testing.assert_close(compand(expand(w, alpha, bound), alpha, bound), w, atol=0, rtol=1e-6)
    huge = torch.full((6, 8), 1e4)
    assert (compand(huge, alpha, bound).abs() <= bound).all() and (compand(-huge, alpha, bound) < 0).all()
    h = 1e-3
    slope = (compand(torch.full((6, 1), h), alpha, bound) - compand(torch.full((6, 1), -h), alpha, bound)) / (2 * h)
    torch.testing.assert_close(slope, torch.full((6, 1), 2.0), rtol=1e-3, atol=0)  # α at zero
    small = 0.05 * bound
    assert (compand(small, alpha, bound) > 1.9 * small).all()  # pushed away from zero


def test_a_zero_row_gets_the_layers_mean_magnitude_as_bound():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    w[1] = 0
    bound = initial_bounds(w, 1.5)
    assert bound[1, 0] == 1.5 * w.abs().mean() and (bound > 0).all()


# --- the parametrization -----------------------------------------------------------------------


def test_parametrization_starts_exactly_at_w_and_leaves_a_plain_weight():
    linear = layer()
    w0 = linear.weight.detach().clone()
    settings = CompanderConfig(expansion=3.0, margin=1.1)
    companded = CompandedWeights({"l": linear}, settings)
    assert parametrize.is_parametrized(linear, "weight")
    assert torch.equal(linear.weight, w0)  # bit for bit, thanks to the rounding residual
    latent = companded.latents()["l"]
    compander = linear.parametrizations.weight[0]
    assert isinstance(compander, Compander) and compander.residual.abs().max() <= w0.abs().max() * 2 ** -23
    torch.testing.assert_close(latent.detach(), expand(w0, torch.tensor(3.0), compander.log_bound.exp()))
    assert companded.hyperparameters() == {}  # learn is off by default
    with torch.no_grad():
        latent.mul_(1.5)
    moved = linear.weight.detach().clone()
    companded.remove()
    companded.remove()  # idempotent
    assert type(linear) is nn.Linear and not hasattr(linear, "parametrizations")
    assert isinstance(linear.weight, nn.Parameter) and linear.weight is latent  # the optimizer's Parameter
    assert torch.equal(linear.weight.detach(), moved) and set(linear.state_dict()) == {"weight", "bias"}


def test_a_non_finite_weight_is_refused():
    linear = layer()
    with torch.no_grad():
        linear.weight[2, 3] = float("nan")
    with pytest.raises(WeightwiseError, match="not finite"):
        CompandedWeights({"l": linear}, CompanderConfig())


def test_learned_hyperparameters_are_named_per_target():
    linear = layer()
    companded = CompandedWeights({"l": linear}, CompanderConfig(learn=True))
    hyper = companded.hyperparameters()
    assert set(hyper) == {"l.compander.log_alpha", "l.compander.log_bound"}
    assert hyper["l.compander.log_bound"].shape == (6, 1) and all(p.requires_grad for p in hyper.values())


# --- training ----------------------------------------------------------------------------------


@pytest.fixture
def toy_task(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(11, 19)))
    return str(path)


COMPANDER_RUNS = {"full": {"method": "full", "lr": 1e-3}, "full-learn": {"method": "full", "lr": 1e-3,
                  "reparam": {"name": "compander", "learn": True}}, "lift": {"method": "lift"},
                  "random": {"method": "random"}}


@pytest.mark.parametrize("run", sorted(COMPANDER_RUNS))
def test_model_starts_unchanged_and_the_loss_decreases(run, toy_task):
    fields = {"reparam": "compander", **COMPANDER_RUNS[run]}
    config = quick(toy_task, **fields)
    base = tiny_model()
    model, tuner, examples = prepared(config, tiny_model())
    assert torch.equal(logits(model), logits(base))  # step 0: identical logits
    hyper = {name: p.detach().clone() for name, p in tuner.params.items() if ".compander." in name}
    assert bool(hyper) == (run == "full-learn")
    losses = []
    train(model, tuner, examples, config, pad_token_id=0, on_step=lambda r: losses.append(r["loss"]))
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
    assert all(not torch.equal(tuner.params[name], value) for name, value in hyper.items())  # α and β learned
    trained = logits(model)
    tuner.finish()
    assert not any("parametrizations" in name for name in model.state_dict())
    assert torch.equal(logits(model), trained)  # the plain weights are the trained ones


def test_the_bound_holds_where_plain_training_breaks_it(toy_task):
    """At a large learning rate plain full fine-tuning pushes weights past 1.1 × their row's largest |W|; under the
    compander with margin 1.1 every weight stays inside its row's bound."""
    escaped = {}
    for reparam in (None, {"name": "compander", "margin": 1.1}):
        model = tiny_model()
        before = weights(model)
        config = quick(toy_task, method="full", lr=0.05, reparam=reparam, max_steps=4)
        model, tuner, examples = prepared(config, model)
        bounds = {name: 1.1 * before[name + ".weight"].abs().amax(dim=1, keepdim=True) for name in tuner.targets}
        if reparam is not None:  # the compander's own bounds: 1.1 × the row's largest |W| up to rounding
            bounds = {name: m.parametrizations.weight[0].log_bound.exp().detach() for name, m in tuner.targets.items()}
        train(model, tuner, examples, config, pad_token_id=0)
        tuner.finish()
        escaped[reparam is None] = 0
        for name, module in tuner.targets.items():
            w = module.weight.detach()
            assert not torch.equal(w, before[name + ".weight"]), name
            escaped[reparam is None] += int((w.abs() > bounds[name]).sum())
    assert escaped[True] > 0 and escaped[False] == 0, escaped


def test_sparse_compander_changes_only_masked_entries(toy_task):
    config = quick(toy_task, method="magnitude", reparam="compander", refresh_every=2)
    model = tiny_model()
    before = weights(model)
    model, tuner, examples = prepared(config, model)
    train(model, tuner, examples, config, pad_token_id=0)
    tuner.finish()
    trained = tuner.ever_trained()
    for name, tensor in model.state_dict().items():
        changed = (tensor != before[name]).reshape(-1).nonzero().squeeze(1)
        module = name.removesuffix(".weight")
        if module not in trained:
            assert changed.numel() == 0, name
        else:
            assert changed.numel() > 0 and torch.isin(changed, trained[module]).all(), name


@pytest.mark.parametrize("method", ["full", "lift"])
def test_saved_patch_is_plain_and_reproduces_the_tuned_model(method, toy_task, tmp_path):
    model = tiny_model()
    config = quick(toy_task, method=method, reparam={"name": "compander", "learn": method == "full"},
                   **({"lr": 1e-3} if method == "full" else {}))
    metrics = tune(model, tiny_tokenizer(), config, tmp_path / "run")
    assert metrics["files"] == ["patch.safetensors"]
    assert not any("parametrizations" in name for name in model.state_dict())
    patch = WeightPatch.load(tmp_path / "run" / "patch.safetensors")
    assert all(key.endswith(".weight") and "parametrizations" not in key for key in patch.entries)
    assert patch.metadata["config"]["reparam"]["name"] == "compander"
    rebuilt = tiny_model()
    patch.apply(rebuilt)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], tensor, atol=1e-7, rtol=0)  # base + fp32 delta
    torch.testing.assert_close(logits(rebuilt), logits(model), atol=1e-5, rtol=0)
    assert (logits(model) - logits(tiny_model())).abs().max() > 1e-3


@pytest.mark.parametrize("method, reparam", [("lift", "compander"), ("full", {"name": "compander", "learn": True})])
def test_an_interrupted_compander_run_resumes_to_the_same_weights(method, reparam, toy_task, tmp_path):
    config = quick(toy_task, method=method, reparam=reparam, max_steps=6, checkpoint_every=2, batch_size=4,
                   **({"refresh_every": 2} if method == "lift" else {"lr": 1e-3}))
    reference = tiny_model()
    tune(reference, tiny_tokenizer(), config, tmp_path / "a")
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(3))
    resumed = tiny_model()
    metrics = tune(resumed, tiny_tokenizer(), config, tmp_path / "b")
    assert metrics["resumed_from_step"] == 2 and metrics["train"]["steps_run"] == 4
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_qat_trains_its_latent_weights_through_the_compander(toy_task, tmp_path):
    """QAT from a quantized run (not the model's own weights) with learned α and β: the start is the run exactly, the
    saved run is the trained model bit for bit, and a killed run resumes to the same codes (α, β and the residual
    come from the checkpoint, since a resumed run lays its tensors out from round-to-nearest)."""
    from weightwise.io.folders import save
    from weightwise.io.models import load_model
    from weightwise.quantize import quantize
    from weightwise.tune.config import QATConfig

    start = quantize(tiny_model(), {"format": "int3", "group_size": 32})
    save(start, tmp_path / "q", tokenizer=tiny_tokenizer())
    config = quick(toy_task, method="qat", reparam={"name": "compander", "learn": True}, max_steps=6,
                   checkpoint_every=2, batch_size=4, lr=1e-2)
    config = config.model_copy(update={"method": QATConfig(format="int3", group_size=32, init=str(tmp_path / "q"))})
    model, tuner, examples = prepared(config)
    assert torch.equal(logits(model), logits(start))  # f(V) + r is the run's dequantized weight, exactly
    assert {name.rpartition(".")[2] for name in tuner.params if ".compander." in name} == {"log_alpha", "log_bound"}
    reference = tiny_model()
    tune(reference, tiny_tokenizer(), config, tmp_path / "a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    reference.eval()
    saved, _ = load_model(tmp_path / "a" / "model")
    assert torch.equal(logits(saved), logits(reference))
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(3))
    resumed = tiny_model()
    assert tune(resumed, tiny_tokenizer(), config, tmp_path / "b")["resumed_from_step"] == 2
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


# --- what it refuses ---------------------------------------------------------------------------


def test_config_refuses_methods_that_do_not_train_the_weights():
    assert TuneConfig(method="random", reparam="compander").reparam == CompanderConfig()
    with pytest.raises(ValueError, match="cannot reparameterise method lora"):
        TuneConfig(method="lora", reparam="compander")
    with pytest.raises(ValueError, match="cannot reparameterise method qat-lora"):
        TuneConfig(method="qat-lora", reparam="compander")
    assert TuneConfig(method="qat", reparam="compander").reparam == CompanderConfig()
    with pytest.raises(ValueError, match="sparse patch cannot hold"):
        TuneConfig(method="lift", reparam={"name": "compander", "learn": True})
    with pytest.raises(ValueError, match="margin"):
        TuneConfig(method="full", reparam={"name": "compander", "margin": 1.0})


def test_cli_reparam_option(capsys, monkeypatch, tiny_dir, toy_task, tmp_path):
    common = ["tune", tiny_dir, "--task", toy_task, "--train-examples", "8", "--batch-size", "8", "--steps", "2",
              "--test-examples", "0", "--retention-max-tokens", "0", "--checkpoint-every", "0"]
    result = run_cli(capsys, monkeypatch, *common, "--method", "dora", "--reparam", "compander", "-o", tmp_path / "a")
    assert_user_error(result, "cannot reparameterise method dora", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    code, out, err = run_cli(capsys, monkeypatch, *common, "--method", "full", "--reparam", "compander",
                             "-o", tmp_path / "b")
    assert code == 0, err
    saved = json.loads((tmp_path / "b" / "tune_config.json").read_text())["config"]
    assert saved["reparam"] == {"name": "compander", "expansion": 2.0, "margin": 1.25, "learn": False}
