"""weightwise tune: config, the one loop with every method, masks and refresh, results (patch / peft adapter),
resuming an interrupted run in-process, output-folder rules and the CLI, all on a tiny Llama and a toy task."""

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from weightwise.data.tasks import encode_examples, task_examples
from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import state_dict_fingerprint
from weightwise.tune.api import target_modules, tune
from weightwise.tune.config import METHOD_CONFIGS, METHOD_NAMES, LiftConfig, LoraConfig, TuneConfig
from weightwise.tune.lift import budget_k, principal_mask
from weightwise.tune.loop import train
from weightwise.tune.methods import METHODS, make_method
from weightwise.tune.patch import WeightPatch

TINY_TARGETS = 14  # 2 blocks × (q, k, v, o, gate, up, down)


@pytest.fixture
def toy_task(tmp_path):
    """Eight memorisable problems (a batch of 8 sees all of them at every step)."""
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(11, 19)))
    return str(path)


SPARSE = {"density": 0.1}
QUICK_METHOD = {"lift": {**SPARSE, "filter_rank": 8}, "magnitude": SPARSE, "random": SPARSE,
                "qat": {"group_size": 32}, "qat-lora": {"group_size": 32}}  # as flat shortcuts


def quick(task: str, method: str = "lift", **fields) -> TuneConfig:
    settings = dict(task=task, method=method, train_examples=8, batch_size=8, max_steps=6, lr=5e-3, test_examples=0,
                    retention_max_tokens=0, checkpoint_every=0, patch_dtype="fp32", **QUICK_METHOD.get(method, {}))
    return TuneConfig(**{**settings, **fields})


def prepared(config: TuneConfig, model=None):
    """(model to run, method hooks, encoded examples): what the API hands to the loop, without files."""
    model = model if model is not None else tiny_model()
    examples = encode_examples(task_examples(config.task, "train", config.train_examples), tiny_tokenizer(), config.max_length)
    method = make_method(config)
    return method.prepare(model, target_modules(model, config)), method, examples


