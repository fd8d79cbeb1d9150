"""GPU checks (skipped without CUDA): quantizing with device="cuda" gives what the CPU path gives while the
model stays in CPU memory, a killed GPU run resumes, and the CLI quantizes and tunes on the GPU."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from test_cli import run_cli
from weightwise.quantize import QuantizedLinear, quantization_record, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}
RECIPES = {
    "rtn-int4": {"format": "int4", "group_size": 32},
    "rtn-mxfp4-lorc-int8": {"format": "mxfp4", "lorc_rank": 4, "lorc_dtype": "int8"},
    "gptq-int3-clip-rounds": {"format": "int3", "group_size": 32, "calibration": CALIB,
                              "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 2}},
    "gptq-nf4-act-order-lorc": {"format": "nf4", "group_size": 32, "lorc_rank": 4, "calibration": CALIB,
                                "method": {"name": "gptq", "act_order": True}},
    "gptq-block-tune": {"format": "int4_asym", "group_size": 16, "method": "gptq", "bias_correction": True,
                        "block_tune": {"epochs": 2}, "calibration": CALIB},
    "awq-int3": {"format": "int3", "group_size": 32, "method": {"name": "awq", "grid": 5, "clip_grid": 5}, "calibration": CALIB},
    "fpsearch-fp4": {"format": "fp4_e2m1", "group_size": 32, "method": "fpsearch", "calibration": CALIB},
    "w8a8-smoothquant": {"format": "int8", "granularity": "channel", "act_format": "int8", "smoothquant_alpha": 0.5,
                         "calibration": CALIB},
    "pow2-w4a8": {"format": "int4", "group_size": 16, "pow2_scales": "ratio", "act_format": "fp8_e4m3"},
    "planner-3.6": {"target_bpw": 3.6, "method": "gptq", "calibration": CALIB,
                    "candidates": [{"format": "int2_asym", "group_size": 32}, {"format": "int3", "group_size": 32},
                                   {"format": "int4", "group_size": 32}, {"format": "int8", "granularity": "channel"}]},
}


def _tokens(seed):
    return torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(seed))


def _output_mse(model, qmodel, tokens):
    with torch.no_grad():
        return (model(tokens).logits - qmodel(tokens).logits).pow(2).mean().item()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_gpu_quantization_matches_the_cpu_path(name):
    model, calib, held_out = tiny_model(), _tokens(1), _tokens(2)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    on_cpu = quantize(model, RECIPES[name], calibration=calib)
    on_gpu = quantize(model, RECIPES[name], calibration=calib, device="cuda")
    assert quantization_record(on_gpu).device == "cuda"
    assert all(t.device.type == "cpu" for t in [*on_gpu.parameters(), *on_gpu.buffers()])  # back in CPU memory
    assert all(torch.equal(source[k], v) for k, v in model.state_dict().items())  # the source is untouched
    cpu_q = {n: m for n, m in on_cpu.named_modules() if isinstance(m, QuantizedLinear)}
    gpu_q = {n: m for n, m in on_gpu.named_modules() if isinstance(m, QuantizedLinear)}
    assert cpu_q.keys() == gpu_q.keys() and all(cpu_q[n].spec == gpu_q[n].spec for n in cpu_q)
    # summation order differs between the devices: a few codes may round the other way, the quality may not move
    cpu_error, gpu_error = _output_mse(model, on_cpu, held_out), _output_mse(model, on_gpu, held_out)
    assert gpu_error == pytest.approx(cpu_error, rel=0.1), (cpu_error, gpu_error)
    same = sum(torch.equal(cpu_q[n].packed_codes, gpu_q[n].packed_codes) for n in cpu_q)
    assert same >= len(cpu_q) // 2, f"only {same}/{len(cpu_q)} layers have identical codes"


def test_a_killed_gpu_run_resumes_to_the_same_model(tmp_path):
    model, calib = tiny_model(), _tokens(3)
    recipe = {"format": "int4", "group_size": 16, "method": "gptq", "lorc_rank": 2, "block_tune": {"epochs": 1},
              "calibration": CALIB}
    reference = quantize(model, recipe, calibration=calib, device="cuda")

    def kill_after_first_block(done, total, name):
        if done == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(model, recipe, calibration=calib, checkpoint_dir=tmp_path, progress=kill_after_first_block, device="cuda")
    resumed = quantize(model, recipe, calibration=calib, checkpoint_dir=tmp_path, device="cuda")
    assert quantization_record(resumed).calibration.resumed_at_block == 1
    expected = reference.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in resumed.state_dict().items())


def test_cli_quantizes_and_tunes_on_the_gpu(capsys, monkeypatch, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text for the tiny model. " * 30)
    run = tmp_path / "q"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--method", "gptq", "--format", "int4", "--group-size",
                             "32", "--calib", f"{text}:8x32", "--block-tune", "--device", "cuda", "-o", run)
    assert code == 0, err
    assert json.loads((run / "manifest.json").read_text()).device.startswith("cuda") and "on cuda" in out
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(11, 19)))
    tuned = tmp_path / "t"
    code, out, err = run_cli(capsys, monkeypatch, "tune", tiny_dir, "--task", task, "--method", "lift", "--train-examples", "8",
                             "--batch-size", "8", "--steps", "6", "--lr", "0.005", "--density", "0.1", "--filter-rank", "8",
                             "--test-examples", "0", "--retention-max-tokens", "0", "--checkpoint-every", "3",
                             "--device", "cuda", "-o", tuned)
    assert code == 0, err
    assert (tuned / "patch.safetensors").is_file(), sorted(p.name for p in tuned.iterdir())
    train = json.loads((tuned / "metrics.json").read_text())["train"]
    assert train["steps_run"] == 6 and train["loss_last"] < train["loss_first"]


MODEL_SCORERS = ("loss", "el2n", "ifd", "grand", "rds", "less")


@pytest.mark.parametrize("scorer", MODEL_SCORERS)
def test_select_scores_on_the_gpu_equal_the_cpu_ones(scorer, tmp_path):
    from conftest import tiny_tokenizer

    from weightwise.select import SelectConfig, scorer_config, select

    problems = [(f"What is {a} + {b}?", str(a + b)) for a in range(3, 9) for b in (4, 17)]
    pool, target = tmp_path / "pool.jsonl", tmp_path / "target.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in problems))
    target.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in problems[:3]))
    settings = scorer_config(scorer, drop_above_one=False) if scorer == "ifd" else scorer_config(scorer)
    config = SelectConfig(scorers=[settings], budget=4, dedup="none",
                          target=str(target) if settings.needs_target else None)
    scores = {}
    for run, device in enumerate(("cpu", "cuda")):
        selection = select(pool, tmp_path / f"run{run}", config, model=tiny_model().to(device), tokenizer=tiny_tokenizer())
        scores[device] = np.asarray(selection.scores[scorer], dtype=float)
    assert np.isfinite(scores["cpu"]).all()
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=2e-3, atol=1e-5)


def test_lift_tunes_and_evaluates_a_model_on_the_gpu(tmp_path):
    from conftest import tiny_tokenizer

    from weightwise.evaluate.tasks import exact_match
    from weightwise.data.tasks import load_examples
    from weightwise.tune.api import tune
    from weightwise.tune.config import TuneConfig

    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(11, 27)))
    config = TuneConfig(method="lift", task=str(task), train_examples=16, test_task=str(task), test_examples=16,
                        max_steps=6, batch_size=8, lr=5e-3, density=0.1, filter_rank=8, eval_before=False,
                        retention_max_tokens=0, max_new_tokens=4)
    model = tiny_model().to("cuda")
    metrics = tune(model, tiny_tokenizer(), config, tmp_path / "run")
    assert metrics["train"]["steps_run"] == 6 and metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    assert next(model.parameters()).device.type == "cuda"
    on_gpu = exact_match(model, tiny_tokenizer(), load_examples(task), max_new_tokens=4)
    on_cpu = exact_match(model.cpu(), tiny_tokenizer(), load_examples(task), max_new_tokens=4)
    assert on_gpu["n"] == on_cpu["n"] == 16 and abs(on_gpu["n_correct"] - on_cpu["n_correct"]) <= 1
