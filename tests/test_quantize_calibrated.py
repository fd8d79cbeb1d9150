"""Calibrated quantization through quantize(): GPTQ on a tiny model, data sources, resume after a kill."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from weightwise.errors import WeightwiseError
from weightwise.quantize import QuantizedLinear, QuantRecipe, quantization_record, quantize

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}


def _tokens(seed=1):
    return torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(seed))


def _output_mse(model, qmodel, tokens):
    with torch.no_grad():
        return (model(tokens).logits - qmodel(tokens).logits).pow(2).mean().item()


def test_gptq_beats_rtn_on_held_out_tokens():
    model = tiny_model()
    calib, held_out = _tokens(1), _tokens(2)
    rtn = quantize(model, {"format": "int3", "group_size": 32})
    gptq = quantize(model, {"format": "int3", "group_size": 32, "method": "gptq", "calibration": CALIB}, calibration=calib)
    assert _output_mse(model, gptq, held_out) < _output_mse(model, rtn, held_out)
    record = quantization_record(gptq)
    assert record.recipe["method"]["name"] == "gptq" and record.calibration.tokens == calib.numel()
    assert all("damp" in layer.diagnostics for layer in record.layers.values())


def test_gptq_needs_calibration_data():
    with pytest.raises(WeightwiseError, match="needs calibration data"):
        quantize(tiny_model(), {"method": "gptq", "format": "int4", "group_size": 32})


def test_gptq_from_a_text_with_the_tokenizer(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("calibration text for a tiny model. " * 40)
    recipe = {"method": {"name": "gptq", "act_order": True}, "format": "nf4", "group_size": 32,
              "calibration": {**CALIB, "source": str(text)}}
    qmodel = quantize(tiny_model(), recipe, tokenizer=tiny_tokenizer())
    assert sum(isinstance(m, QuantizedLinear) for m in qmodel.modules()) == 14


def test_killed_run_resumes_at_the_next_block_with_identical_weights(tmp_path):
    model, calib = tiny_model(), _tokens(3)
    recipe = {"format": "int4", "group_size": 16, "method": "gptq", "lorc_rank": 2, "calibration": CALIB}
    reference = quantize(model, recipe, calibration=calib)
    checkpoint = tmp_path / "partial"

    def kill_after_first_block(done, total, name):
        if done == 8:  # block 0 holds 7 layers: the first layer of block 1 is being installed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint, progress=kill_after_first_block)
    assert (checkpoint / "progress.json").is_file()
    resumed = quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint)
    assert quantization_record(resumed).calibration.resumed_at_block == 1
    assert not checkpoint.exists()
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantizedLinear)}
    for name, module in resumed.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.dequantized_weight(), ref_layers[name].dequantized_weight()), name


def test_run_killed_while_deleting_its_checkpoint_reruns_afresh(tmp_path, monkeypatch):
    model, calib = tiny_model(), _tokens(3)
    recipe = {"format": "int4", "group_size": 16, "method": "gptq", "calibration": CALIB}
    reference = quantize(model, recipe, calibration=calib)
    checkpoint = tmp_path / "partial"

    def killed_while_deleting(path, ignore_errors=False):
        (Path(path) / "block_0001.safetensors").unlink()  # one block file gone, then the process dies
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("weightwise.quantize.checkpoint.shutil.rmtree", killed_while_deleting)
        with pytest.raises(KeyboardInterrupt):
            quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint)
    rerun = quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint)
    assert quantization_record(rerun).calibration.resumed_at_block == 0 and not checkpoint.exists()
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantizedLinear)}
    for name, module in rerun.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.dequantized_weight(), ref_layers[name].dequantized_weight()), name


def test_run_killed_after_its_last_block_resumes_to_the_same_model(tmp_path, monkeypatch):
    model, calib = tiny_model(), _tokens(3)
    recipe = {"format": "int4", "group_size": 16, "method": "gptq", "calibration": CALIB}
    reference = quantize(model, recipe, calibration=calib)
    checkpoint = tmp_path / "partial"

    def killed(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:  # every block saved, killed before the checkpoint is deleted
        patched.setattr("weightwise.quantize.checkpoint.BlockCheckpoint.clear", killed)
        with pytest.raises(KeyboardInterrupt):
            quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint)
    resumed = quantize(model, recipe, calibration=calib, checkpoint_dir=checkpoint, keep_checkpoint=True)
    assert quantization_record(resumed).calibration.resumed_at_block == 2
    assert quantization_record(resumed).layers == quantization_record(reference).layers
    assert (checkpoint / "progress.json").is_file()  # kept for a caller that deletes it once the model is saved
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantizedLinear)}
    layers = {n: m for n, m in resumed.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers.keys() == ref_layers.keys()
    for name, module in layers.items():
        assert torch.equal(module.dequantized_weight(), ref_layers[name].dequantized_weight()), name


def test_stale_checkpoint_is_ignored(tmp_path):
    model, calib = tiny_model(), _tokens(4)
    checkpoint = tmp_path / "partial"

    def kill(done, total, name):
        if done == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(model, {"format": "int4", "group_size": 16, "method": "gptq", "calibration": CALIB},
                 calibration=calib, checkpoint_dir=checkpoint, progress=kill)
    other = quantize(model, {"format": "int3", "group_size": 16, "method": "gptq", "calibration": CALIB},
                     calibration=calib, checkpoint_dir=checkpoint)
    assert quantization_record(other).calibration.resumed_at_block == 0


def test_planner_meets_the_bit_budget_and_predicts_less_error_than_uniform():
    model, calib = tiny_model(), _tokens(5)
    candidates = [{"format": "int2_asym", "group_size": 32}, {"format": "int3", "group_size": 32},
                  {"format": "int4", "group_size": 32}, {"format": "int8", "granularity": "channel"}]
    qmodel = quantize(model, {"target_bpw": 3.6, "candidates": candidates, "calibration": CALIB}, calibration=calib)
    plan = quantization_record(qmodel).plan
    label = quantization_record(qmodel).format_label  # the run is named by the formats it really holds
    assert label.startswith("mixed: ") and all(c.choice.split()[0] in label for c in plan.choices.values())
    from weightwise.evaluate.size import model_size

    size = model_size(qmodel)
    assert size["bits_per_weight"] <= 3.6 and plan.bits_per_weight == pytest.approx(size["bits_per_weight"])
    assert len({c.choice for c in plan.choices.values()}) > 1 and plan.optimal
    # uniform int3 g32 (3.5 bits/weight) is one feasible plan: the optimum predicts no more error than it
    uniform = quantize(model, {"target_bpw": 3.6, "candidates": candidates[1:2], "calibration": CALIB}, calibration=calib)
    assert plan.predicted_error <= quantization_record(uniform).plan.predicted_error


@pytest.mark.parametrize("field", [{"format": "int3"}, {"group_size": 32}, {"granularity": "channel"},
                                   {"scale_dtype": "bf16"}, {"lorc_rank": 4}])
def test_a_size_target_refuses_per_layer_settings_the_planner_would_drop(field):
    with pytest.raises(WeightwiseError, match=f"drop {next(iter(field))}"):
        quantize(tiny_model(), {"target_bpw": 3.6, **field})


def test_gptq_clip_search_refuses_ratio_scales():
    with pytest.raises(WeightwiseError, match="clip_search is not supported with pow2_scales 'ratio'"):
        quantize(tiny_model(), {"format": "int4", "group_size": 32, "pow2_scales": "ratio",
                                "method": {"name": "gptq", "clip_search": True}})


def test_planner_with_target_mb_and_gptq():
    from weightwise.evaluate.size import model_size

    model, calib = tiny_model(), _tokens(7)
    full_mb = model_size(model)["total_bytes"] / 1e6
    recipe = {"method": "gptq", "target_mb": round(full_mb * 0.6, 4), "calibration": CALIB,
              "candidates": [{"format": "int3", "group_size": 32}, {"format": "int8", "granularity": "channel"},
                             {"format": "int4", "group_size": 32, "lorc_rank": 2}]}
    qmodel = quantize(model, recipe, calibration=calib)
    assert model_size(qmodel)["total_bytes"] / 1e6 <= recipe["target_mb"]
    for tiny_budget in (full_mb * 0.12, full_mb * 0.05):  # below the smallest plan; below the unplanned tensors
        with pytest.raises(WeightwiseError, match="infeasible|leaves nothing"):
            quantize(model, {**recipe, "target_mb": tiny_budget}, calibration=calib)


def test_size_target_and_overrides_conflict():
    with pytest.raises(WeightwiseError, match="conflict"):
        quantize(tiny_model(), {"target_bpw": 3, "overrides": [{"pattern": "q_proj", "skip": True}]})


def _block0_q_proj_outputs(model, tokens):
    """Outputs of block 0's q_proj on the calibration tokens (its inputs are the same in every model)."""
    from weightwise.quantize.calibration import capture_block_inputs

    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, tokens, 4)
    with torch.no_grad():
        return torch.cat([block.self_attn.q_proj(block.input_layernorm(h)).reshape(-1, block.self_attn.q_proj.out_features)
                          for h, *_ in inputs])