def weights(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


# --- config ------------------------------------------------------------------------------------


def test_config_rejects_two_budgets_and_unknown_methods():
    with pytest.raises(ValueError, match="density or rank_budget"):
        TuneConfig(density=0.1, rank_budget=4)
    with pytest.raises(ValueError, match="method"):
        TuneConfig(method="adapterx")
    with pytest.raises(ValueError, match="extra"):
        TuneConfig(densty=0.1)
    assert TuneConfig().method.budget == {"density": 0.05} and TuneConfig().method.sparse
    assert TuneConfig(rank_budget=4).method.budget == {"rank_budget": 4}
    assert TuneConfig(method="lora", rank_budget=4).method.rank == 4  # an adapter's rank defaults to the budget
    assert TuneConfig(method="lora", rank_budget=4, lora_rank=3).method.rank == 3
    assert TuneConfig(method="lora").method.rank == 8 and TuneConfig(method="lora", lora_rank=3).method.resolved_alpha == 6
    assert not TuneConfig(method="lora").method.sparse


def test_nested_method_equals_the_flat_shortcuts():
    flat = TuneConfig(method="lift", density=0.1, filter_rank=8, refresh_every=2)
    nested = TuneConfig(method={"name": "lift", "density": 0.1, "filter_rank": 8, "refresh_every": 2})
    typed = TuneConfig(method=LiftConfig(density=0.1, filter_rank=8, refresh_every=2))
    assert flat == nested == typed and flat.training_key() == nested.training_key()
    assert TuneConfig(density=0.1).method == LiftConfig(density=0.1)  # no method: lift
    assert TuneConfig(method="lora", lora_rank=4, lora_dropout=0.1).method == LoraConfig(rank=4, dropout=0.1)
    # a flat value wins over the nested one (a command-line option over its YAML), the rest stays
    assert TuneConfig(method={"name": "lift", "density": 0.2, "filter_rank": 8}, density=0.1) == flat.model_copy(
        update={"method": LiftConfig(density=0.1, filter_rank=8)})
    assert TuneConfig.model_validate(flat.model_dump()) == flat  # a saved config loads back


@pytest.mark.parametrize("fields, message", [
    ({"method": "lift", "lora_rank": 4}, "lora_rank is not a setting of method lift"),
    ({"method": "lora", "density": 0.1}, "density is not a setting of method lora"),
    ({"method": "full", "refresh_every": 2}, "refresh_every is not a setting of method full"),
    ({"method": "magnitude", "filter_rank": 8}, "filter_rank is not a setting of method magnitude"),
])
def test_a_flat_field_of_another_method_is_an_error(fields, message, tmp_path):
    from weightwise.quantize.recipe import validated

    with pytest.raises(WeightwiseError, match=message) as err:
        validated(TuneConfig, fields)
    assert "\n" not in str(err.value) and "silently ignored" in str(err.value)
    with pytest.raises(ValueError, match="extra"):
        TuneConfig(method={"name": fields["method"], "lora_rank": 4})  # the nested form names its own fields only


def test_a_saved_version_1_config_still_loads():
    """tune_config.json / manifest.json of version 1: flat, every method field listed, the unread ones ignored."""
    old = {"version": 1, "method": "lift", "task": "arithmetic", "train_examples": 8, "test_examples": 0, "test_task": None,
           "density": 0.1, "rank_budget": None, "filter_rank": 8, "randomized_svd": False, "refresh_every": 2,
           "targets": None, "lr": 0.005, "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "epochs": 1,
           "max_steps": 6, "batch_size": 8, "grad_accum": 1, "max_length": 256, "seed": 0, "lora_rank": 4,
           "lora_alpha": None, "lora_dropout": 0.0, "checkpoint_every": 0, "keep_checkpoints": False,
           "patch_dtype": "fp32", "eval_before": True, "max_new_tokens": 16, "eval_batch_size": 16,
           "retention_max_tokens": 0, "retention_window": 512}
    config = TuneConfig.model_validate(json.loads(json.dumps(old)))
    assert config.version == 2 and config.method == LiftConfig(density=0.1, filter_rank=8, refresh_every=2)
    assert config.training_key() == TuneConfig(method="lift", density=0.1, filter_rank=8, refresh_every=2, lr=0.005,
                                               train_examples=8, max_steps=6).training_key()
    lora = TuneConfig.model_validate({**old, "method": "lora", "lora_rank": None, "rank_budget": 16, "density": None})
    assert lora.method == LoraConfig(rank=16)
    with pytest.raises(ValueError, match="version 3"):
        TuneConfig(version=3)


@pytest.mark.parametrize("text", ["method: lift\ndensity: 0.1\nfilter_rank: 8\n",
                                  "method: {name: lift, density: 0.1, filter_rank: 8}\n",
                                  "method:\n  name: lift\n  density: 0.1\nfilter_rank: 8\n"])
def test_yaml_nested_and_flat_both_load(text, tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text(text)
    assert TuneConfig.from_yaml(path).method == LiftConfig(density=0.1, filter_rank=8)
    # a command-line --method naming the file's method keeps its settings; another method replaces them
    assert TuneConfig.from_yaml(path, method="lift", density=0.2).method == LiftConfig(density=0.2, filter_rank=8)
    path.write_text("method: {name: lora, rank: 4}\n")
    assert TuneConfig.from_yaml(path, method="dora").method.model_dump() == {"name": "dora", "rank": 8, "alpha": None,
                                                                             "dropout": 0.0}


def test_config_from_yaml_with_overrides_and_training_key(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text("method: lora\nlr: 0.0002\nlora_rank: 4\ncheckpoint_every: 10\n")
    config = TuneConfig.from_yaml(path, lr=1e-3)
    assert (config.method.name, config.lr, config.method.rank) == ("lora", 1e-3, 4)
    assert config.training_key() == config.model_copy(update={"checkpoint_every": 99}).training_key()
    assert config.training_key() != config.model_copy(update={"seed": 1}).training_key()
    path.write_text("method: lora\nlearning_rate: 0.1\n")
    with pytest.raises(WeightwiseError, match="learning_rate"):
        TuneConfig.from_yaml(path)


# --- the one loop, every method ------------------------------------------------------------------


def test_public_api_exports_tune_and_its_config(tmp_path):
    import weightwise as ww
    import weightwise.tune.lift  # noqa: F401  (binds the name weightwise.tune to the package)

    assert ww.TuneConfig is TuneConfig and ww.tune.TuneConfig is TuneConfig
    assert all(getattr(ww, cls.__name__) is cls and getattr(ww.tune, cls.__name__) is cls for cls in METHOD_CONFIGS)
    with pytest.raises(WeightwiseError, match="method"):  # the package forwards calls to weightwise.tune.api.tune
        ww.tune(tiny_model(), tiny_tokenizer(), {"method": "nope"}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_registry_covers_every_method():
    assert set(METHODS) == set(METHOD_CONFIGS)
    assert set(METHOD_NAMES) == {"lift", "full", "lora", "dora", "pissa", "magnitude", "random", "qat",
                                 "qat-lora"}


@pytest.mark.parametrize("method", sorted(METHOD_NAMES))
def test_every_method_lowers_the_loss_on_a_memorisable_set(method, toy_task):
    config = quick(toy_task, method=method)
    model, tuner, examples = prepared(config)
    losses = []
    summary = train(model, tuner, examples, config, pad_token_id=0, on_step=lambda r: losses.append(r["loss"]))
    assert summary["steps_run"] == 6 and summary["loss_first"] == losses[0]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
    assert tuner.optimizer_state_bytes() > 0 and tuner.trained_entries() > 0


@pytest.mark.parametrize("method", ["lift", "magnitude", "random"])
def test_sparse_methods_change_only_entries_of_their_masks(method, toy_task):
    config = quick(toy_task, method=method, refresh_every=2)
    model = tiny_model()
    before = weights(model)
    model, tuner, examples = prepared(config, model)
    first = {name: idx.clone() for name, idx in tuner.optimizer.masks.items()}
    if method == "lift":  # the first masks are LIFT's principal weights of the base matrices
        for name, idx in first.items():
            base = before[name + ".weight"]
            assert torch.equal(idx, principal_mask(base, budget_k(tuple(base.shape), density=0.1), filter_rank=8))
    train(model, tuner, examples, config, pad_token_id=0)
    trained = tuner.ever_trained()
    assert len(trained) == TINY_TARGETS
    moved = 0
    for name, tensor in model.state_dict().items():
        changed = (tensor != before[name]).reshape(-1).nonzero().squeeze(1)
        module = name.removesuffix(".weight")
        if module not in trained:
            assert changed.numel() == 0, f"{name} is not a target but changed"
            continue
        assert torch.isin(changed, trained[module]).all(), f"{name}: entries outside the union of masks changed"
        assert torch.isin(first[module], trained[module]).all()
        assert changed.numel() > 0.5 * first[module].numel()
        moved += trained[module].numel() > first[module].numel()
    assert moved > 0, "refresh_every=2 should have moved some masks"


def test_refresh_recomputes_masks_and_keeps_moments_of_surviving_entries(toy_task):
    config = quick(toy_task, method="lift", refresh_every=3)
    model, tuner, examples = prepared(config)
    seen = {}
    refresh = tuner.refresh

    def spy(index):
        seen["before"] = tuner.optimizer.state_dict()
        counts = refresh(index)
        seen["after"] = tuner.optimizer.state_dict()
        seen["weights"] = {name: p.detach().clone() for name, p in tuner.params.items()}
        return counts

    tuner.refresh = spy
    records = []
    train(model, tuner, examples, config, pad_token_id=0, on_step=records.append)
    assert [r["step"] for r in records if "refresh" in r] == [3]  # not at the last step (6)
    assert records[2]["refresh"]["kept"] + records[2]["refresh"]["new"] == tuner.trained_entries()
    before, after = seen["before"], seen["after"]
    n_new = 0
    for name, weight in seen["weights"].items():
        k = budget_k(tuple(weight.shape), density=0.1)
        new_idx = after[f"{name}.indices"]
        assert torch.equal(new_idx, principal_mask(weight, k, filter_rank=8))  # from the weights at the refresh
        old_idx = before[f"{name}.indices"]
        kept = torch.isin(new_idx, old_idx)
        source = torch.searchsorted(old_idx, new_idx[kept])
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[f"{name}.{moment}"][kept], before[f"{name}.{moment}"][source])
            assert (after[f"{name}.{moment}"][~kept] == 0).all()
        n_new += int((~kept).sum())
    assert n_new == records[2]["refresh"]["new"] > 0


def test_full_finetuning_trains_the_targets_and_nothing_else(toy_task):
    config = quick(toy_task, method="full", max_steps=2)
    model = tiny_model()
    before = weights(model)
    model, tuner, examples = prepared(config, model)
    train(model, tuner, examples, config, pad_token_id=0)
    targets = set(target_modules(model, config))
    for name, tensor in model.state_dict().items():
        changed = (tensor != before[name]).float().mean().item()
        if name.removesuffix(".weight") in targets:
            assert changed > 0.9, name
        else:
            assert changed == 0, f"{name} (embeddings, norms) must stay frozen"
    assert tuner.trained_entries() == sum(before[n + ".weight"].numel() for n in targets)


# --- the API: results, evaluation, files -------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_lora_methods_save_a_peft_adapter_that_reproduces_the_tuned_model(method, toy_task, tmp_path):
    from peft import PeftModel

    model, tokenizer = tiny_model(), tiny_tokenizer()
    metrics = tune(model, tokenizer, quick(toy_task, method=method, max_steps=3, lora_rank=4), tmp_path / "run")
    assert metrics["files"] == ["adapter"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(config["target_modules"])  # the same bytes from every process
    assert sorted(p.name for p in adapter.parent.iterdir()) == ["adapter", "manifest.json", "metrics.json", "metrics.jsonl",
                                                                  "tune_config.json"]  # no lock or temporary left
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = model(ids).logits
        loaded = PeftModel.from_pretrained(tiny_model(), adapter).eval()
        reloaded = loaded(ids).logits
        base = tiny_model()(ids).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter changed the outputs
    torch.testing.assert_close(reloaded, tuned, atol=2e-5, rtol=0)


def test_sparse_run_writes_a_patch_that_reproduces_the_tuned_weights(toy_task, tmp_path):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    calls = []
    config = quick(toy_task, method="lift", test_task=toy_task, test_examples=4, retention_max_tokens=128,
                   retention_window=64, refresh_every=2)
    metrics = tune(model, tokenizer, config, tmp_path / "run", progress=lambda *a: calls.append(a))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "metrics.json", "metrics.jsonl", "patch.safetensors",
                                                    "tune_config.json"]  # checkpoints removed at the end
    patch = WeightPatch.load(run / "patch.safetensors")
    assert patch.metadata["base_model_hash"] == state_dict_fingerprint(tiny_model())
    assert patch.metadata["method"] == "lift" and patch.metadata["density"] == 0.1
    assert patch.metadata["metrics"]["loss_last"] == metrics["train"]["loss_last"]
    base = tiny_model()
    patch.apply(base)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(base.state_dict()[name], tensor, atol=1e-7, rtol=0)
    for side in ("before", "after"):
        assert metrics[side]["exact_match"]["n"] == 4 and 0 <= metrics[side]["exact_match"]["accuracy"] <= 1
        assert metrics[side]["retention"]["ppl"] > 1 and metrics[side]["retention"]["n_tokens_scored"] == 2 * 63
    assert metrics["after"]["retention"]["ppl"] != metrics["before"]["retention"]["ppl"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "tune-run" and manifest["config"]["method"]["name"] == "lift"
    assert manifest["metrics"]["after"]["retention_ppl"] == metrics["after"]["retention"]["ppl"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_mb"] > 0 for r in lines)
    phases = [c[0] for c in calls]
    assert phases[0] == "eval before" and phases[-1] == "eval after" and phases.count("train") == 6


class _Kill(Exception):
    pass


def _kill_at(step):
    def progress(phase, done, total, info):
        if phase == "train" and done == step and "loss" in info:
            raise _Kill

    return progress


@pytest.mark.parametrize("method, extra", [("lift", {"refresh_every": 2}), ("lora", {"lora_dropout": 0.1})])
def test_an_interrupted_run_resumes_to_the_same_weights(method, extra, toy_task, tmp_path):
    config = quick(toy_task, method=method, max_steps=6, checkpoint_every=2, train_examples=8, batch_size=4, **extra)
    reference = tiny_model()
    tune(reference, tiny_tokenizer(), config, tmp_path / "a")
    resumed = tiny_model()
    with pytest.raises(_Kill):
        tune(resumed, tiny_tokenizer(), config, tmp_path / "b", progress=_kill_at(3))
    assert (tmp_path / "b" / "checkpoints" / "step-00000002" / "state.json").is_file()
    assert not (tmp_path / "b" / "manifest.json").exists()
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["config"]["method"]["name"] == method and state["data_position"] == {"epoch": 1, "batch": 0}
    resumed = tiny_model()
    metrics = tune(resumed, tiny_tokenizer(), config, tmp_path / "b")
    assert metrics["resumed_from_step"] == 2 and metrics["train"]["steps_run"] == 4
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_output_folder_rules(toy_task, tmp_path):
    config = quick(toy_task, max_steps=4, checkpoint_every=2, batch_size=4)
    run = tmp_path / "run"
    tune(tiny_model(), tiny_tokenizer(), config, run)
    with pytest.raises(WeightwiseError, match="finished run"):
        tune(tiny_model(), tiny_tokenizer(), config, run)
    tune(tiny_model(), tiny_tokenizer(), config, run, overwrite=True)
    assert (run / "manifest.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(WeightwiseError, match="not a weightwise tune run"):
        tune(tiny_model(), tiny_tokenizer(), config, other)
    assert (other / "notes.txt").read_text() == "mine"
    killed = tmp_path / "killed"
    with pytest.raises(_Kill):
        tune(tiny_model(), tiny_tokenizer(), config, killed, progress=_kill_at(3))
    with pytest.raises(WeightwiseError, match="checkpoint of another config"):
        tune(tiny_model(), tiny_tokenizer(), config.model_copy(update={"lr": 1e-3}), killed)
    with pytest.raises(WeightwiseError, match="checkpoint of another config"):
        tune(tiny_model(seed=1), tiny_tokenizer(), config, killed)  # another base model


# --- the CLI ---------------------------------------------------------------------------------------


from test_cli import run_cli  # noqa: E402


def toy_lift_command(model_dir, tmp_path, *, steps: int, refresh_every: int) -> list:
    """`weightwise tune` arguments (no -o) for a short LIFT run on a memorisable JSONL task."""
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(10, 26)))
    return ["tune", model_dir, "--task", task, "--method", "lift", "--refresh-every", str(refresh_every),
            "--train-examples", "16", "--batch-size", "4", "--grad-accum", "2", "--steps", str(steps),
            "--checkpoint-every", "2", "--test-examples", "0", "--retention-max-tokens", "0", "--lr", "0.005",
            "--density", "0.1", "--filter-rank", "8", "--patch-dtype", "fp32"]


def test_cli_tune_writes_the_run_and_log_lines(capsys, monkeypatch, tiny_dir, toy_task, tmp_path):
    run, recipe = tmp_path / "run", tmp_path / "tune.yaml"
    recipe.write_text("method: magnitude\ndensity: 0.1\nlr: 0.005\nmax_steps: 99\n")
    code, out, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--config", recipe, "--task", toy_task,
                             "--train-examples", "8", "--batch-size", "4", "--steps", "4", "--checkpoint-every", "2",
                             "--test-examples", "0", "--retention-max-tokens", "0", "-o", run)
    assert code == 0, err
    assert "step 2/4 loss" in err and "checkpoint" in err and "step 4/4 loss" in err
    assert "magnitude" in out and "patch.safetensors" in out
    assert (run / "patch.safetensors").is_file() and (run / "manifest.json").is_file()
    saved = json.loads((run / "tune_config.json").read_text())["config"]
    assert saved["method"]["name"] == "magnitude" and saved["method"]["density"] == 0.1  # from the YAML
    assert saved["lr"] == 0.005
    assert saved["max_steps"] == 4  # the option overrides the YAML


def test_cli_tune_user_errors_exit_2(capsys, monkeypatch, tiny_dir, toy_task, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--task", toy_task, "--density", "0.1",
                           "--rank-budget", "4", "-o", run)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "density or rank_budget" in err
    code, _, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--task", toy_task, "--train-examples", "2",
                           "--batch-size", "4", "-o", run)
    assert code == 2 and "do not fill one global batch" in err and "Traceback" not in err


def test_cli_tune_rejects_an_option_the_method_does_not_read(capsys, monkeypatch, tiny_dir, toy_task, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--task", toy_task, "--method", "lift",
                           "--lora-rank", "4", "-o", tmp_path / "run")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert "lora_rank is not a setting of method lift" in errors[0] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_tune_on_the_default_model_end_to_end(capsys, monkeypatch, tmp_path):
    """The documented command on the real SmolLM2 and the arithmetic task, 2 steps (LIFT masks on two blocks)."""
    run = tmp_path / "lift"
    code, out, err = run_cli(capsys, monkeypatch, "tune", "default", "--task", "arithmetic", "--method", "lift",
                             "--density", "0.05", "--targets", r"^model\.layers\.(0|1)\.", "--steps", "2",
                             "--train-examples", "16", "--test-examples", "4", "--batch-size", "4",
                             "--retention-max-tokens", "512", "-o", run)
    assert code == 0, err
    assert "loaded default" in err and "step 2/2 loss" in err
    assert "exact match" in out and "retention ppl" in out and "patch.safetensors" in out
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "metrics.json", "metrics.jsonl", "patch.safetensors",
                                                    "tune_config.json"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["trained_fraction"] == pytest.approx(0.05, abs=1e-4)
    assert metrics["before"]["exact_match"]["n"] == 4 and metrics["before"]["retention"]["n_tokens_scored"] == 511
    assert 5 < metrics["before"]["retention"]["ppl"] < 50  # the real model, not noise
    patch = WeightPatch.load(run / "patch.safetensors")
    assert len(patch.entries) == 14 and all(".layers.0." in n or ".layers.1." in n for n in patch.entries)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["source"]["name"] and manifest["config"]["task"] == "arithmetic"