def test_bias_correction_removes_the_mean_output_error_of_layers_with_a_bias():
    tokens = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    source = tiny_model(attention_bias=True, mlp_bias=True)
    reference = _block0_q_proj_outputs(source, tokens)
    errors = {}
    for correct in (False, True):
        recipe = QuantRecipe(format="int3", group_size=16, bias_correction=correct,
                             calibration={"samples": 8, "seq_len": 32, "batch_size": 4})
        qmodel = quantize(source, recipe, calibration=tokens)
        errors[correct] = (_block0_q_proj_outputs(qmodel, tokens) - reference).mean(dim=0).abs().max().item()
    assert errors[True] < 1e-4 < errors[False]  # rtn leaves a mean shift; the corrected bias removes it
    assert recipe.needs_calibration


def test_bias_correction_leaves_layers_without_a_bias_alone():
    tokens = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    runs = [quantize(tiny_model(), QuantRecipe(format="int4", group_size=16, method="gptq", bias_correction=flag,
                                               calibration={"samples": 8, "seq_len": 32, "batch_size": 4}), calibration=tokens)
            for flag in (False, True)]
    for (name, a), b in zip(runs[0].named_modules(), runs[1].modules()):
        if isinstance(a, QuantizedLinear):
            assert a.bias is None and torch.equal(a.dequantized_weight(), b.dequantized_weight()), name


@pytest.mark.parametrize("recipe", [
    {"format": "int3", "group_size": 16, "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 1},
     "block_tune": {"epochs": 1}, "calibration": CALIB},
    {"target_bpw": 3.6, "candidates": [{"format": "int3", "group_size": 32}, {"format": "int4", "group_size": 32}],
     "method": "gptq", "calibration": CALIB},
    {"format": "int4", "group_size": 32},
])
def test_an_explicit_device_runs_block_by_block_and_returns_the_model_where_it_was(recipe):
    """device= moves each block (or layer) there and back; on the CPU the result equals the plain run's."""
    model, calib = tiny_model(), _tokens(4)
    plain = quantize(model, recipe, calibration=calib)
    moved = quantize(model, recipe, calibration=calib, device="cpu")
    assert quantization_record(moved).device == "cpu"
    plain_state, moved_state = plain.state_dict(), moved.state_dict()
    assert plain_state.keys() == moved_state.keys()
    assert all(torch.equal(plain_state[k], moved_state[k]) for k in plain_state)


def test_save_load_keeps_every_field_of_the_record(tmp_path):
    """plan, calibration and device used to be dropped on reload: the typed record survives unchanged."""
    from weightwise.io.folders import load_quantized, save

    model, calib = tiny_model(), _tokens(5)
    candidates = [{"format": "int3", "group_size": 32}, {"format": "int4", "group_size": 32}]
    qmodel = quantize(model, {"method": "gptq", "target_bpw": 3.8, "candidates": candidates, "calibration": CALIB},
                      calibration=calib)
    record = quantization_record(qmodel)
    assert record.plan is not None and record.calibration is not None and record.device == "cpu"
    loaded, _ = load_quantized(save(qmodel, tmp_path / "run"))
    assert quantization_record(loaded) == record
